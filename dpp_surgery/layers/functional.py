"""Functional Detail-Preserving Pooling: argument checks, the pure-PyTorch path and the fused-kernel op.

See :class:`dpp_surgery.DPP2d` for the definition. Three implementations compute the same thing:

* the fused CPU kernel (``native/csrc/dpp2d.cpp``), registered as the CPU kernel of the custom op
  ``torch.ops.dpp_surgery.dpp2d`` with its own backward that recomputes from the input (used on CPU when it
  builds: float32/float64 inputs, and float16/bfloat16 ones on a float32 copy);
* the Triton kernels (``native/triton_dpp.py``), registered as the CUDA kernel of the same op (used for CUDA
  tensors of every float dtype, in their own dtype); with ``TRITON_INTERPRET=1`` they also run on CPU tensors
  through Triton's interpreter (``impl='triton'``, how the CPU-only tests run them);
* a pure-PyTorch composite of unfold and element-wise ops (any device, the fallback, the tested reference
  for the kernels, and what ONNX export and ``torch.fx`` see).
"""
from __future__ import annotations

import sys
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..native.kernel import (MAX_WINDOW, NORM_CODES, Dpp2dParams, Kernel, KernelBuildWarning, load_kernel, load_triton,
                     triton_status)
from ..utils import check_choice
from .geometry import PaddingArg, PoolGeometry, ResolvedGeometry

__all__ = [
    'dpp2d', 'global_dpp2d', 'torch_path', 'TORCH_FORMS', 'exporting', 'check_input', 'full_guide', 'DEFAULT_EPS',
    'THETA_ALPHA_MAX', 'GUIDES', 'REWARDS', 'NORMS', 'IMPLEMENTATIONS', 'NonFiniteParameterError',
]

DEFAULT_EPS = 1e-3  # added to the squared deviation, as in every path of the authors' code
THETA_ALPHA_MAX = 10.0  # the authors' graphs clamp theta_alpha <= 10
GUIDES = ('lite', 'full')
REWARDS = ('sym', 'asym')
NORMS = ('mean', 'none', 'sum')
IMPLEMENTATIONS = ('auto', 'kernel', 'triton', 'torch')


def check_input(x: Tensor, channels: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f'DPP2d expects a torch.Tensor input, but got {type(x).__name__}')
    if x.dim() != 4:
        hint = ' For one unbatched image, use x.unsqueeze(0).' if x.dim() == 3 else ''
        raise ValueError(f'DPP2d expects a 4-D input (N, C, H, W), but got shape {tuple(x.shape)}.{hint}')
    if x.shape[1] != channels:
        raise ValueError(
            f'DPP2d was built for {channels} channels, but the input has {x.shape[1]} (shape {tuple(x.shape)}). '
            f'Create the layer with channels={x.shape[1]}.')
    if not x.is_floating_point():
        raise TypeError(f'DPP2d expects a floating-point input, but got dtype {x.dtype}; use x.float().')


def _in_onnx_export() -> bool:
    # torch.onnx is heavy to import; if nothing imported it, nothing is exporting
    mod = sys.modules.get('torch.onnx')
    return mod is not None and mod.is_in_onnx_export()


def exporting() -> bool:
    """torch.export / ONNX export / jit tracing: DPP runs as standard ops (the fused kernel is CPU eager only)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or _in_onnx_export()


_exporting = exporting


class NonFiniteParameterError(ValueError):
    """A DPP parameter holds NaN or inf: training has diverged (a ValueError, so callers catching that still do)."""


def _parameter_error(name: str, bad: int, earlier: bool = False) -> NonFiniteParameterError:
    when = ' (found after an earlier call on the GPU, which checks without waiting for the device)' if earlier else ''
    return NonFiniteParameterError(
        f'DPP2d parameter {name} has {bad} non-finite value(s) (NaN or inf){when}. Training has probably '
        'diverged: lower the learning rate or reload a checkpoint.')


class _DeferredCheck:
    """The finiteness check of one parameter on an accelerator, without a host-device synchronisation.

    Each time the parameter changes (its version counter moves, as every optimizer step does), the count of
    non-finite values is computed on the device and copied into pinned host memory without waiting; a later
    call reads it once the device has finished (an event says when) and raises then. So a parameter that
    diverges is reported one or a few calls late, with the same message, and no call ever waits for the device.
    """

    __slots__ = ('version', 'ptr', 'count', 'event', 'bad')

    def __init__(self):
        self.version = self.ptr = self.count = self.event = None
        self.bad = 0

    def __call__(self, t: Tensor, name: str) -> None:
        current = (t._version, t.data_ptr())
        if self.event is not None and self.event.query():
            self.bad, self.event = int(self.count.item()), None  # (a host tensor: no device access)
        if self.bad and current == (self.version, self.ptr):
            raise _parameter_error(name, self.bad, earlier=True)  # until the parameter changes
        if current != (self.version, self.ptr) and self.event is None:
            self.event = self._start(t)
            self.version, self.ptr, self.bad = current[0], current[1], 0

    def _start(self, t: Tensor):
        """Queue the count of t's non-finite values into ``self.count``; the event that says it has arrived."""
        if self.count is None:
            self.count = torch.empty((), dtype=torch.int64, pin_memory=True)
        with torch.no_grad():
            self.count.copy_((~torch.isfinite(t.detach())).sum(), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(t.device))  # the stream the count was queued on
        return event


