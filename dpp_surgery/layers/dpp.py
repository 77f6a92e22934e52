"""Detail-Preserving Pooling (DPP) layer.

F. Saeedan, N. Weber, M. Goesele, S. Roth, "Detail-Preserving Pooling in Deep Networks", CVPR 2018
(arXiv:1804.04076). Checked against a float64 loop reference written from the paper's equations and against
the authors' Lua Torch graphs and CUDA layer for the paper-vs-code choices (see ``norm``).
"""
from __future__ import annotations

import copyreg
import inspect
import math
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
from timm.layers import register_notrace_module
from torch import Tensor, nn

from ..utils import check_choice
from .functional import (DEFAULT_EPS, GUIDES, IMPLEMENTATIONS, NORMS, REWARDS, THETA_ALPHA_MAX, dpp2d, exporting,
                         global_dpp2d)
from .geometry import PaddingArg, PoolGeometry, is_same_padding, to_pair

__all__ = ['DPP2d', 'GlobalDPP2d', 'INIT_PRESETS', 'param_groups', 'dpp_parameters', 'LrScaleWarning', 'dpp_aa_layer']

# init preset -> (theta_alpha, theta_lambda); alpha = exp(theta_alpha), lambda = exp(theta_lambda).
# Closeness to average / max pooling is measured by `python -m dpp_surgery.bench init` (table in README).
INIT_PRESETS: Dict[str, Tuple[float, float]] = {
    'paper': (0.0, 0.0),  # alpha = lambda = 1, the authors' CUDA layer
    'avg': (0.0, -6.0),  # lambda = 0.0025: every weight within ~1% of the others, so nearly average pooling
    'max': (-10.0, 3.0),  # with reward='asym': alpha = 4.5e-5, lambda = 20: the largest activation dominates
}


