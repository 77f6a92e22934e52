"""DPP2d written directly in standard ONNX operators: what a decomposed file has in place of each ``dpp_surgery.DPP2d``
node, and the body of every DPP2d function in a custom file.

Written, not traced: a layer is a few dozen nodes built in milliseconds, where tracing the PyTorch composite through
torch.export and the ONNX exporter took seconds per configuration and left the exporter's size arithmetic in the
graph. The mathematics is the PyTorch path's (:func:`dpp_surgery.layers.functional._reference`, checked against it in
onnxruntime):

* the K positions of every window go on one axis: in decomposed files by one grouped ``Conv`` with one-hot filters
  (exact copies; it pads symmetrically and drops what floor mode leaves out, so a layer without padding needs no
  size arithmetic at all), in function bodies, which serve any channel count, by ``SpaceToDepth`` (square windows
  that tile the input) or one strided ``Slice`` per position;
* guide, window sums and maxima are reductions over that axis, the weights element-wise ``Sub``/``Mul``/``Log``/
  ``Exp`` (Pow with a per-channel exponent runs element by element in runtimes);
* every base of a power is at most 1 (finite weights): the weights ``alpha + (y / m)^(lambda/2)`` of a window are
  scaled by ``(m / M)^(lambda/2)``, with ``M`` the window's largest ``y``, or, where the parameters are constants and
  lambda allows (the lean form, :class:`_Weights`), by the window sum, which makes the alpha term a constant;
* padded positions carry ``y = 0`` (weight 0) by a mask, except for 2x2 windows with the Lite guide and the 'mean' or
  'none' norm, where edge padding repeats the one valid row or column of a window that reaches out, which leaves
  DPP unchanged (so ceil_mode and 'same' layers need no mask either).

A 2x2 layer without padding is 20 nodes with dynamic sizes; the operators used are :data:`DECOMPOSED_OPS`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..layers import PoolGeometry
from ..layers.functional import THETA_ALPHA_MAX

if TYPE_CHECKING:
    from .settings import DPPNodeSettings

__all__ = ['Emitter', 'emit_dpp', 'DECOMPOSED_OPS', 'FUNCTION_OPS']

# Every ONNX operator (default domain) the decomposition uses, over every variant, norm and geometry, with dynamic
# or fixed sizes (tests/test_export.py keeps this list exact): what a runtime must support to run a decomposed file,
# beyond the model's own operators.
DECOMPOSED_OPS = frozenset({
    'Add', 'Concat', 'ConstantOfShape', 'Conv', 'Div', 'Exp', 'Log', 'Max', 'Min', 'Mul', 'Pad', 'Pow', 'ReduceMax',
    'ReduceMean', 'ReduceSum', 'Relu', 'Reshape', 'Shape', 'Squeeze', 'Sub', 'Unsqueeze'})
# function bodies (custom files), which take the parameters as inputs and work for any channel count, also use these
FUNCTION_OPS = DECOMPOSED_OPS | {'Clip', 'Mod', 'Slice', 'SpaceToDepth'}

_INT_MAX = np.iinfo(np.int64).max
_MIN_HALF_LAMBDA = 1e-30  # lambda/2 below this (exp(theta_lambda) underflowing) still gives padding a zero weight
_LEAN_LIMIT = 80.0  # the lean form where (lambda/2 + 1) * ln K stays below this: weights above e^-80 (normal floats)


class Emitter:
    """Collects ONNX nodes (and constants: initializers of a graph, or ``Constant`` nodes of a function body) with
    names unique under ``prefix``."""

    def __init__(self, prefix: str, as_function: bool):
        self.prefix, self.as_function = prefix, as_function
        self.nodes: List = []
        self.initializers: List = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f'{self.prefix}{hint}_{self._count}'

    def op(self, op_type: str, *inputs: str, output: Optional[str] = None, **attrs) -> str:
        from onnx import helper
        name = self.fresh(op_type.lower())
        out = output or name
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def const(self, value, dtype=np.float32, hint: str = 'const') -> str:
        from onnx import helper, numpy_helper
        name = self.fresh(hint)
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        if self.as_function:
            self.nodes.append(helper.make_node('Constant', [], [name], name=name, value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def ints(self, values: Sequence[int], hint: str = 'ints') -> str:
        return self.const(list(values), np.int64, hint)


class _Region:
    """The input region the windows cover, ``(out - 1) * stride + kernel`` positions per side from the first window's
    start: cut from an input by one ``Pad`` (zeros; negative pads crop) or, where it only crops, one ``Slice``, with
    sizes fixed where the input size is known and computed from ``Shape`` otherwise."""

    def __init__(self, em: Emitter, g: PoolGeometry, x: str, size: Optional[Tuple[int, int]], edge: bool):
        self.em, self.g, self._args = em, g, (x, size, edge)
        self._cuts: Dict[str, str] = {}
        self._ready = False
        if size is not None:
            r = g.resolve(*size)
            # (a window reaches a padded position only where some pad is positive)
            reaches = any(v > 0 for v in (r.pad_top, r.pad_left, r.pad_bottom, r.pad_right))
        else:
            reaches = g.is_same or g.ceil_mode or any(g.padding)
        self.masked = reaches and not edge

    def _prepare(self) -> None:
        """The pads or ends of the cut (nodes emitted on first use only)."""
        if self._ready:
            return
        self._ready = True
        em, g, (_, size, edge) = self.em, self.g, self._args
        k, s = g.kernel, g.stride
        self.pads = self.ends = None
        self.mode = 'constant'
        if size is not None:
            r = g.resolve(*size)
            pads = [0, 0, r.pad_top, r.pad_left, 0, 0, r.pad_bottom, r.pad_right]
            if any(v > 0 for v in pads):
                self.pads = em.ints(pads, 'pads')
                self.mode = 'edge' if edge else 'constant'
            elif any(pads):
                self.ends = em.ints([size[0] + r.pad_bottom, size[1] + r.pad_right], 'ends')
            return
        hw = self.hw
        if edge and (g.is_same or g.ceil_mode or any(g.padding)):
            # 2x2 windows: a window reaching out has one valid row (column), before or after; edge padding repeats it,
            # which leaves DPP unchanged (see emit_dpp). After-padding: size % 2 ('same', ceil_mode without padding)
            # or 1 - size % 2 (padding 1, either mode)
            odd = em.op('Mod', hw, em.ints([2, 2]))
            before = [0, 0] if g.is_same else list(g.padding)
            if before == [0, 0]:
                after = odd
            elif before == [1, 1]:
                after = em.op('Sub', em.ints([1, 1]), odd)
            else:  # one side padded: per side
                after = em.op('Add', em.op('Mul', odd, em.ints([1 - 2 * b for b in before])), em.ints(before))
            self.pads = em.op('Concat', em.ints([0, 0, *before, 0, 0]), after, axis=0)
            self.mode = 'edge'
            return
        if g.is_same:
            out = em.op('Div', em.op('Add', hw, em.ints([s[0] - 1, s[1] - 1])), em.ints(s))
            before = None
        else:
            p = g.padding
            before = list(p)
            # floor: (size + 2p - k) // s + 1 windows, written (size + 2p - k + s) // s (non-negative operands)
            shift = [2 * p[i] - k[i] + s[i] + ((s[i] - 1) if g.ceil_mode else 0) for i in range(2)]
            out = hw if shift == [0, 0] else em.op('Add', hw, em.ints(shift))
            out = out if s == (1, 1) else em.op('Div', out, em.ints(s))
            if g.ceil_mode and not all(p[i] == 0 and k[i] >= s[i] for i in range(2)):
                # the last window must start inside the input or its left padding (harmless where it always does)
                last = em.op('Div', em.op('Add', hw, em.ints([p[0] - 1 + s[0], p[1] - 1 + s[1]])), em.ints(s))
                out = em.op('Min', out, last)
        extent = em.op('Mul', out, em.ints(s)) if s != (1, 1) else out
        if k != s:
            extent = em.op('Add', extent, em.ints([k[0] - s[0], k[1] - s[1]]))
        if not (g.is_same or g.ceil_mode or any(before)):  # no padding, floor mode: the region only crops
            self.ends = extent
            return
        if before is None:  # 'same': half the total padding before, the rest after
            total = em.op('Sub', extent, hw)
            if min(k[0] - s[0], k[1] - s[1]) < 0:  # only then can the 'same' padding be negative
                total = em.op('Max', total, em.ints([0, 0]))
            first = em.op('Div', total, em.ints([2, 2]))
            after = em.op('Sub', extent, em.op('Add', hw, first))
        else:
            first = em.ints(before)
            after = em.op('Sub', extent, em.op('Add', hw, first))
        zeros = em.ints([0, 0])
        self.pads = em.op('Concat', zeros, first, zeros, after, axis=0)

    @property
    def hw(self) -> str:
        """The input's (H, W): a constant, or from ``Shape`` (one node, on first use)."""
        if getattr(self, '_hw', None) is None:
            x, size, _ = self._args
            self._hw = self.em.ints(list(size), 'hw') if size is not None else self.em.op('Shape', x, start=2, end=4)
        return self._hw

    def cut(self, t: str) -> str:
        """``t`` (N, C, H, W) padded (zeros, or edge values) and cropped to the windows' region; once per tensor."""
        if t not in self._cuts:
            self._prepare()
            em = self.em
            if self.pads is not None:
                out = em.op('Pad', t, self.pads, mode=self.mode)
            elif self.ends is not None:
                out = em.op('Slice', t, em.ints([0, 0]), self.ends, em.ints([2, 3]))
            else:
                out = t
            self._cuts[t] = out
        return self._cuts[t]

    def ones(self) -> str:
        """Ones of the input's spatial size, (1, 1, H, W): cut to the region, the mask of input positions."""
        from onnx import helper
        em = self.em
        shape = em.op('Concat', em.ints([1, 1]), self.hw, axis=0)
        return em.op('ConstantOfShape', shape, value=helper.make_tensor('one', 1, [1], [1.0]))