_DEFERRED = WeakIdKeyDictionary()  # parameter -> its _DeferredCheck


def _check_parameters(theta_alpha: Tensor, theta_lambda: Tensor, guide_weight: Optional[Tensor]) -> None:
    if torch.compiler.is_compiling() or _exporting():
        return  # data-dependent checks would break graphs; they run in eager mode
    for name, t in (('theta_alpha', theta_alpha), ('theta_lambda', theta_lambda), ('guide_weight', guide_weight)):
        if t is None:
            continue
        if t.device.type != 'cuda':
            if not bool(torch.isfinite(t).all()):
                raise _parameter_error(name, int((~torch.isfinite(t)).sum().item()))
        elif not torch.cuda.is_current_stream_capturing():  # (a CUDA graph being captured queues no check)
            check = _DEFERRED.get(t)
            if check is None:
                check = _DEFERRED[t] = _DeferredCheck()
            check(t, name)


def full_guide(x: Tensor, weight: Tensor, geometry: PoolGeometry, resolved: ResolvedGeometry) -> Tensor:
    """The Full-DPP guide: a depthwise (per-channel) filter, one value per output position.

    The filter has size :meth:`PoolGeometry.full_guide_kernel` (``k + 1`` for even ``k``, else ``k``) and the
    stride of the window; it starts ``kg - k`` positions before the window. For the 2x2/stride-2 window this is
    the authors' 3x3, stride-2, padding-1 depthwise convolution; other geometries follow the same rule, with
    zero padding as needed and the result cropped to the pooling output size.
    """
    kgh, kgw = weight.shape[-2:]
    kh, kw = geometry.kernel
    sh, sw = geometry.stride
    oh, ow = resolved.out_size
    h, w = x.shape[-2:]
    if x.shape[1] == 0:  # no channels: conv2d refuses groups=0; an empty guide (and an empty weight gradient)
        return x.new_zeros(x.shape[0], 0, oh, ow) + weight.sum().to(x.dtype)
    top = resolved.pad_top + (kgh - kh)
    left = resolved.pad_left + (kgw - kw)
    bottom = (oh - 1) * sh + kgh - h - top  # negative: crop
    right = (ow - 1) * sw + kgw - w - left
    with torch.autocast(x.device.type, enabled=False):  # the guide keeps the dtype DPP computes in
        if not _exporting() and bottom <= top and right <= left:
            # conv2d's own symmetric padding covers it (no padded copy of x); extra outputs are cropped. Rows and
            # columns that no output reads (floor mode) are cut off first: a cropped output reading a NaN there
            # would still make the weight's gradient NaN (its zero gradient times NaN)
            if bottom < 0 or right < 0:
                x = x[:, :, :h + min(bottom, 0), :w + min(right, 0)]
            g = F.conv2d(x, weight.to(x.dtype), stride=(sh, sw), padding=(top, left), groups=x.shape[1])
        else:
            g = F.conv2d(F.pad(x, (left, right, top, bottom)), weight.to(x.dtype), stride=(sh, sw),
                         groups=x.shape[1])
    return g[:, :, :oh, :ow]


