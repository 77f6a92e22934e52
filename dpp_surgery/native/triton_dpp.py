"""Triton kernels for DPP2d: the forward, and a backward that recomputes everything from the input.

What DPP2d runs for CUDA tensors (``impl='auto'`` or ``'triton'``), registered as the CUDA kernel of the same
``torch.ops.dpp_surgery.dpp2d`` op as the CPU kernel. With ``TRITON_INTERPRET=1`` in the environment before this
module is first imported, ``impl='triton'`` runs the same kernels on CPU tensors through Triton's interpreter
(that is how the CPU-only test machines run them).

The maths is that of :func:`dpp_surgery.layers.functional._reference` and of the CPU kernel
(``native/csrc/dpp2d.cpp``); see :class:`dpp_surgery.DPP2d` for the definition. Activations, the Full guide and
gradients are loaded and stored in their own dtype (float16, bfloat16, float32 or float64); arithmetic is float32
(float64 for float64 inputs). Any strides are accepted, so NCHW, channels_last and views run without copies.

Work is tiled as (output positions x channels): positions run along ``(n, oh, ow)``, and a tile spans one
channel for NCHW inputs (consecutive positions are consecutive in memory) or up to 64 channels for channels_last
(consecutive channels are). Each tile walks its windows several times (guide, normalisation, weights); every
pass after the first reads the same few cache lines again, so the input comes from memory about once.

The backward saves nothing but the input (and the Full guide). Windows that do not overlap (kernel <= stride, what
convert produces) get one kernel that writes each input gradient once. Overlapping windows get two: the first
writes seven float32 values per window, the second gathers, for each input position, the terms of the windows
that contain it. No atomics anywhere: the backward is deterministic, and the per-channel alpha and lambda
gradients are reduced per tile and summed over tiles by ``torch.sum``.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .abi import NORM_CODES

__all__ = ['forward', 'backward', 'launch_config', 'LAUNCH', 'INTERPRETED', 'STATS', 'TILE_LANES', 'forward_kernel',
           'backward_kernel', 'gather_kernel']

# Triton decides at decoration time whether a kernel is compiled or interpreted; record which this module got.
INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')
STATS = 7  # float32 values per window kept between the two kernels of an overlapping backward


@triton.jit
def _element(x_ptr, base, ih, iw, sxh, sxw, H, W, mask, ACC: tl.constexpr):
    """One window element per lane (zero outside the image) and whether it is in the window."""
    valid = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    v = tl.load(x_ptr + base + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw, mask=valid, other=0.0)
    return v.to(ACC), valid


@triton.jit
def _store(ptr, value, mask):
    """Store float32 (float64) values in the pointer's dtype, rounded to nearest even.

    bfloat16 is rounded here, by its bits, and then converted exactly: Triton's interpreter truncates a float32 to
    bfloat16 conversion, and this gives the GPU's rounding there too."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _deviation(v, g, ASYM: tl.constexpr):
    d = v - g
    if ASYM:
        d = tl.maximum(d, 0.0)
    return d


@triton.jit
def _reward(v, valid, g, hl, lm, m, eps, ASYM: tl.constexpr):
    """One window element's deviation d, y = d^2 + eps, lu = log(y) less the log normaliser, and its shifted
    reward exp(lambda/2 lu - M) (1 at positions outside the window, whose exponent the shift does not bound)."""
    d = _deviation(v, g, ASYM)
    y = d * d + eps
    lu = tl.log(y) - lm
    return d, y, lu, tl.exp(tl.where(valid, hl * lu - m, 0.0))