@register_notrace_module  # timm's FX feature extraction (and any timm-leaf tracer) keeps each layer one node
class DPP2d(nn.Module):
    r"""Detail-Preserving Pooling over 2-D windows.

    For each channel and output position :math:`p` with window :math:`\Omega_p` (its positions inside the
    input; padding never takes part):

    .. math::
        D[p] = \frac{\sum_{q \in \Omega_p} w_{p,q} I[q]}{\sum_{q \in \Omega_p} w_{p,q}}, \qquad
        w_{p,q} = \alpha + \left(\frac{y_{p,q}}{m_p}\right)^{\lambda / 2}, \qquad
        y_{p,q} = \rho(I[q] - G[p])^2 + \epsilon

    with :math:`\rho(x) = x` (``reward='sym'``) or :math:`\max(0, x)` (``reward='asym'``, only activations
    above the guide are rewarded), :math:`\alpha = e^{\theta_\alpha}` (:math:`\theta_\alpha` clamped at 10 as in
    the authors' graphs), :math:`\lambda = e^{\theta_\lambda}`, one of each per channel, and :math:`\epsilon =
    10^{-3}`. The window normalisation :math:`m_p` is the mean of :math:`y` over the window (``norm='mean'``, the
    authors' Lua graphs, default), its sum (``'sum'``, the authors' CUDA layer) or 1 (``'none'``, the paper's
    equation literally). It makes the weighting invariant to the scale of the activations and keeps the power
    from overflowing. The output is a convex combination of the window, so it lies between its min and max.

    The guide :math:`G` is the window mean (``guide='lite'``) or a learned depthwise filter (``guide='full'``,
    parameter ``guide_weight``): for the paper's 2x2/stride-2 window a 3x3, stride-2, padding-1 filter, as in
    the authors' graphs; for a window of side :math:`k` a filter of side :math:`k + 1` (even :math:`k`) or
    :math:`k` (odd :math:`k`) at the window's stride, starting :math:`k_g - k` positions before the window, with
    zero padding and cropped to the output size. ``guide_weight`` starts as a box filter.

    Padding, ``ceil_mode`` and the output size follow ``nn.MaxPool2d``; ``padding='same'`` reproduces timm's
    dynamic 'same' padding (``MaxPool2dSame``/``AvgPool2dSame``). Windows that padding or ``ceil_mode`` lets
    hang over the edge keep only their valid positions.

    **timm's anti-aliasing slot.** Given a ``stride`` but no ``kernel_size`` (how timm calls an ``aa_layer``:
    ``aa_layer(channels=C, stride=s)`` or ``aa_layer(C, stride=s)``), the layer is a downsampler by ``stride``:
    windows of side ``stride`` and ``ceil_mode=True``, so its output is ``ceil(H / stride)``, the size of the strided
    conv or pool it stands in for (3x3/stride 2/padding 1, the 1x1/stride-2 shortcut). So
    ``timm.create_model('resnet18', aa_layer=DPP2d)`` builds a DPP network from scratch (ResNet, EfficientNet,
    MobileNetV3, DenseNet and timm's other families with an ``aa_layer`` argument) that takes every input size the
    original takes. At stride 1 (the first block of a dilated ResNet stage) the window is 1x1 and the layer passes
    its input through. Every other call keeps the defaults above (``DPP2d(C)``: 2x2, stride 2, floor). For another
    variant, pass the class that :func:`dpp_aa_layer` makes (``aa_layer=dpp_aa_layer(guide='full',
    reward='asym')``): ResNet's constructor calls ``issubclass`` on its ``aa_layer``, so a ``functools.partial`` of
    DPP2d fails there, inside timm, with ``TypeError: issubclass() arg 1 must be a class`` (the EfficientNet,
    MobileNet and DenseNet builders accept a partial). Pretrained weights do not come through the slot: the DPP
    parameters are in no original checkpoint, so timm's strict pretrained load into such a model fails on the
    missing DPP keys; convert a pretrained model with :func:`dpp_surgery.convert` instead.

    On the CPU, a fused kernel that is built on first use (see :func:`dpp_surgery.kernel_status`) runs float32
    and float64 inputs, and float16/bfloat16 ones (autocast's) on a float32 copy. On CUDA, every float dtype runs
    fused Triton kernels (windows of up to 64 positions) that load and store the activation in its own dtype and
    compute in float32, with a backward that recomputes from the input. Elsewhere a pure-PyTorch path computes the
    same values; it computes float16 and bfloat16 inputs in float32 and returns them in their own dtype.

    **Non-finite and empty inputs.** A NaN, +inf or -inf in the input makes NaN every output whose computation reads
    it (its windows and, with the Full guide, the outputs whose guide filter reaches it) and leaves every other output
    bit-identical to the result without it, with no data-dependent branch or host-device synchronisation. In the
    backward pass, the input gradient is non-finite exactly at the positions those outputs read; the ``theta_alpha``,
    ``theta_lambda`` (and ``guide_weight``) gradients of their channel become NaN, the other channels' are unchanged.
    An empty batch (N = 0) gives an empty output and zero-size (input) or zero (parameter) gradients. The CPU kernel,
    the PyTorch path and the ONNX files in onnxruntime (decomposed, custom with the native kernel or with the function
    fallback) follow this; see ``docs/internals/nonfinite.md``.

    Args:
        channels: number of input channels C.
        kernel_size: window size, int or pair. Default 2, or ``stride`` when only ``stride`` is given (timm's
            anti-aliasing slot, above).
        stride: window stride; defaults to ``kernel_size``.
        padding: implicit padding (int or pair, at most half the kernel) or ``'same'``.
        ceil_mode: use ceil instead of floor for the output size, as in ``nn.MaxPool2d``. Default False, or True
            when only ``stride`` is given (timm's anti-aliasing slot).
        guide: ``'lite'`` (window mean) or ``'full'`` (learned depthwise filter).
        reward: ``'sym'`` or ``'asym'``.
        norm: ``'mean'``, ``'none'`` or ``'sum'`` (see above).
        init: ``'paper'`` (alpha = lambda = 1), ``'avg'`` (close to average pooling), ``'max'`` (close to max
            pooling; needs ``reward='asym'``), or a pair ``(alpha, lambda)`` of positive numbers.
        eps: added to the squared deviation.
        impl: ``'auto'``, ``'kernel'`` (the CPU kernel), ``'triton'`` (the Triton kernels) or ``'torch'`` (see
            :func:`dpp_surgery.dpp2d`).

    Shape:
        - Input: :math:`(N, C, H_{in}, W_{in})`
        - Output: :math:`(N, C, H_{out}, W_{out})`, with
          :math:`H_{out} = \left\lfloor \frac{H_{in} + 2 \cdot \text{padding} - \text{kernel\_size}}{\text{stride}}
          \right\rfloor + 1` (ceil with ``ceil_mode``, as in ``nn.MaxPool2d``) or :math:`\lceil H_{in} /
          \text{stride} \rceil` with ``padding='same'``; odd sizes work wherever the pooling layer works.

    Examples::

        >>> pool = DPP2d(64)  # Lite, symmetric, 2x2 stride 2
        >>> pool(torch.randn(8, 64, 57, 57)).shape
        torch.Size([8, 64, 28, 28])
        >>> DPP2d(64, 3, 2, padding=1, guide='full', reward='asym')
        DPP2d(64, kernel_size=3, stride=2, padding=1, guide=full, reward=asym, norm=mean)
        >>> DPP2d(channels=64, stride=2)  # as timm's aa slot builds it: output ceil(H / 2)
        DPP2d(64, kernel_size=2, stride=2, ceil_mode=True, guide=lite, reward=sym, norm=mean)
        >>> model = timm.create_model('resnet18', aa_layer=DPP2d)  # DPP from scratch, random init
    """

    def __init__(
            self,
            channels: int,
            kernel_size: Union[int, Tuple[int, int], None] = None,
            stride: Union[int, Tuple[int, int], None] = None,
            padding: PaddingArg = 0,
            ceil_mode: Optional[bool] = None,
            guide: str = 'lite',
            reward: str = 'sym',
            norm: str = 'mean',
            init: Union[str, Tuple[float, float]] = 'paper',
            eps: float = DEFAULT_EPS,
            impl: str = 'auto',
            device=None,
            dtype=None,
    ):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f'channels must be a positive int, but got {channels!r}')
        self.channels = channels
        # only a stride: timm's anti-aliasing slot, a downsampler by `stride` with the strided conv's output size
        downsampler = kernel_size is None and stride is not None
        if downsampler:
            PoolGeometry.create(1, stride)  # a bad stride is reported as the stride, not as the window it sets
        if kernel_size is None:
            kernel_size = stride if downsampler else 2
        if ceil_mode is None:
            ceil_mode = downsampler
        self.geometry = PoolGeometry.create(kernel_size, stride, padding, ceil_mode)
        self.guide = check_choice(guide, 'guide', GUIDES)
        self.reward = check_choice(reward, 'reward', REWARDS)
        self.norm = check_choice(norm, 'norm', NORMS)
        self.impl = check_choice(impl, 'impl', IMPLEMENTATIONS)
        if not eps > 0:
            raise ValueError(f'eps must be > 0, but got {eps}')
        self.eps = float(eps)
        self.init = self._check_init(init)
        factory = dict(device=device, dtype=dtype)
        self.theta_alpha = nn.Parameter(torch.empty(channels, **factory))
        self.theta_lambda = nn.Parameter(torch.empty(channels, **factory))
        if self.guide == 'full':
            self.guide_weight = nn.Parameter(torch.empty(channels, 1, *self.geometry.full_guide_kernel(), **factory))
        else:
            self.register_parameter('guide_weight', None)
        self.reset_parameters()

    @classmethod
    def from_pool(cls, pool: nn.Module, channels: int, **options: Any) -> 'DPP2d':
        """A DPP2d with the window of ``pool``: its kernel size, stride, padding and ceil mode, so it gives the
        pool's output size at every input size (timm's ``MaxPool2dSame`` and ``AvgPool2dSame`` keep their dynamic
        'same' padding). As composer's ``BlurMaxPool2d.from_maxpool2d`` does for its layer.

        Args:
            pool: an ``nn.MaxPool2d`` or ``nn.AvgPool2d`` (or a subclass, such as timm's ``*Same`` pools).
            channels: the channels of the pool's input.
            **options: DPP2d's other arguments (``guide``, ``reward``, ``norm``, ``init``, ``eps``, ``impl``,
                ``device``, ``dtype``).

        Raises:
            TypeError: ``pool`` is not a max or average pool, or ``options`` names a window argument.
            ValueError: a max pool with dilation, which no DPP window has.
        """
        if not isinstance(pool, (nn.MaxPool2d, nn.AvgPool2d)):
            raise TypeError(f'from_pool takes an nn.MaxPool2d or nn.AvgPool2d, but got {type(pool).__name__}; for '
                            'a strided conv give DPP2d(channels, stride=s) after it, or convert the model')
        given = sorted(set(options) & {'kernel_size', 'stride', 'padding', 'ceil_mode'})
        if given:
            raise TypeError(f'from_pool takes the window from the pool; drop {", ".join(given)}')
        if isinstance(pool, nn.MaxPool2d) and to_pair(pool.dilation, 'dilation') != (1, 1):
            raise ValueError(f'{type(pool).__name__} with dilation {pool.dilation} has no DPP counterpart (a DPP '
                             'window is contiguous); leave that pool alone')
        padding = 'same' if is_same_padding(pool) else pool.padding
        return cls(channels, kernel_size=pool.kernel_size, stride=pool.stride or pool.kernel_size, padding=padding,
                   ceil_mode=pool.ceil_mode, **options)

    def _check_init(self, init) -> Union[str, Tuple[float, float]]:
        if isinstance(init, str):
            name = init.lower()
            if name not in INIT_PRESETS:
                raise ValueError(f"init must be one of {', '.join(map(repr, INIT_PRESETS))} or a pair (alpha, lambda), "
                                 f'but got {init!r}')
            if name == 'max' and self.reward != 'asym':
                raise ValueError("init='max' needs reward='asym': the symmetric reward also favours activations "
                                 'far below the window mean, so it cannot approach max pooling')
            return name
        if (isinstance(init, (tuple, list)) and len(init) == 2
                and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in init)):
            return float(init[0]), float(init[1])
        raise ValueError(f'init must be a preset name or a pair (alpha, lambda) of positive numbers, but got {init!r}')

    @property
    def pool_geometry(self) -> PoolGeometry:
        """The layer's geometry as a downsampler, which the pool attributes below give: its DPP's ``geometry``
        (S3DPP2d's is its whole layer's, a stride-2 pool around a stride-1 DPP)."""
        return self.geometry

    # the pool geometry, as in nn.MaxPool2d
    @property
    def kernel_size(self) -> Tuple[int, int]:
        return self.pool_geometry.kernel

    @property
    def stride(self) -> Tuple[int, int]:
        return self.pool_geometry.stride

    @property
    def padding(self):
        return self.pool_geometry.padding

    @property
    def ceil_mode(self) -> bool:
        return self.pool_geometry.ceil_mode

    @property
    def alpha(self) -> Tensor:
        """alpha = exp(theta_alpha), after the clamp the forward pass applies."""
        return torch.exp(self.theta_alpha.detach().clamp(max=THETA_ALPHA_MAX))

    @property
    def lam(self) -> Tensor:
        """lambda = exp(theta_lambda)."""
        return torch.exp(self.theta_lambda.detach())

    def reset_parameters(self) -> None:
        if isinstance(self.init, str):
            ta, tl = INIT_PRESETS[self.init]
        else:
            ta, tl = math.log(self.init[0]), math.log(self.init[1])
        with torch.no_grad():
            self.theta_alpha.fill_(ta)
            self.theta_lambda.fill_(tl)
            if self.guide_weight is not None:
                self.guide_weight.fill_(1.0 / (self.guide_weight.shape[-1] * self.guide_weight.shape[-2]))

    def no_weight_decay(self) -> set:
        """Names of the parameters that should not be weight-decayed (timm's optimizer factory reads this)."""
        return {'theta_alpha', 'theta_lambda'}

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling anything: one clear error instead of a
        # TorchScript frontend failure deep inside the functional (geometry objects, the custom op's dispatch)
        raise RuntimeError(
            'DPP2d does not support torch.jit.script (TorchScript is in maintenance mode upstream); use '
            'torch.jit.trace(model, example) for a TorchScript module, torch.compile(model) for speed, or '
            'torch.export.export(model, (example,)) / dpp_surgery.export_onnx for deployment')

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():
            # one warning that says what matters, instead of one per shape check of every layer
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', torch.jit.TracerWarning)
                size = tuple(int(s) for s in x.shape[-2:])
                out = self._layer(x)
            warnings.warn(f'torch.jit.trace: {type(self).__name__} resolves its windows from the traced input size '
                          f'({size} here), so the trace serves that size only; trace at the size you deploy, or use '
                          'torch.export / dpp_surgery.export_onnx for dynamic sizes', torch.jit.TracerWarning,
                          stacklevel=2)
            return out
        return self._layer(x)

    def _layer(self, x: Tensor) -> Tensor:
        """The whole layer: its DPP computation (:meth:`compute`), and in subclasses what surrounds it."""
        return self.compute(x)

    def compute(self, x: Tensor) -> Tensor:
        """The DPP computation of the layer's windows (the part ``export_onnx(mode='custom')`` writes as one
        ``DPP2d`` node: it replaces this method on the instance while exporting)."""
        return dpp2d(
            x, self.theta_alpha, self.theta_lambda, guide_weight=self.guide_weight, reward=self.reward,
            norm=self.norm, eps=self.eps, impl=self.impl, geometry=self.geometry)

    def extra_repr(self) -> str:
        text = (f'{self.channels}, {self.geometry.describe()}, guide={self.guide}, reward={self.reward}, '
                f'norm={self.norm}')
        if self.eps != DEFAULT_EPS:
            text += f', eps={self.eps}'
        return text