def _nonfinite_guard(guide: Tensor) -> Tensor:
    """``guide * 0``: zero where the guide is finite, NaN where it is NaN or infinite (no data-dependent branch, no
    host-device synchronisation). Every guide value reads its whole window (the Lite guide is its mean, the Full
    guide's filter covers it and reaches further), so added to a window's weight sum it makes exactly the outputs
    whose computation read a non-finite input NaN where the clamps and the asymmetric reward's ``max(0, .)`` would
    leave the weights finite (a guide of +inf makes every deviation -inf, which the asymmetric reward clamps to 0).
    Adding a zero leaves the other outputs bit for bit. In the backward pass it passes ``0 * grad`` to the guide:
    NaN from a NaN output (so the positions the Full guide's filter reads get NaN gradients even where ``max(0, .)``
    passes none), a zero, which changes no sum, from the others."""
    return guide * 0


_BASE_LIMIT = 1.0 + 2.0 ** -10  # (1 + 2^-10)^(lambda/2) overflows float32 only for lambda above 1.8e5


def _pooled(
        x: Tensor,
        guide: Optional[Tensor],
        alpha: Tensor,
        lam: Tensor,
        r: ResolvedGeometry,
        asym: bool,
        norm: str,
        eps: float,
) -> Tensor:
    """Pure-PyTorch DPP for windows that tile the input (kernel == stride), by pooling at full resolution.

    Window means are average pools (their 1/K cancels in the output), the window maximum a max pool, and
    per-window values go back to the window by nearest-neighbour upsampling; the rest is element-wise: a short
    chain of standard ops, with no (N, C, K, OH, OW) stack of the windows, that runtimes and torch.compile fuse.

    Each window's weights ``alpha + (y / m)^(lambda/2)`` are scaled by the common factor ``(m / M)^(lambda/2)``,
    with ``M`` the larger of the window's largest ``y`` and ``m``, which the output does not depend on: every
    power then has a base of at most 1 (finite weights, the max-shift of the other paths in closed form). ``M`` is
    treated as a constant for autograd, as the shift is. Positions that padding, 'same' or ceil_mode add carry a
    mask; without those the pads only crop what floor mode leaves out.
    """
    kh, kw = r.kernel
    pads = (r.pad_left, r.pad_right, r.pad_top, r.pad_bottom)

    def pool(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, (kh, kw))

    def up(t: Tensor) -> Tensor:
        return F.interpolate(t, scale_factor=(kh, kw), mode='nearest')

    masked = r.reaches_out
    # (F.pad with the resolved pads, also where they only crop: torch.export keeps its sizes dynamic, which a
    # slice or a remainder would specialise to the example's)
    xp = F.pad(x, pads)  # (zero padding, or a crop)
    if masked:
        valid = F.pad(torch.ones_like(x[:1, :1]), pads)
        share = pool(valid)  # valid share of each window
    if guide is None:
        guide = pool(xp) / share if masked else pool(xp)  # (xp is zero on padding)
    d = xp - up(guide)
    if asym:
        d = d.clamp_min(0)
    y = d * d + eps
    yv = y * valid if masked else y  # (y >= eps inside: padding never holds a window's maximum)
    hl = (lam * 0.5).view(1, -1, 1, 1)
    a0 = alpha.view(1, -1, 1, 1)
    if norm == 'sum':
        m = pool(yv) * (kh * kw)
        big = m.detach()  # the sum is at least the maximum
        a = a0 if _exporting() else a0 * torch.pow(m / big, hl)  # (= alpha; the factor carries m's gradient)
    else:
        big = F.max_pool2d(yv, (kh, kw)).detach()
        if norm == 'none':
            big = big.clamp_min(1.0)
            a = a0 * torch.pow(1.0 / big, hl)
        else:
            m = pool(yv) / share if masked else pool(yv)
            a = a0 * torch.pow(m / big, hl)
    big = up(big)
    ratio = y / big
    if masked:
        # padding may exceed the window's maximum: a clamp just above 1 keeps its power finite, and the mask zeroes
        # it (inside a window every y is at most its maximum: the clamp never binds, and a base of exactly 1, the
        # maximum's own, keeps its gradient)
        rw = torch.pow(ratio.clamp_max(_BASE_LIMIT), hl) * valid
    else:
        rw = torch.pow(ratio, hl)
    num = a * pool(xp) + pool(rw * xp)
    den = a * share + pool(rw) if masked else a + pool(rw)
    return num / (den + _nonfinite_guard(guide))