class _Weights:
    """Names of the weight parameters, shaped ``shape`` (C at -1) for broadcasting: ``alpha``, ``half``
    (lambda/2) and, for the lean form, ``lean_alpha`` (alpha * K^(-lambda/2)) and ``neg_half``."""

    def __init__(self, em: Emitter, theta_alpha: str, theta_lambda: str, params, shape: List[int], window: int,
                 norm: str):
        self.lean = False
        self.lean_alpha = self.neg_half = None
        if params is None:  # (a function body: the parameters are inputs)
            dims = em.ints(shape)
            alpha = em.op('Exp', em.op('Clip', theta_alpha, '', em.const(THETA_ALPHA_MAX)))
            half = em.op('Max', em.op('Mul', em.op('Exp', theta_lambda), em.const(0.5)), em.const(_MIN_HALF_LAMBDA))
            self.alpha, self.half = em.op('Reshape', alpha, dims), em.op('Reshape', half, dims)
            return
        import torch  # the layer's own float32 transforms, so the constants equal what PyTorch computes
        ta, tl = (torch.from_numpy(np.array(p, dtype=np.float32)) for p in params)
        alpha = torch.exp(ta.clamp(max=THETA_ALPHA_MAX)).numpy()
        half = (torch.exp(tl) * 0.5).clamp_min(_MIN_HALF_LAMBDA).numpy()
        shape = [alpha.shape[0] if d == -1 else d for d in shape]
        self.alpha = em.const(alpha.reshape(shape), hint='alpha')
        self.half = em.const(half.reshape(shape), hint='half_lambda')
        # the lean form normalises by the window sum instead of its maximum: each weight (y / sum)^(lambda/2) is at
        # most 1 and the largest at least K^(-lambda/2), which stays a normal float32 while this holds
        self.lean = norm == 'mean' and (float(half.max()) + 1.0) * math.log(window) <= _LEAN_LIMIT
        if self.lean:
            lean = alpha.astype(np.float64) * np.power(float(window), -half.astype(np.float64))
            self.lean_alpha = em.const(lean.astype(np.float32).reshape(shape), hint='lean_alpha')
            self.neg_half = em.const(-half.reshape(shape), hint='neg_half_lambda')


