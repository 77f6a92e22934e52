"""The decisions: for every site whether it is converted, where its operator goes (the placement), and why."""
from __future__ import annotations

import fnmatch
from typing import Dict, List, Optional, Sequence, Tuple

import torch.fx as fx
from torch import nn

from .analysis import ModelGraph
from .blocks import find_block, iterating_container, owner_traces_consistently, size_preserving_at_stride1
from .flops import try_block
from .policy import ConversionPolicy
from .sites import DOWNSAMPLING_KINDS, ReasonCode, Site, SiteAction, SiteKind, SitePlacement

__all__ = ['skip_site', 'decide', 'place', 'check_include']


def skip_site(site: Site, code: ReasonCode, reason: str, policy: bool = False) -> bool:
    """:meth:`Site.skip`, returning False (the site is not converted) for the decision steps."""
    site.skip(code, reason, policy)
    return False


def _decide_by_kind(g: ModelGraph, site: Site, node: Optional[fx.Node], policy: ConversionPolicy) -> bool:
    """The policy's and DPP's rules for the site's kind. False if that skips it."""
    if site.kind == SiteKind.GLOBAL_POOL:
        if policy.skip_global:
            return skip_site(site, ReasonCode.SKIP_GLOBAL, 'global/adaptive pool (skip_global=True)', policy=True)
        if site.out_size != (1, 1) or site.functional:
            return skip_site(site, ReasonCode.GLOBAL_POOL_UNSUPPORTED,
                            'adaptive pool with output larger than 1x1 or functional: not supported')
    elif site.kind in (SiteKind.MAX_POOL, SiteKind.AVG_POOL):
        if site.kind not in policy.targets:
            return skip_site(site, ReasonCode.NOT_IN_TARGETS, f'{site.kind} not in targets', policy=True)
        if site.stride == (1, 1) and policy.skip_stride1:
            return skip_site(site, ReasonCode.SKIP_STRIDE1, 'stride-1 pool, does not downsample (skip_stride1=True)',
                            policy=True)
    else:  # strided conv
        if SiteKind.STRIDED_CONV not in policy.targets:
            return skip_site(site, ReasonCode.NOT_IN_TARGETS, 'strided_conv not in targets', policy=True)
        stem = g.reads_image(node) if node is not None else not g.eager[site.name].after_conv
        if policy.skip_stem and stem:
            return skip_site(site, ReasonCode.SKIP_STEM, 'stem conv reads the image (skip_stem=True)', policy=True)
        if policy.skip_patchify and site.kernel == site.stride and site.padding in ((0, 0), 'valid'):
            return skip_site(site, ReasonCode.SKIP_PATCHIFY,
                            'patch-embedding conv, kernel == stride (skip_patchify=True)', policy=True)
    return True


def _decide_by_selection(g: ModelGraph, site: Site, node: Optional[fx.Node], module: Optional[nn.Module],
                         policy: ConversionPolicy) -> bool:
    """A module called more than once, and the policy's include/exclude patterns and types. False if they skip
    the site."""
    calls = 1 if site.functional else g.calls(site.name, node)
    if calls > 1:
        return skip_site(site, ReasonCode.CALLED_MORE_THAN_ONCE,
                        f'module is called {calls} times in forward; cannot give each call its own DPP')
    pattern = _matches(site.name, policy.exclude)
    if pattern:
        return skip_site(site, ReasonCode.EXCLUDED_NAME, f'excluded by pattern {pattern!r}', policy=True)
    t = _type_matches(site.module_type, module, policy.exclude_types)
    if t:
        return skip_site(site, ReasonCode.EXCLUDED_TYPE, f'excluded by type {t}', policy=True)
    if policy.include and not _matches(site.name, policy.include):
        return skip_site(site, ReasonCode.NOT_INCLUDED_NAME, 'not matched by include', policy=True)
    if policy.include_types and not _type_matches(site.module_type, module, policy.include_types):
        return skip_site(site, ReasonCode.NOT_INCLUDED_TYPE, 'not matched by include_types', policy=True)
    return True


def _decide_functional(model: nn.Module, site: Site) -> bool:
    """Whether the forward of a functional pool's owner can be rewritten; False (skipped) if not."""
    if site.owner and iterating_container(model.get_submodule(site.owner)):
        return skip_site(site, ReasonCode.FUNCTIONAL_IN_CONTAINER,
                        f'functional pool in {site.owner}, a container whose forward runs over its children: '
                        'a DPP child would change what it computes')
    if not site.owner:
        return skip_site(site, ReasonCode.FUNCTIONAL_IN_ROOT,
                        "functional pool in the model's own forward: forward_features/forward_head would disagree")
    why = owner_traces_consistently(model, site.owner)
    if why:
        return skip_site(site, why[0], f'functional pool: {why[1]}')
    return True