def _reference(
        x: Tensor,
        guide: Optional[Tensor],
        alpha: Tensor,
        lam: Tensor,
        r: ResolvedGeometry,
        asym: bool,
        norm: str,
        eps: float,
) -> Tensor:
    """Pure-PyTorch DPP (any device, autograd by PyTorch, exportable): over the stacked windows (:func:`_stacked`),
    or by pooling (:func:`_pooled`) for windows that tile the input where that form is the faster one: when
    exporting (a short chain of standard operators) and, with the Lite guide, under ``torch.compile``, whose fused
    code runs it faster than the stacked form (``python -m dpp_surgery.bench layer --compile`` times both). In eager
    PyTorch the stacked form is faster and lighter."""
    if r.kernel == r.stride and (_exporting() or (guide is None and torch.compiler.is_compiling())):
        return _pooled(x, guide, alpha, lam, r, asym, norm, eps)
    return _stacked(x, guide, alpha, lam, r, asym, norm, eps)


def _stacked(
        x: Tensor,
        guide: Optional[Tensor],
        alpha: Tensor,
        lam: Tensor,
        r: ResolvedGeometry,
        asym: bool,
        norm: str,
        eps: float,
) -> Tensor:
    """Pure-PyTorch DPP over the windows stacked on one axis, (N, C, K, OH, OW): any geometry."""
    n, c, h, w = x.shape
    (kh, kw), (oh, ow) = r.kernel, r.out_size
    k = kh * kw
    pads = (r.pad_left, r.pad_right, r.pad_top, r.pad_bottom)

    def windows(t: Tensor) -> Tensor:
        # (N, C, K, OH, OW) by reshapes for windows that tile the input and strided slices otherwise: standard ops
        # that export to ONNX as Slice, not a gather per element
        tp = F.pad(t, pads)
        (sh, sw) = r.stride
        if (kh, kw) == (sh, sw):
            tp = tp[:, :, :oh * sh, :ow * sw]
            return tp.reshape(t.shape[0], t.shape[1], oh, kh, ow, kw).permute(0, 1, 3, 5, 2, 4).reshape(
                t.shape[0], t.shape[1], k, oh, ow)
        parts = [tp[:, :, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw] for i in range(kh) for j in range(kw)]
        return torch.stack(parts, 2)

    cols = windows(x)  # (N, C, K, OH, OW)
    valid = windows(torch.ones_like(x[:1, :1])) > 0  # (1, 1, K, OH, OW)
    count = valid.sum(2, dtype=x.dtype)
    if guide is None:
        guide = (cols * valid).sum(2) / count
    d = cols - guide.unsqueeze(2)
    if asym:
        d = d.clamp_min(0)
    y = d * d + eps
    lu = torch.log(y)
    if norm != 'none':
        m = (y * valid).sum(2)
        if norm == 'mean':
            m = m / count
        lu = lu - torch.log(m).unsqueeze(2)
    hl = (lam * 0.5).view(1, c, 1, 1, 1)
    lr = torch.where(valid, hl * lu, torch.full_like(lu, float('-inf')))
    # All weights share the factor exp(-shift); the output does not depend on it, and it keeps them finite.
    shift = lr.amax(2).clamp_min(0).detach()
    wts = (alpha.view(1, c, 1, 1) * torch.exp(-shift)).unsqueeze(2) * valid + torch.exp(lr - shift.unsqueeze(2))
    return (wts * cols).sum(2) / (wts.sum(2) + _nonfinite_guard(guide))


TORCH_FORMS = ('pooled', 'stacked')


