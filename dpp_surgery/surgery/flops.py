"""FLOP estimates: torch's FlopCounterMode for a module, a block at stride 1, and what each replacement adds."""
from __future__ import annotations

import copy
from typing import Any, Sequence, Tuple, Union

import torch
from torch import nn

from .analysis import ModelGraph, eval_mode
from .blocks import block_stride1
from .policy import ConversionPolicy
from .sites import Site, SiteAction, SiteKind, SitePlacement

__all__ = ['DPP_FLOPS_PER_ELEMENT', 'conv_flops', 'dpp_flops', 'operator_flops', 'flops_of', 'counted_call',
           'site_flops', 'try_block']


DPP_FLOPS_PER_ELEMENT = 10  # guide share, deviation, square, eps, log, normalise, scale, exp, weight, weighted sum


def conv_flops(cin: int, cout: int, groups: int, k: Tuple[int, int], out: Tuple[int, int]) -> int:
    return 2 * (cin // groups) * k[0] * k[1] * cout * out[0] * out[1]


def dpp_flops(channels: int, out: Tuple[int, int], window: int, full_guide: bool = False) -> int:
    """Estimated FLOPs of a DPP2d layer: :data:`DPP_FLOPS_PER_ELEMENT` per window element (plus the Full guide)."""
    flops = channels * out[0] * out[1] * window * DPP_FLOPS_PER_ELEMENT
    if full_guide:
        flops += 2 * channels * (window + 5) * out[0] * out[1]
    return flops


def operator_flops(variant, channels: int, out: Tuple[int, int], window: int) -> int:
    """Estimated FLOPs of the downsampling layer a :class:`DPPVariant` puts at a site: DPP (:func:`dpp_flops`),
    S3DPP (DPP over the stride-1 map, then a 2x2 average), a blur (its filter at every output, multiply and add) or
    a plain pool (one operation per window element)."""
    full = variant.guide == 'full'
    if variant.operator == 'dpp':
        return dpp_flops(channels, out, window, full)
    if variant.operator == 's3dpp':
        return dpp_flops(channels, (2 * out[0], 2 * out[1]), 4, full) + channels * out[0] * out[1] * 4
    if variant.operator == 'blur':
        return 2 * channels * out[0] * out[1] * variant.blur_filter ** 2
    return channels * out[0] * out[1] * window


def flops_of(module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> int:
    """FLOPs of one eval-mode call of ``module`` on zeros of ``input_shape`` (torch's ``FlopCounterMode``:
    convolutions and matrix products, a multiply-add counted as 2); the module's mode is restored."""
    return counted_call(module, input_shape, dtype, device)[0]


def counted_call(module: nn.Module, input_shape, dtype, device) -> Tuple[int, Any]:
    """(FLOPs, output) of one eval-mode call of ``module`` on zeros of ``input_shape``."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(*input_shape, dtype=dtype, device=device)
    with eval_mode(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = module(x)
    return int(counter.get_total_flops()), out


def site_flops(model, g: ModelGraph, site: Site, module, policy: ConversionPolicy, block_cache) -> None:
    c_in, c_out, out = site.in_channels, site.out_channels, site.out_size
    window = site.kernel[0] * site.kernel[1]
    if site.kind != SiteKind.STRIDED_CONV:  # pools of every kind, global pools, DPP
        site.flops_before = c_in * out[0] * out[1] * window
    else:
        groups = getattr(module, 'groups', 1)
        site.flops_before = conv_flops(c_in, c_out, groups, site.kernel, out)
    if site.action != SiteAction.REPLACE:
        site.flops_after = site.flops_before
        return
    variant = policy.variant(SiteKind.AVG_POOL if site.kind == SiteKind.GLOBAL_POOL else site.kind)
    if site.placement in (SitePlacement.POOL, SitePlacement.FUNCTIONAL, SitePlacement.GLOBAL):
        site.flops_after = operator_flops(variant, c_in, out, window)
    elif site.placement == SitePlacement.POST:
        groups = getattr(module, 'groups', 1)
        h1 = tuple(n * s for n, s in zip(out, site.stride))  # conv at stride 1 (about s times the outputs per side)
        site.flops_after = conv_flops(c_in, c_out, groups, site.kernel, h1) + operator_flops(
            variant, c_out, out, site.stride[0] * site.stride[1])
    elif site.placement == SitePlacement.PRE:
        site.flops_after = site.flops_before + operator_flops(variant, c_in, out, site.stride[0] * site.stride[1])
    elif site.placement == SitePlacement.BLOCK:
        # the whole block is measured before and after with torch's FLOP counter; the first site of a block
        # carries the block's numbers, the others none
        if site.block in block_cache:
            site.flops_before = site.flops_after = 0
            return
        before, after = try_block(model, g, site.block)
        last_shape = g.block_shapes(site.block)[1]
        after += operator_flops(variant, int(last_shape[1]), tuple(last_shape[2:]), site.stride[0] * site.stride[1])
        block_cache[site.block] = True
        site.flops_before, site.flops_after = before, after


def try_block(model: nn.Module, g: ModelGraph, block: str) -> Union[Tuple[int, int], str]:
    """FLOPs of ``block`` as it is and with every downsampling layer at stride 1 (on a copy), or why the copy
    cannot run; computed once per block."""
    if block not in g.block_trials:
        module = model.get_submodule(block)
        shape, out_shape = g.block_shapes(block)
        try:
            clone = copy.deepcopy(module)
            block_stride1(clone)
            after, out = counted_call(clone, shape, g.dtype, g.device)
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            want = (out_shape[0], out_shape[1], *shape[2:])
            if got != want:
                # something the stride-1 switch cannot reach (a functional pool, a size-dependent forward)
                # still downsamples: DPP after the block would get the wrong size
                raise ValueError(f'at stride 1 it gives {got}, not {want} (it downsamples in a way that cannot '
                                 'be switched off)')
            g.block_trials[block] = (flops_of(module, shape, g.dtype, g.device), after)
        except ValueError as e:
            g.block_trials[block] = f'block {block}: {e}'
        except Exception as e:  # noqa: BLE001 - the block cannot run on its own at stride 1
            g.block_trials[block] = f'block {block} does not run at stride 1 ({type(e).__name__})'
    return g.block_trials[block]