def _stacker(em: Emitter, g, region, x: str, channels: Optional[int], axes: str, blocks: bool, simple: bool,
             edge: bool):
    """The function that stacks the K positions of every window of a tensor on one axis: (N, K, C, OH, OW) by
    SpaceToDepth (``blocks``: function bodies, square windows that tile the input), else (N, C, K, OH, OW) by a
    one-hot grouped convolution where the channel count is fixed, or by one strided Slice per position."""
    (kh, kw), (sh, sw) = g.kernel, g.stride
    k = kh * kw
    if blocks:
        # (N, 1, K * C, OH, OW) -> (N, K, C, OH, OW) with C from the input's shape and -1 for N, not C: Reshape infers
        # -1 only where the other sizes are not zero, which an empty batch (N = 0) copied by a 0 would be
        shape5 = em.op('Concat', em.ints([-1, k]), em.op('Shape', x, start=1, end=2), em.ints([0, 0]), axis=0)

        def stack(t, c=None):  # (c: a fixed channel count, the mask's 1)
            return em.op('Reshape', em.op('Unsqueeze', em.op('SpaceToDepth', region.cut(t), blocksize=kh), axes),
                         shape5 if c is None else em.ints([0, k, c, 0, 0], 'blocks'))
    elif not em.as_function:
        # one grouped convolution with one-hot filters (C * K outputs, K per channel: exact copies) unfolds the
        # windows, padding included where it is symmetric (floor mode): no padded copy, no Slice per position
        unfold = {}  # (N, C * K, OH, OW) -> (N, C, K, OH, OW) per channel count: no -1, which Reshape cannot infer
        # for an empty batch (N = 0)
        conv_pads = [g.padding[0], g.padding[1]] * 2 if simple else [0, 0, 0, 0]
        filters = {}
        if edge and not simple:
            # fixed edge padding, then floor mode: one more row (column) after for 'same' and unpadded ceil_mode, whose
            # extra window exists exactly where the size is odd (padded by 1, ceil_mode adds no window: its last one
            # would start in the padding)
            before = (0, 0) if g.is_same else g.padding
            after = [b + (1 if g.is_same or (g.ceil_mode and b == 0) else 0) for b in before]
            edge_pads = em.ints([0, 0, before[0], before[1], 0, 0, *after], 'pads')

        def source(t):
            if simple:
                return t
            if edge:
                return em.op('Pad', t, edge_pads, mode='edge')
            return region.cut(t)

        def stack(t, c=channels):
            if c not in filters:
                eye = np.eye(k, dtype=np.float32).reshape(k, 1, kh, kw)
                filters[c] = em.const(np.tile(eye, (c, 1, 1, 1)), hint='unfold_filter')
                unfold[c] = em.ints([0, int(c), k, 0, 0], 'unfold')
            cols = em.op('Conv', source(t), filters[c], group=int(c), kernel_shape=[kh, kw], strides=[sh, sw],
                         pads=conv_pads)
            return em.op('Reshape', em.op('Unsqueeze', cols, axes), unfold[c])
    else:  # (function bodies, whose channel count is not fixed: one strided Slice per position)
        steps, spatial = em.ints([sh, sw], 'steps'), em.ints([3, 4], 'spatial')

        def end(i, n):  # the region has (out - 1) * s + n positions: slice i ends n - 1 - i before its end
            return _INT_MAX if i == n - 1 else -(n - 1 - i)

        def stack(t, c=None):
            tu = em.op('Unsqueeze', region.cut(t), axes)
            parts = [em.op('Slice', tu, em.ints([i, j]), em.ints([end(i, kh), end(j, kw)]), spatial, steps)
                     for i in range(kh) for j in range(kw)]
            return em.op('Concat', *parts, axis=2)

    return stack