def torch_path(layer, x: Tensor, form: str) -> Tensor:
    """``layer``'s (a :class:`~dpp_surgery.DPP2d`) output computed on the pure-PyTorch path in the given form:
    ``'pooled'`` (:func:`_pooled`, windows that tile the input only) or ``'stacked'`` (:func:`_stacked`, any
    geometry), whichever form the layer itself would pick. For comparing the two (``bench layer --compile`` times
    both under torch.compile: the pooled form is what the PyTorch path runs with the Lite guide there, the stacked
    form with the Full guide)."""
    form = check_choice(form, 'form', TORCH_FORMS)
    r = layer.geometry.resolve(x.shape[-2], x.shape[-1])
    if form == 'pooled' and r.kernel != r.stride:
        raise ValueError(f'the pooled form needs windows that tile the input (kernel == stride), but the layer has '
                         f'kernel {r.kernel} and stride {r.stride}; use form=\'stacked\'')
    xa, guide, alpha, lam = _operands(x, layer.theta_alpha, layer.theta_lambda, layer.guide_weight, layer.geometry, r)
    fn = _pooled if form == 'pooled' else _stacked
    return fn(xa, guide, alpha, lam, r, layer.reward == 'asym', layer.norm, layer.eps).to(x.dtype)


def global_dpp2d(x: Tensor, theta_alpha: Tensor, theta_lambda: Tensor, reward: str = 'sym', norm: str = 'mean',
                 eps: float = DEFAULT_EPS) -> Tensor:
    """DPP over the whole map, (N, C, H, W) -> (N, C, 1, 1), with the Lite guide (the map's mean): what
    :class:`~dpp_surgery.GlobalDPP2d` computes, written as reductions over the spatial axes so that nothing depends
    on H or W. This is the form torch.export and ONNX export record, so the file takes any input size; it computes
    the weights as :func:`_stacked` does (log-space, shifted by their maximum)."""
    reward = check_choice(reward, 'reward', REWARDS)
    norm = check_choice(norm, 'norm', NORMS)
    check_input(x, theta_alpha.shape[0])
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    c = xa.shape[1]
    alpha = torch.exp(theta_alpha.clamp(max=THETA_ALPHA_MAX)).to(acc).view(1, c, 1, 1)
    hl = (torch.exp(theta_lambda).to(acc) * 0.5).view(1, c, 1, 1)
    guide = xa.mean((2, 3), keepdim=True)
    d = xa - guide
    if reward == 'asym':
        d = d.clamp_min(0)
    y = d * d + eps
    lu = torch.log(y)
    if norm != 'none':
        m = y.sum((2, 3), keepdim=True) if norm == 'sum' else y.mean((2, 3), keepdim=True)
        lu = lu - torch.log(m)
    lr = hl * lu
    shift = lr.amax((2, 3), keepdim=True).clamp_min(0).detach()
    wts = alpha * torch.exp(-shift) + torch.exp(lr - shift)
    out = (wts * xa).sum((2, 3), keepdim=True) / (wts.sum((2, 3), keepdim=True) + _nonfinite_guard(guide))
    return out.to(x.dtype)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


_MIN_CHANNELS_LAST = 16  # below this many channels, the kernel's channels_last lanes are too few to pay off


def _kernel_layout(x: Tensor) -> torch.memory_format:
    """The layout the kernel computes in: channels_last only for channels_last inputs with enough channels."""
    fmt = _memory_format(x)
    if fmt == torch.channels_last and x.shape[1] < _MIN_CHANNELS_LAST:
        return torch.contiguous_format
    return fmt


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _check_kernel_dtypes(x: Tensor, *others: Optional[Tensor]) -> None:
    # the kernel reads raw pointers: every tensor must be a CPU tensor of x's dtype
    if x.dtype not in (torch.float32, torch.float64) or x.device.type != 'cpu':
        raise TypeError(f'the DPP kernel takes CPU float32/float64 tensors, but got {x.dtype} on {x.device}')
    for t in others:
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f'the DPP kernel needs all tensors in {x.dtype} on {x.device}, but got {t.dtype} on '
                            f'{t.device}')


def _kernel_inputs(x: Tensor, guide: Optional[Tensor], alpha: Tensor, lam: Tensor, geometry: Sequence[int],
                   asym: bool, norm: int, eps: float, grad: Optional[Tensor] = None):
    """Checked, contiguous kernel inputs in the layout the kernel computes in, plus the kernel's parameters
    (geometry: kh, kw, sh, sw, pt, pl, oh, ow) and the layout the results go back in (x's own)."""
    _check_kernel_dtypes(x, guide, alpha, lam, grad)
    out_fmt, fmt = _memory_format(x), _kernel_layout(x)
    x = x.contiguous(memory_format=fmt)
    guide = None if guide is None else guide.contiguous(memory_format=fmt)
    grad = None if grad is None else grad.contiguous(memory_format=fmt)
    channels_last = fmt == torch.channels_last and not x.is_contiguous()
    n, c, h, w = x.shape
    kh, kw, sh, sw, pt, pl, oh, ow = geometry
    params = Dpp2dParams(N=n, C=c, H=h, W=w, OH=oh, OW=ow, kh=kh, kw=kw, sh=sh, sw=sw, pt=pt, pl=pl, asym=int(asym),
                         norm=norm, channels_last=int(channels_last), threads=torch.get_num_threads(), eps=eps)
    return x, guide, alpha.contiguous(), lam.contiguous(), grad, params, fmt, out_fmt