@register_notrace_module
class GlobalDPP2d(DPP2d):
    """DPP over the whole feature map: a global pool whose output is (N, C, 1, 1), for the global average pool of a
    classifier head (:func:`dpp_surgery.convert` with ``skip_global=False``).

    Its window is the input's whole spatial size at every call, so it takes any input size; it has the Lite guide
    (the map's mean) and the options of :class:`DPP2d` otherwise. Its ``geometry`` is a 1x1 placeholder that nothing
    reads: the export writes it as standard operators over the whole map in both modes (never as a fixed-window
    ``DPP2d`` node), with dynamic sizes.

    Example::

        >>> GlobalDPP2d(64)(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 1, 1])
    """

    def __init__(
            self,
            channels: int,
            reward: str = 'sym',
            norm: str = 'mean',
            init: Union[str, Tuple[float, float]] = 'paper',
            eps: float = DEFAULT_EPS,
            impl: str = 'auto',
            device=None,
            dtype=None,
    ):
        super().__init__(channels, kernel_size=1, stride=1, guide='lite', reward=reward, norm=norm, init=init, eps=eps,
                         impl=impl, device=device, dtype=dtype)

    def compute(self, x: Tensor) -> Tensor:
        if exporting():  # reductions over the map, nothing tied to its size: the file takes any input size
            return global_dpp2d(x, self.theta_alpha, self.theta_lambda, reward=self.reward, norm=self.norm,
                                eps=self.eps)
        return dpp2d(x, self.theta_alpha, self.theta_lambda, x.shape[-2:], 1, 0, reward=self.reward, norm=self.norm,
                     eps=self.eps, impl=self.impl)

    def extra_repr(self) -> str:
        text = f'{self.channels}, global, guide={self.guide}, reward={self.reward}, norm={self.norm}'
        if self.eps != DEFAULT_EPS:
            text += f', eps={self.eps}'
        return text