def _block_of(model: nn.Module, g: ModelGraph, site: Site, node: Optional[fx.Node]) -> Tuple[str, int, str]:
    """The block a 'block' placement would switch to stride 1 for the site, which must run at stride 1 on its own,
    and its output channels; or ``''``, 0 and why there is none."""
    block, how = find_block(g, site, node)
    if block is not None:
        trial = try_block(model, g, block)
        if isinstance(trial, str):
            block, how = None, trial
    if block is None:
        return '', 0, how
    return block, int(g.block_shapes(block)[1][1]), ''


def decide(model: nn.Module, g: ModelGraph, site: Site, node: Optional[fx.Node], module: Optional[nn.Module],
           policy: ConversionPolicy) -> Optional[Tuple[str, int, str]]:
    """Whether the site is converted: its action and, if it is skipped, why (the policy's choices, then what DPP can
    take). Where its operator goes is :func:`place`'s; for a converted strided conv under the 'block' policy this
    returns what :func:`place` needs, the block found for it (:func:`_block_of`), else None."""
    if site.kind == SiteKind.DPP:
        site.skip(ReasonCode.ALREADY_CONVERTED, 'already converted')
        return None
    if site.reason:  # set during discovery (unsupported geometry)
        site.skip(site.reason_code, site.reason)
        return None
    if not _decide_by_kind(g, site, node, policy) or not _decide_by_selection(g, site, node, module, policy):
        return None
    if site.functional and not _decide_functional(model, site):
        return None
    conv = site.kind == SiteKind.STRIDED_CONV
    if conv and policy.placement == 'pre' and not size_preserving_at_stride1(module):
        site.skip(ReasonCode.PRE_NOT_SIZE_PRESERVING,
                  "placement 'pre' needs a conv that keeps its size at stride 1 (padding (k-1)/2 or 'same')")
        return None
    site.action = SiteAction.REPLACE
    return _block_of(model, g, site, node) if conv and policy.placement == 'block' else None


def place(sites: List[Site], policy: ConversionPolicy, blocks: Dict[str, Tuple[str, int, str]]) -> None:
    """Where each converted site's operator goes, and the reason it records: the one place placement is decided.

    A global pool takes ``global``, a pool ``pool`` (``functional`` in a forward), a strided conv the policy's
    placement. With ``block`` (``blocks``: what :func:`decide` found per strided conv), a conv without a block that
    runs at stride 1 takes ``post``; a block that holds a downsampling site the policy leaves alone is not
    converted, and its convs take ``post``; every other downsampling site inside a converted block runs at stride 1
    with the block's one operator after it (``block``)."""
    converted = [s for s in sites if s.action == SiteAction.REPLACE]
    for site in converted:
        if site.kind == SiteKind.GLOBAL_POOL:
            site.placement = SitePlacement.GLOBAL
        elif site.kind != SiteKind.STRIDED_CONV:
            site.placement = SitePlacement.FUNCTIONAL if site.functional else SitePlacement.POOL
        else:
            site.placement = SitePlacement(policy.placement)
    owners: Dict[str, Tuple[str, int]] = {}  # block -> (the site that found it, its channels), in site order
    for site in converted:
        if site.name not in blocks:
            continue
        block, channels, why = blocks[site.name]
        if block:
            owners.setdefault(block, (site.name, channels))
        else:
            site.placement = SitePlacement.POST
            site.set_reason(ReasonCode.NO_BLOCK, f'no block ({why})')
    for block, (_, channels) in owners.items():
        inner = [s for s in sites if s.name.startswith(block + '.') and s.stride != (1, 1)
                 and s.kind in DOWNSAMPLING_KINDS]
        kept = [s for s in inner if s.action == SiteAction.SKIP]
        for site in (s for s in inner if s.action == SiteAction.REPLACE):
            if kept and site.placement == SitePlacement.BLOCK:
                site.placement, site.block = SitePlacement.POST, ''
                site.set_reason(ReasonCode.BLOCK_HOLDS_SKIPPED,
                                f'block {block} holds {kept[0].name}, which the policy leaves alone')
            elif not kept:
                site.placement, site.block, site.block_channels = SitePlacement.BLOCK, block, channels


def _matches(name: str, patterns: Sequence[str]) -> Optional[str]:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def _type_matches(type_name: str, module: Optional[nn.Module], types) -> Optional[str]:
    for t in types:
        if isinstance(t, str) and t == type_name:
            return t
        if isinstance(t, type) and module is not None and isinstance(module, t):
            return t.__name__
    return None


def check_include(policy: ConversionPolicy, sites: List[Site]) -> None:
    """Every include pattern must match a site (ValueError listing the sites otherwise)."""
    for pattern in policy.include:
        if not any(fnmatch.fnmatchcase(s.name, pattern) for s in sites):
            names = ', '.join(s.name for s in sites[:12]) + (' ...' if len(sites) > 12 else '')
            raise ValueError(f'include pattern {pattern!r} matches no downsampling site; sites are: {names}')