def _kernel() -> Kernel:
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError('the fused DPP kernel is not available; use impl="torch"')
    return kernel


@torch.library.custom_op('dpp_surgery::dpp2d', mutates_args=())
def _dpp2d_op(
        x: Tensor, guide: Optional[Tensor], alpha: Tensor, lam: Tensor, geometry: List[int], asym: bool, norm: int,
        eps: float,
) -> Tensor:
    x, guide, alpha, lam, _, params, fmt, out_fmt = _kernel_inputs(x, guide, alpha, lam, geometry, asym, norm, eps)
    out = torch.empty(x.shape[0], x.shape[1], geometry[6], geometry[7], dtype=x.dtype, memory_format=fmt)
    _kernel().forward(params, x.data_ptr(), _ptr(guide), alpha.data_ptr(), lam.data_ptr(), out.data_ptr(),
                      f64=x.dtype == torch.float64)
    return out.contiguous(memory_format=out_fmt)


@_dpp2d_op.register_fake
def _(x, guide, alpha, lam, geometry, asym, norm, eps):
    out = x.new_empty(x.shape[0], x.shape[1], geometry[6], geometry[7])
    return out.contiguous(memory_format=_memory_format(x))


@torch.library.custom_op('dpp_surgery::dpp2d_backward', mutates_args=())
def _dpp2d_backward_op(
        grad: Tensor, x: Tensor, guide: Optional[Tensor], alpha: Tensor, lam: Tensor, geometry: List[int],
        asym: bool, norm: int, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    x, guide, alpha, lam, grad, params, fmt, out_fmt = _kernel_inputs(x, guide, alpha, lam, geometry, asym, norm,
                                                                      eps, grad)
    n, c = x.shape[:2]
    grad_x = torch.zeros_like(x, memory_format=fmt)
    grad_guide = torch.empty_like(guide, memory_format=fmt) if guide is not None else x.new_empty(0)
    ga = x.new_empty(n, c)
    gl = x.new_empty(n, c)
    _kernel().backward(params, x.data_ptr(), _ptr(guide), alpha.data_ptr(), lam.data_ptr(), grad.data_ptr(),
                       grad_x.data_ptr(), _ptr(grad_guide) if guide is not None else None, ga.data_ptr(),
                       gl.data_ptr(), f64=x.dtype == torch.float64)
    if guide is not None:
        grad_guide = grad_guide.contiguous(memory_format=out_fmt)
    return grad_x.contiguous(memory_format=out_fmt), grad_guide, ga.sum(0), gl.sum(0)


@_dpp2d_backward_op.register_fake
def _(grad, x, guide, alpha, lam, geometry, asym, norm, eps):
    fmt = _memory_format(x)
    grad_guide = torch.empty_like(guide, memory_format=fmt) if guide is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=fmt), grad_guide, alpha.new_empty(alpha.shape), lam.new_empty(lam.shape)


def _setup_context(ctx, inputs, output):
    x, guide, alpha, lam, geometry, asym, norm, eps = inputs
    ctx.save_for_backward(x, guide, alpha, lam)
    ctx.args = (geometry, asym, norm, eps)
    ctx.has_guide = guide is not None


def _backward(ctx, grad):
    x, guide, alpha, lam = ctx.saved_tensors
    gx, gg, ga, gl = _dpp2d_backward_op(grad, x, guide, alpha, lam, *ctx.args)
    return gx, (gg if ctx.has_guide else None), ga, gl, None, None, None, None


_dpp2d_op.register_autograd(_backward, setup_context=_setup_context)


def _triton_kernels():
    module = load_triton()
    if module is None:
        raise RuntimeError(f'the Triton DPP kernels are not available ({triton_status()["error"]}); '
                           'install Triton (it ships with the CUDA wheels of PyTorch) or use impl="torch"')
    return module


