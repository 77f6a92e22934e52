"""Slow float64 DPP written straight from the equations (one window at a time), for tests only.

Independent of the package's unfold path and kernel: windows and guides are computed by explicit loops.
"""
from __future__ import annotations

import math

import torch


def pool_windows(h, w, kernel, stride, padding, ceil_mode):
    """Per output position, the list of valid (row, col) input positions, following torch pooling rules.

    ``padding`` may be 'same' (timm dynamic padding). Returns (out_h, out_w, windows, starts).
    """
    def out_and_before(size, k, s, p):
        if p == 'same':
            out = math.ceil(size / s)
            total = max((out - 1) * s + k - size, 0)
            return out, total // 2
        numer = size + 2 * p - k
        out = (numer + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (out - 1) * s >= size + p:
            out -= 1
        return out, p

    ph, pw = (padding, padding) if padding == 'same' or isinstance(padding, int) else padding
    oh, top = out_and_before(h, kernel[0], stride[0], ph)
    ow, left = out_and_before(w, kernel[1], stride[1], pw)
    windows, starts = {}, {}
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * stride[0] - top, j * stride[1] - left
            starts[i, j] = (r0, c0)
            windows[i, j] = [(r, c) for r in range(r0, r0 + kernel[0]) for c in range(c0, c0 + kernel[1])
                             if 0 <= r < h and 0 <= c < w]
    return oh, ow, windows, starts


def dpp2d_reference(x, theta_alpha, theta_lambda, kernel=(2, 2), stride=None, padding=0, ceil_mode=False,
                    guide_weight=None, reward='sym', norm='mean', eps=1e-3):
    """DPP in float64 by explicit loops over output positions (vectorised over N and C only)."""
    x = x.double()
    stride = stride or kernel
    n, c, h, w = x.shape
    alpha = torch.exp(theta_alpha.double().clamp(max=10.0))
    lam = torch.exp(theta_lambda.double())
    oh, ow, windows, starts = pool_windows(h, w, kernel, stride, padding, ceil_mode)
    out = x.new_zeros(n, c, oh, ow)
    for (i, j), pos in windows.items():
        vals = torch.stack([x[:, :, r, q] for r, q in pos], dim=-1)  # (N, C, K)
        if guide_weight is None:
            g = vals.mean(-1)
        else:
            # Full guide: filter of side kg starting kg - k positions before the window, zero outside the image
            gw = guide_weight.double()
            kgh, kgw = gw.shape[-2:]
            r0 = starts[i, j][0] - (kgh - kernel[0])
            c0 = starts[i, j][1] - (kgw - kernel[1])
            g = x.new_zeros(n, c)
            for a in range(kgh):
                for b in range(kgw):
                    r, q = r0 + a, c0 + b
                    if 0 <= r < h and 0 <= q < w:
                        g = g + gw[:, 0, a, b] * x[:, :, r, q]
        d = vals - g.unsqueeze(-1)
        if reward == 'asym':
            d = torch.clamp(d, min=0)
        y = d ** 2 + eps
        if norm == 'mean':
            y = y / y.mean(-1, keepdim=True)
        elif norm == 'sum':
            y = y / y.sum(-1, keepdim=True)
        wts = alpha.view(1, c, 1) + y ** (lam.view(1, c, 1) / 2)
        out[:, :, i, j] = (wts * vals).sum(-1) / wts.sum(-1)
    return out


def window_bounds(x, kernel, stride=None, padding=0, ceil_mode=False):
    """Min and max of each valid window, (N, C, OH, OW) each."""
    stride = stride or kernel
    n, c, h, w = x.shape
    oh, ow, windows, _ = pool_windows(h, w, kernel, stride, padding, ceil_mode)
    lo = x.new_zeros(n, c, oh, ow)
    hi = x.new_zeros(n, c, oh, ow)
    for (i, j), pos in windows.items():
        vals = torch.stack([x[:, :, r, q] for r, q in pos], dim=-1)
        lo[:, :, i, j] = vals.amin(-1)
        hi[:, :, i, j] = vals.amax(-1)
    return lo, hi
