"""Detail-Preserving Pooling (DPP) layer.

F. Saeedan, N. Weber, M. Goesele, S. Roth, "Detail-Preserving Pooling in Deep Networks", CVPR 2018
(arXiv:1804.04076). Checked against a float64 loop reference written from the paper's equations and against
the authors' Lua Torch graphs and CUDA layer for the paper-vs-code choices (see ``norm``).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, List, Tuple, Union

import torch
from torch import Tensor, nn

from ..utils import check_choice
from .functional import DEFAULT_EPS, GUIDES, IMPLEMENTATIONS, NORMS, REWARDS, THETA_ALPHA_MAX, dpp2d
from .geometry import PaddingArg, PoolGeometry

__all__ = ['DPP2d', 'INIT_PRESETS', 'param_groups', 'dpp_parameters']

# init preset -> (theta_alpha, theta_lambda); alpha = exp(theta_alpha), lambda = exp(theta_lambda).
# Closeness to average / max pooling is measured by `python -m dpp_surgery.bench init` (table in README).
INIT_PRESETS: Dict[str, Tuple[float, float]] = {
    'paper': (0.0, 0.0),  # alpha = lambda = 1, the authors' CUDA layer
    'avg': (0.0, -6.0),  # lambda = 0.0025: every weight within ~1% of the others, so nearly average pooling
    'max': (-10.0, 3.0),  # with reward='asym': alpha = 4.5e-5, lambda = 20: the largest activation dominates
}


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

    On the CPU, a fused kernel that is built on first use (see :func:`dpp_surgery.kernel_status`) runs float32
    and float64 inputs, and float16/bfloat16 ones (autocast's) on a float32 copy. On CUDA, every float dtype runs fused Triton kernels (windows of up to 64
    positions) that load and store the activation in its own dtype and compute in float32, with a backward that
    recomputes from the input. Elsewhere a pure-PyTorch path computes the same values; it computes float16 and
    bfloat16 inputs in float32 and returns them in their own dtype.

    Args:
        channels: number of input channels C.
        kernel_size: window size, int or pair. Default 2.
        stride: window stride; defaults to ``kernel_size``.
        padding: implicit padding (int or pair, at most half the kernel) or ``'same'``.
        ceil_mode: use ceil instead of floor for the output size, as in ``nn.MaxPool2d``.
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
    """

    def __init__(
            self,
            channels: int,
            kernel_size: Union[int, Tuple[int, int]] = 2,
            stride: Union[int, Tuple[int, int], None] = None,
            padding: PaddingArg = 0,
            ceil_mode: bool = False,
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

    # the pool geometry, as in nn.MaxPool2d
    @property
    def kernel_size(self) -> Tuple[int, int]:
        return self.geometry.kernel

    @property
    def stride(self) -> Tuple[int, int]:
        return self.geometry.stride

    @property
    def padding(self):
        return self.geometry.padding

    @property
    def ceil_mode(self) -> bool:
        return self.geometry.ceil_mode

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
                out = self._forward(x)
            warnings.warn(f'torch.jit.trace: DPP2d resolves its windows from the traced input size ({size} here), '
                          'so the trace serves that size only; trace at the size you deploy, or use torch.export / '
                          'dpp_surgery.export_onnx for dynamic sizes', torch.jit.TracerWarning, stacklevel=2)
            return out
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        return dpp2d(
            x, self.theta_alpha, self.theta_lambda, guide_weight=self.guide_weight, reward=self.reward,
            norm=self.norm, eps=self.eps, impl=self.impl, geometry=self.geometry)

    def extra_repr(self) -> str:
        text = (f'{self.channels}, {self.geometry.describe()}, guide={self.guide}, reward={self.reward}, '
                f'norm={self.norm}')
        if self.eps != DEFAULT_EPS:
            text += f', eps={self.eps}'
        return text


def dpp_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) of every DPP weighting parameter (theta_alpha, theta_lambda) in ``model``."""
    out = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, DPP2d):
            for pname in ('theta_alpha', 'theta_lambda'):
                out.append((f'{mod_name}.{pname}' if mod_name else pname, getattr(mod, pname)))
    return out


def param_groups(
        model: nn.Module,
        weight_decay: float = 1e-4,
        dpp_lr_scale: float = 1.0,
        no_decay_1d: bool = True,
        skip_list: Iterable[str] = (),
) -> List[dict]:
    """Optimizer parameter groups with the DPP parameters free of weight decay.

    Three groups: parameters with weight decay; the model's other no-decay parameters (biases and norm
    weights when ``no_decay_1d``, as timm does, plus ``skip_list``); and the DPP ``theta_alpha``/``theta_lambda``,
    without weight decay and with ``lr_scale=dpp_lr_scale`` (timm's schedulers honour ``lr_scale``).
    The Full guide filters are decayed like other conv weights. Empty groups are left out.

    Example::

        >>> opt = torch.optim.SGD(param_groups(model, weight_decay=1e-4), lr=0.1, momentum=0.9)
    """
    dpp = {id(p) for _, p in dpp_parameters(model)}
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
    groups = [
        {'params': decay, 'weight_decay': weight_decay},
        {'params': no_decay, 'weight_decay': 0.0},
        {'params': dpp_group, 'weight_decay': 0.0, 'lr_scale': dpp_lr_scale},
    ]
    return [g for g in groups if g['params']]