@_dpp2d_op.register_kernel('cuda')
def _(x, guide, alpha, lam, geometry, asym, norm, eps):
    return _triton_kernels().forward(x, guide, alpha, lam, geometry, asym, norm, eps)


@_dpp2d_backward_op.register_kernel('cuda')
def _(grad, x, guide, alpha, lam, geometry, asym, norm, eps):
    return _triton_kernels().backward(grad, x, guide, alpha, lam, geometry, asym, norm, eps)


class _InterpretedTriton(torch.autograd.Function):
    """The Triton kernels on CPU tensors through Triton's interpreter (``impl='triton'`` with TRITON_INTERPRET=1):
    the same forward and backward calls as the op's CUDA kernels, with the op's autograd contract."""

    @staticmethod
    def forward(ctx, *args):
        _setup_context(ctx, args, None)
        return _triton_kernels().forward(*args)

    @staticmethod
    def backward(ctx, grad):
        x, guide, alpha, lam = ctx.saved_tensors
        gx, gg, ga, gl = _triton_kernels().backward(grad, x, guide, alpha, lam, *ctx.args)
        return gx, (gg if ctx.has_guide else None), ga, gl, None, None, None, None


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned_no_triton = False


def _triton_refusal(x: Tensor, window: int) -> Optional[str]:
    """Why the Triton kernels cannot run on x, or None if they can."""
    if _exporting():
        return 'torch.export, ONNX export and torch.jit.trace record DPP as standard operators'
    if window > MAX_WINDOW:
        return f'the window has {window} positions and the kernels take at most {MAX_WINDOW}'
    if x.dtype not in _TRITON_DTYPES:
        return f'the kernels take float16/bfloat16/float32/float64 inputs, not {x.dtype}'
    if x.device.type not in ('cuda', 'cpu'):
        return f'Triton runs on CUDA devices, not {x.device.type}'
    module = load_triton()
    if module is None:
        return f'Triton cannot be imported ({triton_status()["error"]})'
    if x.device.type == 'cpu' and not module.INTERPRETED:
        return ('CPU tensors run the Triton kernels only through Triton\'s interpreter: set TRITON_INTERPRET=1 in '
                'the environment before the first DPP2d call of the process')
    return None


def _choose(x: Tensor, r: ResolvedGeometry, impl: str) -> str:
    """The implementation that runs: 'kernel' (CPU), 'triton' (CUDA, or CPU through the interpreter) or 'torch'."""
    global _warned_no_triton
    if impl == 'torch':
        return 'torch'
    window = r.kernel[0] * r.kernel[1]
    if impl == 'triton' or (impl == 'auto' and x.device.type == 'cuda'):
        reason = _triton_refusal(x, window)
        if reason is None:
            return 'triton'
        if impl == 'triton':
            raise RuntimeError(f'impl="triton" cannot run here: {reason}. Use impl="auto" to fall back to the '
                               'PyTorch path where the kernels do not apply.')
        if load_triton() is None and not _warned_no_triton:
            _warned_no_triton = True
            warnings.warn(f'DPP2d on CUDA: {reason}; using the slower pure-PyTorch path', KernelBuildWarning,
                          stacklevel=3)
        return 'torch'
    kernel = None
    # (float16/bfloat16 inputs, autocast's, run on a float32 copy: the kernel's float32 arithmetic, which the
    # PyTorch path would also compute in, at a fraction of its time and memory)
    if x.device.type == 'cpu' and x.is_floating_point() and not _exporting():
        kernel = load_kernel()
    ok = kernel is not None and window <= kernel.max_window
    if impl == 'kernel' and not ok:
        raise RuntimeError(
            f'impl="kernel" needs a CPU input, a window of at most {MAX_WINDOW} positions '
            'and a built kernel (see dpp_surgery.kernel_status()); use impl="auto" to fall back to the PyTorch path.')
    return 'kernel' if ok else 'torch'


