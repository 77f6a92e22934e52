"""The conversion plan (read-only): :func:`plan` lists every downsampling site of a model and what
:func:`dpp_surgery.convert` would do to each.

:func:`plan` traces a model with torch.fx (timm's leaves and autowrap functions), propagates the shapes of one
example input, and lists every downsampling site: module pools, functional pools (``F.max_pool2d`` in a
``forward``), strided convolutions and global pools. The steps live in one module each: the data model
(:mod:`.sites`), model analysis (:mod:`.analysis`), site detection (:mod:`.detect`), blocks (:mod:`.blocks`), the
decisions (:mod:`.decide`) and the FLOP estimates (:mod:`.flops`). The names this module held before stay importable
from it (and models pickled with them load).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

from torch import nn

from .analysis import ModelGraph, census, device_dtype, eager_records, eval_mode, is_conv_like, is_same_padding
from .blocks import block_host, block_stride1
from .decide import check_include, decide, place
from .detect import discover_sites
from .flops import DPP_FLOPS_PER_ELEMENT, dpp_flops, flops_of, operator_flops, site_flops
from .policy import ConversionPolicy, resolve_policy
from .sites import (
    Plan, ReasonCode, Site, SiteAction, SiteKind, SitePlacement, check_unwrapped, default_input_size, model_fingerprint,
    plan_model_name,
)

__all__ = ['Site', 'Plan', 'SiteKind', 'SiteAction', 'SitePlacement', 'ReasonCode', 'plan', 'census',
           'is_conv_like', 'is_same_padding', 'block_stride1', 'flops_of', 'DPP_FLOPS_PER_ELEMENT',
           'default_input_size', 'model_fingerprint', 'eval_mode']

# the names earlier versions defined here that other modules and pickles reach through this module
_MOVED = (block_host, device_dtype, eager_records, dpp_flops, operator_flops)


def plan(model: nn.Module, input_size: Optional[Sequence[int]] = None, policy: Optional[ConversionPolicy] = None,
         **policy_kwargs) -> Plan:
    """List the downsampling sites of ``model`` and what :func:`convert` would do to each. Changes nothing.

    Args:
        model: a timm (or any fx-traceable) model.
        input_size: (C, H, W) of the example input used to find feature-map sizes; defaults to the model's
            ``pretrained_cfg['input_size']``.
        policy: a :class:`ConversionPolicy`; keyword arguments override its fields.

    Returns:
        A :class:`Plan`; ``print(plan)`` shows the table. ``convert(model, plan=...)`` applies it.

    Which operator and placement (measured, ``docs/results/versus.md`` and ``placement.md``): the defaults, DPP at
    ``placement='block'``, because no other operator or placement was resolved better on the tasks measured; but
    DPP did not beat plain average or max pooling in the same places either (ResNet-18 from scratch: max pooling at
    ``pre`` ahead of DPP), nor the original model once it was trained long enough. Plan ``operator='avg'`` or
    ``'max'`` beside DPP and compare them on your task; they cost less to run. ``pre`` loses when fine-tuning a
    pretrained model.
    """
    check_unwrapped(model)
    policy = resolve_policy(policy, **policy_kwargs)
    input_size = tuple(input_size) if input_size is not None else default_input_size(model)
    if len(input_size) != 3:
        raise ValueError(f'input_size must be (C, H, W), but got {input_size}')
    fingerprint = model_fingerprint(model)
    g = ModelGraph(model, input_size, policy.leaf_modules)
    sites, modules, nodes = discover_sites(g)
    check_include(policy, sites)
    blocks = {}
    for site in sites:
        found = decide(model, g, site, nodes.get(site.name), modules[site.name], policy)
        if found is not None:
            blocks[site.name] = found
    place(sites, policy, blocks)
    block_cache: Dict[str, bool] = {}
    for site in sites:
        site_flops(model, g, site, modules[site.name], policy, block_cache)
    return Plan(model_name=plan_model_name(model), input_size=input_size, policy=policy, sites=sites, note=g.note,
                fingerprint=fingerprint)