@triton.jit
def _window(x_ptr, g_ptr, xbase, gofs, ih0, iw0, sxh, sxw, H, W, mask, a, hl, eps,
            KH: tl.constexpr, KW: tl.constexpr, ASYM: tl.constexpr, NORM: tl.constexpr, HAS_GUIDE: tl.constexpr,
            ACC: tl.constexpr):
    """The forward's per-window values: guide G, window size, sum of y, log normaliser, shift M, alpha exp(-M),
    the weights' sum S and the output D."""
    rows = tl.minimum(ih0 + KH, H) - tl.maximum(ih0, 0)
    cols = tl.minimum(iw0 + KW, W) - tl.maximum(iw0, 0)
    cnt = tl.maximum(rows * cols, 1).to(ACC)
    if HAS_GUIDE:
        g = tl.load(g_ptr + gofs, mask=mask, other=0.0).to(ACC)
    else:
        s = tl.zeros(mask.shape, ACC)
        for i in tl.static_range(KH):
            for j in tl.static_range(KW):
                v, valid = _element(x_ptr, xbase, ih0 + i, iw0 + j, sxh, sxw, H, W, mask, ACC)
                s += v
        g = s / cnt
    sy = tl.zeros(mask.shape, ACC)
    ymax = tl.zeros(mask.shape, ACC) + eps
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            v, valid = _element(x_ptr, xbase, ih0 + i, iw0 + j, sxh, sxw, H, W, mask, ACC)
            d = _deviation(v, g, ASYM)
            y = tl.where(valid, d * d + eps, 0.0)
            sy += y
            ymax = tl.maximum(ymax, y)
    sy = tl.maximum(sy, eps)  # (lanes outside the tensor)
    if NORM == 0:
        lm = tl.zeros(mask.shape, ACC)
    elif NORM == 1:
        lm = tl.log(sy / cnt)
    else:
        lm = tl.log(sy)
    # lambda > 0, so the largest lambda/2 log(u) is that of the largest y; the common factor exp(-M) keeps every
    # weight finite and cancels in the output
    m = tl.maximum(hl * (tl.log(ymax) - lm), 0.0)
    ea = a * tl.exp(-m)
    ws = tl.zeros(mask.shape, ACC)
    wx = tl.zeros(mask.shape, ACC)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            v, valid = _element(x_ptr, xbase, ih0 + i, iw0 + j, sxh, sxw, H, W, mask, ACC)
            d, y, lu, r = _reward(v, valid, g, hl, lm, m, eps, ASYM)
            w = tl.where(valid, ea + r, 0.0)
            ws += w
            wx += w * v
    ws = tl.where(ws > 0, ws, 1.0)
    # A non-finite element reaches wx (w v is NaN or inf for any weight w), but a non-finite guide need not (the
    # asymmetric reward clips v - G at 0): such a window's output is NaN. Other windows compute as without it.
    gbad = g - g
    return g, cnt, sy, lm, m, ea, ws, tl.where(gbad == 0, wx / ws, gbad)