def _operands(input: Tensor, theta_alpha: Tensor, theta_lambda: Tensor, guide_weight: Optional[Tensor],
              geometry: PoolGeometry, r: ResolvedGeometry, copy: bool = True):
    """(x, guide, alpha, lambda) as every implementation takes them. The arithmetic is float32 (float64 for
    float64); with ``copy`` (the CPU kernel and the PyTorch path) the activation is a float32 copy of a
    float16/bfloat16 one, without it (the Triton kernels) it stays in its own dtype, as does the Full guide."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(acc) if copy else input
    alpha = torch.exp(theta_alpha.clamp(max=THETA_ALPHA_MAX)).to(acc)
    lam = torch.exp(theta_lambda).to(acc)
    guide = None if guide_weight is None else full_guide(x, guide_weight, geometry, r)
    return x, guide, alpha, lam


def dpp2d(
        input: Tensor,
        theta_alpha: Tensor,
        theta_lambda: Tensor,
        kernel_size: Union[int, Tuple[int, int]] = 2,
        stride: Union[int, Tuple[int, int], None] = None,
        padding: PaddingArg = 0,
        ceil_mode: bool = False,
        guide_weight: Optional[Tensor] = None,
        reward: str = 'sym',
        norm: str = 'mean',
        eps: float = DEFAULT_EPS,
        impl: str = 'auto',
        geometry: Optional[PoolGeometry] = None,
) -> Tensor:
    """Detail-Preserving Pooling. See :class:`~dpp_surgery.DPP2d` for details.

    Args:
        input: (N, C, H, W) tensor.
        theta_alpha: (C,) log of alpha (clamped at ``THETA_ALPHA_MAX``).
        theta_lambda: (C,) log of lambda.
        kernel_size, stride, padding, ceil_mode: window geometry as in ``F.max_pool2d``; ``padding='same'``
            for timm's dynamic 'same' padding. Ignored when ``geometry`` is given.
        guide_weight: (C, 1, kg, kg) Full-guide filter, or None for the Lite guide (window mean).
        reward: 'sym' or 'asym'.
        norm: window normalisation of the squared deviation: 'mean' (default), 'none' or 'sum'.
        eps: added to the squared deviation.
        impl: 'auto' (the CPU kernel for CPU tensors, float16/bfloat16 on a float32 copy, the Triton kernels for
            CUDA tensors, else pure PyTorch), 'kernel' (require the CPU kernel), 'triton' (require the Triton kernels: CUDA tensors, or CPU
            tensors with ``TRITON_INTERPRET=1``) or 'torch' (pure PyTorch). Each required kernel raises a
            RuntimeError naming why where it cannot run (windows over 64 positions, export, a missing build).
        geometry: a prebuilt :class:`PoolGeometry` (what DPP2d passes).
    """
    reward = check_choice(reward, 'reward', REWARDS)
    norm = check_choice(norm, 'norm', NORMS)
    impl = check_choice(impl, 'impl', IMPLEMENTATIONS)
    check_input(input, theta_alpha.shape[0])
    if theta_lambda.shape != theta_alpha.shape:
        raise ValueError(f'theta_lambda must have shape {tuple(theta_alpha.shape)}, but got '
                         f'{tuple(theta_lambda.shape)}')
    if geometry is None:
        geometry = PoolGeometry.create(kernel_size, stride, padding, ceil_mode)
    if guide_weight is not None:
        expected = (input.shape[1], 1, *geometry.full_guide_kernel())
        if tuple(guide_weight.shape) != expected:
            raise ValueError(f'guide_weight must have shape {expected}, but got {tuple(guide_weight.shape)}')
    _check_parameters(theta_alpha, theta_lambda, guide_weight)
    r = geometry.resolve(input.shape[-2], input.shape[-1])

    asym = reward == 'asym'
    chosen = _choose(input, r, impl)
    x, guide, alpha, lam = _operands(input, theta_alpha, theta_lambda, guide_weight, geometry, r,
                                     copy=chosen != 'triton')
    if chosen == 'torch':
        return _reference(x, guide, alpha, lam, r, asym, norm, eps).to(input.dtype)
    args = (x, guide, alpha, lam,
            [r.kernel[0], r.kernel[1], r.stride[0], r.stride[1], r.pad_top, r.pad_left, r.out_size[0], r.out_size[1]],
            asym, NORM_CODES[norm], float(eps))
    if chosen == 'triton' and x.device.type == 'cpu':
        return _InterpretedTriton.apply(*args)
    return torch.ops.dpp_surgery.dpp2d(*args).to(input.dtype)