def _alpha_term(em: Emitter, w, y: str, axes: str, norm: str, share: Optional[str], mean):
    """(the alpha term a, the window's normaliser M) of the weights a + (y / M)^(lambda/2): M is the window's sum
    (norm 'sum', or the lean form of :class:`_Weights`), else its maximum, so every base is at most 1."""
    if norm == 'sum' or w.lean:
        big = em.op('ReduceSum', y, axes, keepdims=1)
        a = w.alpha
        if w.lean:  # alpha * count^(-lambda/2): K^(-lambda/2) is in lean_alpha
            a = w.lean_alpha if share is None else em.op(
                'Mul', w.lean_alpha, em.op('Exp', em.op('Mul', em.op('Log', share), w.neg_half)))
    else:  # the window maximum: every base at most 1
        big = em.op('ReduceMax', y, axes, keepdims=1)
        if norm == 'none':
            big = em.op('Max', big, em.const(1.0))
            a = em.op('Div', w.alpha, em.op('Pow', big, w.half))
        else:
            m = em.op('Div', mean(y), share) if share else mean(y)
            a = em.op('Mul', w.alpha, em.op('Pow', em.op('Div', m, big), w.half))
    return a, big


def emit_dpp(em: Emitter, x: str, theta_alpha: str, theta_lambda: str, guide_weight: Optional[str],
             settings: 'DPPNodeSettings', channels: Optional[int], size: Optional[Tuple[int, int]] = None, params=None,
             output: Optional[str] = None) -> str:
    """Emit one DPP2d node's computation into ``em``; returns the output's name.

    ``settings``: the node's window, reward, norm and eps; ``channels``: C (needed for the Full guide's grouped
    convolution); ``size``: the input's (H, W) where fixed (else computed at run time); ``params``: the
    (theta_alpha, theta_lambda) values to fold into constants (else computed from the inputs); ``output``: the name to
    give the result.

    With the parameters known and the 'mean' norm, the weights are normalised by the window's sum rather than its
    maximum where lambda allows (see :class:`_Weights`): the per-window alpha term is then a constant and the window
    maximum is not needed, a shorter graph with the same output.
    """
    g = settings.geometry
    (kh, kw), (sh, sw) = g.kernel, g.stride
    k = kh * kw
    reward, norm, eps = settings.reward, settings.norm, settings.eps
    # Edge padding instead of a mask where it leaves DPP unchanged: 2x2 windows (so a window reaching out has exactly
    # one valid row or column, which edge padding repeats: every valid position of the window then counts twice), a
    # guide that is the window mean (Lite) and a norm invariant to repeating every position alike ('mean', 'none')
    edge = g.kernel == g.stride == (2, 2) and guide_weight is None and norm in ('mean', 'none')
    region = _Region(em, g, x, size, edge)
    # the K positions of every window on one axis: (N, C, K, OH, OW) by a one-hot grouped convolution where the
    # channel count is fixed; in function bodies (N, K, C, OH, OW) by SpaceToDepth for square windows that tile the
    # input, else (N, C, K, OH, OW) by one strided Slice per position
    blocks = em.as_function and g.kernel == g.stride and kh == kw
    # (convolutions pad zeros symmetrically and drop what floor mode leaves out: then no cut of the input)
    simple = not (em.as_function or g.is_same or g.ceil_mode or (edge and any(g.padding)))
    axis = 1 if blocks else 2
    axes = em.ints([axis], 'axis')

    stack = _stacker(em, g, region, x, channels, axes, blocks, simple, edge)

    def mean(t):
        return em.op('ReduceMean', t, axes, keepdims=1)

    w = _Weights(em, theta_alpha, theta_lambda, params, [1, 1, -1, 1, 1] if blocks else [1, -1, 1, 1, 1], k, norm)
    cols = stack(x)
    px = mean(cols)  # (padding counts as zero)
    share = None
    if region.masked:
        valid = stack(region.ones(), 1)
        share = mean(valid)  # the valid share of each window
    if guide_weight is None:
        guide = em.op('Div', px, share) if share else px
    else:
        kgh, kgw = g.full_guide_kernel()
        # the filter starts kg - k positions before the window; below and right it needs only the window's padding
        pt, pl = g.padding if simple else (0, 0)
        guide = em.op('Unsqueeze', em.op(
            'Conv', x if simple else region.cut(x), guide_weight, group=int(channels), kernel_shape=[kgh, kgw],
            strides=[sh, sw], pads=[pt + kgh - kh, pl + kgw - kw, pt, pl]), axes)
    d = em.op('Sub', cols, guide)
    if reward == 'asym':
        d = em.op('Relu', d)
    y = em.op('Add', em.op('Mul', d, d), em.const(eps))
    if share:
        y = em.op('Mul', y, valid)  # padding: y = 0, weight 0

    # weights a + (y / M)^(lambda/2) per window
    a, big = _alpha_term(em, w, y, axes, norm, share, mean)
    # (y / M)^(lambda/2) as Exp(lambda/2 * Log(y / M)): vectorised in runtimes, where Pow with a per-channel exponent
    # runs element by element (onnxruntime: several times slower); Log(0) = -inf gives padding 0
    rw = em.op('Exp', em.op('Mul', em.op('Log', em.op('Div', y, big)), w.half))
    num = em.op('Add', em.op('Mul', a, px), mean(em.op('Mul', rw, cols)))
    den = em.op('Add', em.op('Mul', a, share) if share else a, mean(rw))
    if guide_weight is not None:
        # non-finite inputs (issue 33): a window whose Full guide reads a NaN or infinite value outside the window must
        # give NaN too, where Relu (asym) would turn a deviation of -inf (a guide of +inf) into a finite weight; guide -
        # guide is +0 (den unchanged) or NaN. The Lite guide needs nothing: a non-finite window value reaches the output
        # through alpha * px in num
        den = em.op('Add', den, em.op('Sub', guide, guide))
    return em.op('Squeeze', em.op('Div', num, den), axes, output=output)