@triton.jit
def _tile(C, OH, OW, P, SH: tl.constexpr, SW: tl.constexpr, PT, PL, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """A tile of output positions (rows, along n, oh, ow) x channels (columns)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ow = p % OW
    t = p // OW
    oh = t % OH
    n = t // OH
    mask = (p < P)[:, None] & (c < C)[None, :]
    return (n.to(tl.int64)[:, None], c.to(tl.int64)[None, :], c, oh[:, None], ow[:, None], mask,
            (oh * SH - PT)[:, None], (ow * SW - PL)[:, None])


@triton.jit
def forward_kernel(x_ptr, g_ptr, a_ptr, l_ptr, o_ptr,
                    C, H, W, OH, OW, P, PT, PL, eps,
                    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, son, soc, soh, sow,
                    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, ASYM: tl.constexpr,
                    NORM: tl.constexpr, HAS_GUIDE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, c64, c, oh, ow, mask, ih0, iw0 = _tile(C, OH, OW, P, SH, SW, PT, PL, BLOCK_P, BLOCK_C)
    cm = c < C
    a = tl.load(a_ptr + c, mask=cm, other=1.0).to(ACC)[None, :]
    hl = 0.5 * tl.load(l_ptr + c, mask=cm, other=1.0).to(ACC)[None, :]
    gofs = n * sgn + c64 * sgc + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
    g, cnt, sy, lm, m, ea, ws, out = _window(x_ptr, g_ptr, n * sxn + c64 * sxc, gofs, ih0, iw0, sxh, sxw, H, W,
                                             mask, a, hl, eps, KH, KW, ASYM, NORM, HAS_GUIDE, ACC)
    oofs = n * son + c64 * soc + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
    _store(o_ptr + oofs, out, mask)


@triton.jit
def backward_kernel(x_ptr, g_ptr, a_ptr, l_ptr, go_ptr, gx_ptr, gg_ptr, s_ptr, pa_ptr, pl_ptr,
                     C, H, W, OH, OW, P, PT, PL, eps,
                     sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sqn, sqc, sqh, sqw, son, soc, soh, sow,
                     sdn, sdc, sdh, sdw, sss, ssn, ssc, ssh, ssw,
                     KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, ASYM: tl.constexpr,
                     NORM: tl.constexpr, HAS_GUIDE: tl.constexpr, NON_OVERLAP: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per window: the guide gradient (strides ``sq*``), the alpha/lambda partial sums of the tile, and either the
    input gradient (windows that do not overlap; strides ``sd*``) or the window's terms for
    gather_kernel (strides ``ss*``, ``sss`` between the STATS planes)."""
    n, c64, c, oh, ow, mask, ih0, iw0 = _tile(C, OH, OW, P, SH, SW, PT, PL, BLOCK_P, BLOCK_C)
    cm = c < C
    a = tl.load(a_ptr + c, mask=cm, other=1.0).to(ACC)[None, :]
    hl = 0.5 * tl.load(l_ptr + c, mask=cm, other=1.0).to(ACC)[None, :]
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    xbase = n * sxn + c64 * sxc
    gofs = n * sgn + c64 * sgc + oh64 * sgh + ow64 * sgw
    g, cnt, sy, lm, m, ea, ws, out = _window(x_ptr, g_ptr, xbase, gofs, ih0, iw0, sxh, sxw, H, W,
                                             mask, a, hl, eps, KH, KW, ASYM, NORM, HAS_GUIDE, ACC)
    go = tl.load(go_ptr + n * son + c64 * soc + oh64 * soh + ow64 * sow, mask=mask, other=0.0).to(ACC)
    cc = go / ws
    # q_k = c (x_k - D), p_k = q_k r_k with r_k the shifted reward; their window sums give every gradient
    sq = tl.zeros(mask.shape, ACC)
    sp = tl.zeros(mask.shape, ACC)
    spl = tl.zeros(mask.shape, ACC)
    sdpy = tl.zeros(mask.shape, ACC)
    sd = tl.zeros(mask.shape, ACC)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            v, valid = _element(x_ptr, xbase, ih0 + i, iw0 + j, sxh, sxw, H, W, mask, ACC)
            d, y, lu, r = _reward(v, valid, g, hl, lm, m, eps, ASYM)
            pk = tl.where(valid, cc * (v - out) * r, 0.0)
            sq += tl.where(valid, cc * (v - out), 0.0)
            sp += pk
            spl += pk * lu
            sdpy += d * pk / y
            sd += tl.where(valid, d, 0.0)
    if NORM == 0:
        coup = tl.zeros(mask.shape, ACC)
    else:
        coup = hl * sp / sy  # lambda/2 sum(p) / m, times the 1/K of the mean (or 1 of the sum) = lambda/2 sum(p)/sum(y)
    gguide = 2.0 * coup * sd - 2.0 * hl * sdpy
    ga = tl.where(mask, tl.exp(-m) * sq, 0.0)
    gl = tl.where(mask, 0.5 * spl, 0.0)
    tl.store(pa_ptr + tl.program_id(0) * C + c, tl.sum(ga, axis=0), mask=cm)
    tl.store(pl_ptr + tl.program_id(0) * C + c, tl.sum(gl, axis=0), mask=cm)
    if HAS_GUIDE:
        ggofs = n * sqn + c64 * sqc + oh64 * sqh + ow64 * sqw
        _store(gg_ptr + ggofs, gguide, mask)
        gshare = tl.zeros(mask.shape, ACC)
    else:
        gshare = gguide / cnt  # the Lite guide is the window mean: each element gets its share
    if NON_OVERLAP:
        for i in tl.static_range(KH):
            for j in tl.static_range(KW):
                v, valid = _element(x_ptr, xbase, ih0 + i, iw0 + j, sxh, sxw, H, W, mask, ACC)
                d, y, lu, r = _reward(v, valid, g, hl, lm, m, eps, ASYM)
                gx = cc * (ea + r) + 2.0 * d * (hl * cc * (v - out) * r / y - coup) + gshare
                ofs = n * sdn + c64 * sdc + (ih0 + i).to(tl.int64) * sdh + (iw0 + j).to(tl.int64) * sdw
                _store(gx_ptr + ofs, gx, valid)
    else:
        sofs = n * ssn + c64 * ssc + oh64 * ssh + ow64 * ssw
        tl.store(s_ptr + sofs, g, mask=mask)
        tl.store(s_ptr + sss + sofs, hl * lm + m, mask=mask)
        tl.store(s_ptr + 2 * sss + sofs, cc, mask=mask)
        tl.store(s_ptr + 3 * sss + sofs, cc * ea, mask=mask)
        tl.store(s_ptr + 4 * sss + sofs, out, mask=mask)
        tl.store(s_ptr + 5 * sss + sofs, coup, mask=mask)
        tl.store(s_ptr + 6 * sss + sofs, gshare, mask=mask)


@triton.jit
def gather_kernel(x_ptr, l_ptr, s_ptr, gx_ptr,
                   C, H, W, OH, OW, Q, PT, PL, eps,
                   sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, sss, ssn, ssc, ssh, ssw,
                   KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, ASYM: tl.constexpr,
                   NWH: tl.constexpr, NWW: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Input gradient of overlapping windows: each input position sums the terms of the (at most NWH x NWW)
    windows that contain it, from the values backward_kernel kept per window."""
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    iw = (q % W)[:, None]
    t = q // W
    ih = (t % H)[:, None]
    n = (t // H).to(tl.int64)[:, None]
    cm = c < C
    mask = (q < Q)[:, None] & cm[None, :]
    c64 = c.to(tl.int64)[None, :]
    hl = 0.5 * tl.load(l_ptr + c, mask=cm, other=1.0).to(ACC)[None, :]
    xofs = n * sxn + c64 * sxc + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
    v = tl.load(x_ptr + xofs, mask=mask, other=0.0).to(ACC)
    acc = tl.zeros(mask.shape, ACC)
    for a in tl.static_range(NWH):
        for b in tl.static_range(NWW):
            oh = (ih + PT) // SH - a
            ow = (iw + PL) // SW - b
            valid = (mask & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
                     & (ih < oh * SH - PT + KH) & (iw < ow * SW - PL + KW))
            sofs = n * ssn + c64 * ssc + oh.to(tl.int64) * ssh + ow.to(tl.int64) * ssw
            g = tl.load(s_ptr + sofs, mask=valid, other=0.0)
            shift = tl.load(s_ptr + sss + sofs, mask=valid, other=0.0)
            cc = tl.load(s_ptr + 2 * sss + sofs, mask=valid, other=0.0)
            cea = tl.load(s_ptr + 3 * sss + sofs, mask=valid, other=0.0)
            out = tl.load(s_ptr + 4 * sss + sofs, mask=valid, other=0.0)
            coup = tl.load(s_ptr + 5 * sss + sofs, mask=valid, other=0.0)
            gshare = tl.load(s_ptr + 6 * sss + sofs, mask=valid, other=0.0)
            d = _deviation(v, g.to(ACC), ASYM)
            y = d * d + eps
            r = tl.exp(tl.where(valid, hl * tl.log(y) - shift, 0.0))
            gx = cea + cc * r + 2.0 * d * (hl * cc * (v - out) * r / y - coup) + gshare
            acc += tl.where(valid, gx, 0.0)
    dofs = n * sdn + c64 * sdc + ih.to(tl.int64) * sdh + iw.to(tl.int64) * sdw
    _store(gx_ptr + dofs, acc, mask)


def _acc(x: Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


# Lanes per tile: None picks them per launch (below); tests set a small number to run many tiles per launch.
TILE_LANES: Optional[int] = None
TILE_CHANNELS: Optional[int] = None  # (tests: at most this many channels per channels_last tile)
_INTERPRETED_LANES = 1 << 14  # the interpreter pays per program, not per lane: few, large tiles


# Per kernel and window size at GPU tile sizes: lanes per tile, channels per tile for channels_last, and warps per
# program. Every lane holds its window's values across a kernel's passes, so the larger windows and the backward
# (about twice the values a lane) run fewer lanes a thread. Chosen from `bench triton-report --full` (every
# specialization compiled for sm_90 and sm_80, dpp_surgery.native.triton_aot): no spill anywhere, at least 25%
# theoretical occupancy for every forward and 2x2 backward. What the alternatives did: the 3x3 forward at 2 lanes a
# thread spilled 8 bytes on sm_80 (norm 'sum', channels_last); the 3x3 backward at 4 warps spilled 8 bytes on sm_90
# (Full-asym 3x3/s3 float32 NCHW); the 2x2 backward with norm 'sum' spilled 8 bytes at 1 lane a thread whatever
# the warps (Lite, NCHW: bfloat16/float16 on sm_90 at 2 and 4 warps, float32 on sm_90 at 8), so it runs 2 lanes a
# thread at 8 warps (25% occupancy; the other norms keep 1 lane a thread, 44-56%).
LAUNCH = {
    ('forward', 'small'): (256, 64, 4),  # windows of up to 4 positions (2x2): 2 lanes a thread
    ('forward', 'large'): (128, 64, 4),  # larger windows (3x3): 1 lane a thread
    ('backward', 'small'): (128, 32, 4),
    ('backward', 'large'): (256, 32, 8),
    ('gather', 'small'): (128, 32, 4),  # (the gather kernel runs for overlapping windows only)
    ('gather', 'large'): (128, 32, 4),
}
LAUNCH_NORM_SUM = {('backward', 'small'): (512, 32, 8)}  # norm 'sum' where it differs
SMALL_WINDOW = 4  # positions
_NORM_NAMES = {code: name for name, code in NORM_CODES.items()}  # the kernels' norm codes -> names


def launch_config(kernel: str, channels: int, channels_last: bool, window: int = SMALL_WINDOW,
                  norm: str = 'mean') -> dict:
    """BLOCK_P (positions), BLOCK_C (channels) and num_warps of ``kernel`` on a GPU for windows of ``window``
    positions and the window ``norm``: one channel per tile for NCHW (consecutive positions are consecutive in
    memory), up to LAUNCH's channels for channels_last."""
    key = (kernel, 'small' if window <= SMALL_WINDOW else 'large')
    lanes, max_c, warps = LAUNCH_NORM_SUM[key] if norm == 'sum' and key in LAUNCH_NORM_SUM else LAUNCH[key]
    if channels > 1 and channels_last:
        bc = min(max_c, triton.next_power_of_2(channels))
        return dict(BLOCK_P=max(lanes // bc, 1), BLOCK_C=bc, num_warps=warps)
    return dict(BLOCK_P=lanes, BLOCK_C=1, num_warps=warps)


def _blocks(x: Tensor, kernel: str, window: int = SMALL_WINDOW,
            norm: int = NORM_CODES['mean']) -> Tuple[int, int, int]:
    """(positions, channels, warps) per tile of ``kernel`` for x, windows of ``window`` positions and the norm's code
    (see launch_config)."""
    c = x.shape[1]
    channels_last = c > 1 and x.stride(1) == 1
    config = launch_config(kernel, c, channels_last, window, _NORM_NAMES[norm])
    if TILE_LANES is None and not INTERPRETED:
        return config['BLOCK_P'], config['BLOCK_C'], config['num_warps']
    lanes = TILE_LANES if TILE_LANES is not None else _INTERPRETED_LANES
    if channels_last:
        bc = min(TILE_CHANNELS or (64 if TILE_LANES else lanes), triton.next_power_of_2(c))
        bp = max(lanes // bc, 1)
    else:
        bc, bp = 1, lanes
    if INTERPRETED and TILE_LANES is None:
        # no wider than the work: the interpreter computes every lane, masked or not
        rows = x.shape[0] * x.shape[2] * x.shape[3]
        bp = min(bp, triton.next_power_of_2(max(rows, 1)))
    return bp, bc, config['num_warps']


def _strides(t: Optional[Tensor]) -> Tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _layout(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check(x: Tensor, *others: Optional[Tensor]) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f'the Triton DPP kernels take float16/bfloat16/float32/float64 inputs, but got {x.dtype}')
    for t in others:
        if t is not None and t.device != x.device:
            raise TypeError(f'the Triton DPP kernels need all tensors on {x.device}, but got one on {t.device}')


def forward(x: Tensor, guide: Optional[Tensor], alpha: Tensor, lam: Tensor, geometry: List[int], asym: bool,
            norm: int, eps: float) -> Tensor:
    """DPP2d's output in x's dtype and layout. ``alpha`` and ``lam`` are per-channel (any float dtype);
    ``geometry`` is (kh, kw, sh, sw, pad_top, pad_left, out_h, out_w)."""
    _check(x, guide, alpha, lam)
    kh, kw, sh, sw, pt, pl, oh, ow = geometry
    n, c, h, w = x.shape
    out = torch.empty(n, c, oh, ow, dtype=x.dtype, device=x.device, memory_format=_layout(x))
    p = n * oh * ow
    if out.numel() == 0:
        return out
    bp, bc, warps = _blocks(x, 'forward', kh * kw, norm)
    grid = (triton.cdiv(p, bp), triton.cdiv(c, bc))
    forward_kernel[grid](
        x, guide if guide is not None else x, alpha, lam, out,
        c, h, w, oh, ow, p, pt, pl, float(eps),
        *x.stride(), *_strides(guide), *out.stride(),
        KH=kh, KW=kw, SH=sh, SW=sw, ASYM=bool(asym), NORM=int(norm), HAS_GUIDE=guide is not None, ACC=_acc(x),
        BLOCK_P=bp, BLOCK_C=bc, num_warps=warps)
    return out


def backward(grad: Tensor, x: Tensor, guide: Optional[Tensor], alpha: Tensor, lam: Tensor, geometry: List[int],
             asym: bool, norm: int, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_guide or an empty tensor, grad_alpha, grad_lambda), recomputed from x (and the guide)."""
    _check(x, guide, alpha, lam, grad)
    kh, kw, sh, sw, pt, pl, oh, ow = geometry
    n, c, h, w = x.shape
    fmt = _layout(x)
    non_overlap = kh <= sh and kw <= sw
    exact = pt == 0 and pl == 0 and oh * kh == h and ow * kw == w
    # where windows leave inputs out (floor mode, or gaps between windows), their gradient is zero
    grad_x = (torch.empty_like(x, memory_format=fmt) if not non_overlap or (exact and kh == sh and kw == sw)
              else torch.zeros_like(x, memory_format=fmt))
    grad_guide = torch.empty_like(guide, memory_format=fmt) if guide is not None else x.new_empty(0)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    p = n * oh * ow
    bp, bc, warps = _blocks(x, 'backward', kh * kw, norm)
    grid = (triton.cdiv(p, bp), triton.cdiv(c, bc))
    part_a = torch.zeros(grid[0], c, dtype=acc_dtype, device=x.device)
    part_l = torch.zeros(grid[0], c, dtype=acc_dtype, device=x.device)
    if p == 0 or c == 0:
        return grad_x.zero_(), grad_guide, part_a.sum(0).to(alpha.dtype), part_l.sum(0).to(lam.dtype)
    if non_overlap:
        stats = part_a  # (unused)
        sstr = (0, 0, 0, 0, 0)
    else:
        # (STATS, N, C, OH, OW) in x's layout
        stats = torch.empty(STATS * n, c, oh, ow, dtype=acc_dtype, device=x.device, memory_format=fmt)
        stats = stats.view(STATS, n, c, oh, ow)
        sstr = tuple(stats.stride())
    backward_kernel[grid](
        x, guide if guide is not None else x, alpha, lam, grad, grad_x,
        grad_guide if guide is not None else x, stats, part_a, part_l,
        c, h, w, oh, ow, p, pt, pl, float(eps),
        *x.stride(), *_strides(guide), *_strides(grad_guide if guide is not None else None), *grad.stride(),
        *grad_x.stride(), *sstr,
        KH=kh, KW=kw, SH=sh, SW=sw, ASYM=bool(asym), NORM=int(norm), HAS_GUIDE=guide is not None,
        NON_OVERLAP=non_overlap, ACC=_acc(x), BLOCK_P=bp, BLOCK_C=bc, num_warps=warps)
    if not non_overlap:
        q = n * h * w
        bp, bc, warps = _blocks(x, 'gather', kh * kw)
        qgrid = (triton.cdiv(q, bp), triton.cdiv(c, bc))
        gather_kernel[qgrid](
            x, lam, stats, grad_x,
            c, h, w, oh, ow, q, pt, pl, float(eps),
            *x.stride(), *grad_x.stride(), *sstr,
            KH=kh, KW=kw, SH=sh, SW=sw, ASYM=bool(asym), NWH=triton.cdiv(kh, sh), NWW=triton.cdiv(kw, sw),
            ACC=_acc(x), BLOCK_P=bp, BLOCK_C=bc, num_warps=warps)
    return grad_x, grad_guide, part_a.sum(0).to(alpha.dtype), part_l.sum(0).to(lam.dtype)