# the DPP2d options a dpp_aa_layer class may bake in (the geometry comes from timm's stride, or kernel_size below)
_AA_OPTIONS = ('guide', 'reward', 'norm', 'init', 'eps', 'impl')
_DPP2D_SIGNATURE = inspect.signature(DPP2d.__init__)
# options (as a sorted tuple of items) -> the class dpp_aa_layer made for them: one class per variant
_AA_CLASSES: Dict[Tuple[Tuple[str, Any], ...], type] = {}


class _AAClassMeta(type):
    """Metaclass of the classes :func:`dpp_aa_layer` makes: they pickle as the factory call that makes them."""


def _aa_class(key: Tuple[Tuple[str, Any], ...]) -> type:
    return dpp_aa_layer(**dict(key))


def _reduce_aa_class(cls: type):
    # a class made at run time cannot be found by name; pickle (torch.save(model): timm keeps aa_layer in the model's
    # _model_args) stores the options and calls the factory again when loading
    if '_aa_key' not in cls.__dict__:
        return cls.__qualname__  # the base class, by name
    return _aa_class, (cls._aa_key,)


copyreg.pickle(_AAClassMeta, _reduce_aa_class)


class _DPP2dAA(DPP2d, metaclass=_AAClassMeta):
    """Base of the classes :func:`dpp_aa_layer` makes: DPP2d with other defaults (``_aa_defaults``)."""

    _aa_defaults: Dict[str, Any] = {}

    def __init__(self, *args, **kwargs):
        given = _DPP2D_SIGNATURE.bind(self, *args, **kwargs).arguments
        given.pop('self')
        super().__init__(**{**self._aa_defaults, **given})


def dpp_aa_layer(
        guide: str = 'lite',
        reward: str = 'sym',
        norm: str = 'mean',
        init: Union[str, Tuple[float, float]] = 'paper',
        eps: float = DEFAULT_EPS,
        impl: str = 'auto',
        kernel_size: Optional[int] = None,
) -> Type[DPP2d]:
    """A DPP2d class for timm's ``aa_layer`` argument, with the variant's options as its defaults.

    ``timm.create_model(name, aa_layer=DPP2d)`` builds a DPP network with the default variant (Lite guide,
    symmetric reward, ``init='paper'``). timm's ResNet needs a class in that slot (it calls ``issubclass`` on it, so
    a ``functools.partial`` fails inside timm), hence this factory. The class is a subclass of :class:`DPP2d` (so
    ``isinstance``, :func:`dpp_surgery.dpp_layers`, :func:`param_groups` and the ONNX export see its layers), the
    same class for the same options, and its layers pickle (``torch.save(model)``, loaded with
    ``torch.load(path, weights_only=False)``; ``state_dict`` works as for any module). Arguments given when a layer
    is built override the baked-in defaults.

    Args:
        guide, reward, norm, init, eps, impl: the DPP2d options (see :class:`DPP2d`).
        kernel_size: ``None`` (default): windows of side ``stride``, ``ceil_mode=True``. An odd int ``k``: ``k x k``
            windows with padding ``k // 2`` at the stride, overlapping like ResNet's 3x3 stem max pool. Both give
            ``ceil(H / stride)``, the output size of the strided conv the layer follows, at every input size.

    Returns:
        A :class:`DPP2d` subclass whose constructor takes timm's ``(channels, stride=...)`` call.

    Raises:
        ValueError: an invalid option (checked here, before timm builds anything), or an even ``kernel_size``.

    Example::

        >>> model = timm.create_model('resnet18', aa_layer=dpp_aa_layer(guide='full', reward='asym', init='max'))
    """
    options: Dict[str, Any] = dict(guide=guide, reward=reward, norm=norm, init=init, eps=eps, impl=impl)
    if kernel_size is not None and (isinstance(kernel_size, bool) or not isinstance(kernel_size, int)
                                    or kernel_size < 1 or kernel_size % 2 == 0):
        raise ValueError(f'kernel_size must be None (windows of side stride) or an odd positive int (k x k windows '
                         f'with padding k // 2), so that the output is ceil(H / stride) at every size; got '
                         f'{kernel_size!r}')
    try:
        probe = DPP2d(1, **options)  # every option checked now, not inside timm's model constructor
    except TypeError as e:  # (timm's create_aa would retry a TypeError as aa_layer(stride), hiding it)
        raise ValueError(str(e)) from e
    options.update(guide=probe.guide, reward=probe.reward, norm=probe.norm, init=probe.init, eps=probe.eps,
                   impl=probe.impl)
    key = tuple(sorted({**options, 'kernel_size': kernel_size}.items()))
    cls = _AA_CLASSES.get(key)
    if cls is None:
        defaults = dict(options)
        if kernel_size is not None:
            defaults.update(kernel_size=kernel_size, padding=kernel_size // 2, ceil_mode=False)
        changed = [f'{k}={v!r}' for k, v in key if k in _AA_OPTIONS and v != _DPP2D_SIGNATURE.parameters[k].default]
        if kernel_size is not None:
            changed.append(f'kernel_size={kernel_size}')
        call = f'dpp_aa_layer({", ".join(changed)})'
        # named DPP2d, so that the layers print as DPP2d (their repr gives the variant); the qualname tells the classes
        cls = type('DPP2d', (_DPP2dAA,), {'_aa_defaults': defaults, '_aa_key': key, '__module__': __name__,
                                          '__qualname__': call, '__doc__': f"DPP2d for timm's aa_layer slot: {call}."})
        _AA_CLASSES[key] = register_notrace_module(cls)
    return cls


def dpp_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) of every DPP weighting parameter (theta_alpha, theta_lambda) in ``model``."""
    out = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, DPP2d):
            for pname in ('theta_alpha', 'theta_lambda'):
                out.append((f'{mod_name}.{pname}' if mod_name else pname, getattr(mod, pname)))
    return out


class LrScaleWarning(UserWarning):
    """:func:`param_groups` was called without ``lr``: the DPP group's ``lr_scale`` is honoured by timm's schedulers
    only, not by plain torch optimizers."""


def param_groups(
        model: nn.Module,
        weight_decay: float = 1e-4,
        dpp_lr_scale: float = 1.0,
        no_decay_1d: bool = True,
        skip_list: Iterable[str] = (),
        *,
        lr: Optional[float] = None,
) -> List[dict]:
    """Optimizer parameter groups with the DPP parameters free of weight decay and at their own learning rate.

    Three groups: parameters with weight decay; the model's other no-decay parameters (biases and norm weights when
    ``no_decay_1d``, as timm does, plus ``skip_list``); and the DPP ``theta_alpha``/``theta_lambda``, without weight
    decay. The Full guide filters are decayed like other conv weights. Empty groups are left out.

    With ``lr`` (recommended), every group carries its own ``lr``: the DPP group ``lr * dpp_lr_scale``, the others
    ``lr``, and no group has an ``lr_scale``. Any torch optimizer honours that, and schedulers (torch's or timm's)
    scale from those starting rates. Without ``lr``, the DPP group gets ``lr_scale=dpp_lr_scale``, which only timm's
    schedulers apply (they multiply a group's rate by its ``lr_scale``); a plain torch optimizer ignores it, so a
    scale other than 1 then warns (:class:`LrScaleWarning`). Never give both: timm's schedulers would apply the
    scale twice.

    Args:
        model: the (converted) model.
        weight_decay: weight decay of the first group.
        dpp_lr_scale: learning-rate multiplier of the DPP parameters (10 in the measured fine-tunes).
        no_decay_1d: put biases and other 1-D parameters (norm weights) in the no-decay group.
        skip_list: more parameter names for the no-decay group.
        lr: the base learning rate; see above.

    Raises:
        ValueError: ``dpp_lr_scale`` is not 1 but ``model`` has no DPP layers (convert it first), or ``lr`` or
            ``dpp_lr_scale`` is not a positive finite number.

    Example, a plain PyTorch loop with autocast and DDP (wrap after building the groups, or pass ``ddp.module``)::

        >>> model = dpp_surgery.convert(timm.create_model('resnet18', pretrained=True))
        >>> opt = torch.optim.SGD(param_groups(model, lr=0.02, weight_decay=1e-4, dpp_lr_scale=10), momentum=0.9)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)  # scales every group's own lr
        >>> ddp = torch.nn.parallel.DistributedDataParallel(model)  # under torchrun
        >>> with torch.autocast('cuda', dtype=torch.bfloat16):
        ...     loss = F.cross_entropy(ddp(images), labels)
        >>> loss.backward(); opt.step(); opt.zero_grad(); sched.step()
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    for name, value in (('dpp_lr_scale', dpp_lr_scale), ('lr', lr)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ValueError(f'{name} must be a positive finite number, but got {value!r}')
    dpp = {id(p) for _, p in dpp_parameters(model)}
    if not dpp and dpp_lr_scale != 1:
        raise ValueError(f'dpp_lr_scale={dpp_lr_scale} has nothing to scale: {type(model).__name__} has no DPP layers. '
                         'Convert the model first (model = dpp_surgery.convert(model)), or leave dpp_lr_scale at 1')
    if lr is None and dpp_lr_scale != 1:
        warnings.warn(f'param_groups(dpp_lr_scale={dpp_lr_scale}) without lr= sets the DPP group\'s lr_scale, which '
                      "only timm's schedulers apply: plain torch optimizers ignore it. Pass lr=BASE_LR to give every "
                      'group its own learning rate', LrScaleWarning, stacklevel=2)
    skip = set(skip_list)
    decay, no_decay, dpp_group = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in dpp:
            dpp_group.append(p)
        elif name in skip or (no_decay_1d and (p.ndim <= 1 or name.endswith('.bias'))):
            no_decay.append(p)
        else:
            decay.append(p)
    dpp_rate = {'lr_scale': dpp_lr_scale} if lr is None else {'lr': lr * dpp_lr_scale}
    base_rate = {} if lr is None else {'lr': lr}
    groups = [
        {'params': decay, 'weight_decay': weight_decay, **base_rate},
        {'params': no_decay, 'weight_decay': 0.0, **base_rate},
        {'params': dpp_group, 'weight_decay': 0.0, **dpp_rate},
    ]
    return [g for g in groups if g['params']]
