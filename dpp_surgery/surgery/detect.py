"""Site detection: every downsampling site of a traced model (module pools, functional pools, strided convs,
global pools), in the order the model runs them."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch.fx as fx
from torch import nn

from ..layers import DPP2d
from ..layers.geometry import to_pair
from .analysis import (
    FUNCTIONAL_GLOBAL, FUNCTIONAL_POOLS, ModelGraph, census, dpp_placement_of, is_blur_pool, is_conv_like,
    is_other_pool, is_same_padding, node_shape, pair_or_none,
)
from .sites import ReasonCode, Site, SiteKind

__all__ = ['census_sites', 'discover_sites']


def _site_for_module(g: ModelGraph, node: fx.Node, m: nn.Module) -> Optional[Site]:
    in_shape = node.meta.get('dpp_in_shape') or (node_shape(node.args[0]) if node.args else None)
    return _module_site(node.target, m, in_shape, node_shape(node), node=node.name)


def _module_site(name: str, m: nn.Module, in_shape, out_shape, node: Optional[str] = None,
                 census: bool = False) -> Optional[Site]:
    """The site of module ``m`` (None if it is not one), with the shapes of its input and output. A ``census``
    site (found from the modules, not the graph) is made even without shapes, which then read as 0x0."""
    known = in_shape is not None and out_shape is not None and len(in_shape) == 4 and len(out_shape) == 4
    if not known and not census:
        return None
    ins = tuple(int(v) for v in in_shape) if known else (0, 0, 0, 0)
    outs = tuple(int(v) for v in out_shape) if known else (0, 0, 0, 0)
    common = dict(name=name, module_type=type(m).__name__, functional=False, in_channels=ins[1],
                  out_channels=outs[1], in_size=(ins[2], ins[3]), out_size=(outs[2], outs[3]), node=node)
    if isinstance(m, DPP2d) or dpp_placement_of(m) in ('post', 'pre'):
        dpp = m if isinstance(m, DPP2d) else getattr(m, 'dpp', None)
        geometry = ((to_pair(dpp.kernel_size, 'kernel_size'), to_pair(dpp.stride, 'stride'))
                    if isinstance(dpp, DPP2d) else ((1, 1), (1, 1)))
        return Site(kind=SiteKind.DPP, kernel=geometry[0], stride=geometry[1], padding=(0, 0), ceil_mode=False,
                    reason='already converted', reason_code=ReasonCode.ALREADY_CONVERTED, **common)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        kind = SiteKind.MAX_POOL if isinstance(m, nn.MaxPool2d) else SiteKind.AVG_POOL
        padding = 'same' if is_same_padding(m) else to_pair(m.padding, 'padding')
        site = Site(kind=kind, kernel=to_pair(m.kernel_size, 'kernel_size'),
                    stride=to_pair(m.stride or m.kernel_size, 'stride'), padding=padding, ceil_mode=bool(m.ceil_mode),
                    **common)
        if isinstance(m, nn.MaxPool2d) and to_pair(m.dilation, 'dilation') != (1, 1):
            site.set_reason(ReasonCode.DILATED_POOL, 'dilated pooling is not supported')
        return site
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return Site(kind=SiteKind.GLOBAL_POOL, kernel=common['in_size'], stride=(1, 1), padding=(0, 0),
                    ceil_mode=False, **common)
    if is_conv_like(m) and to_pair(m.stride, 'stride') != (1, 1):
        padding = 'same' if is_same_padding(m) else (
            m.padding if isinstance(m.padding, str) else to_pair(m.padding, 'padding'))
        # a dilated conv keeps its dilation: every placement only changes its stride
        return Site(kind=SiteKind.STRIDED_CONV, kernel=to_pair(m.kernel_size, 'kernel_size'),
                    stride=to_pair(m.stride, 'stride'), padding=padding, ceil_mode=False, **common)
    if is_blur_pool(m):
        # anti-aliased downsampling (a fixed binomial average over a window, then the stride): DPP takes the same
        # window, stride and (symmetric) padding
        k, pad = int(m.filt_size), int(m.padding[0])
        return Site(kind=SiteKind.AVG_POOL, kernel=(k, k), stride=to_pair(m.stride, 'stride'), padding=(pad, pad),
                    ceil_mode=False, **common)
    if is_other_pool(m):
        kernel = pair_or_none(getattr(m, 'kernel_size', None) or getattr(m, 'filt_size', None))
        stride = pair_or_none(getattr(m, 'stride', None)) or kernel or (0, 0)
        kernel = kernel or stride
        return Site(kind=SiteKind.POOL, kernel=kernel, stride=stride, padding=(0, 0), ceil_mode=False,
                    reason=f'{type(m).__name__} is a pooling type DPP does not replace (max and average pools only)',
                    reason_code=ReasonCode.UNSUPPORTED_POOL_TYPE, **common)
    return None


def _site_for_function(g: ModelGraph, node: fx.Node) -> Optional[Site]:
    in_shape, out_shape = node_shape(node.args[0]) if node.args else None, node_shape(node)
    if in_shape is None or out_shape is None or len(in_shape) != 4:
        return None
    stack = g.stack(node)
    owner = stack[-1] if stack else ''
    # the node's name in a trace of its owner alone (the owner's forward is what conversion rewrites)
    same = [n for n in (g.regions.get(owner, []) if owner else g.nodes) if n.op == 'call_function'
            and n.target is node.target and g.stack(n)[-1:] == stack[-1:]]
    ordinal = same.index(node)
    local = g.owner_node_names(owner, node.target)
    node_name = local[ordinal] if ordinal < len(local) else node.name
    name = f'{owner}.{node_name}' if owner else node_name
    common = dict(name=name, module_type=f'F.{getattr(node.target, "__name__", str(node.target))}', functional=True,
                  in_channels=int(in_shape[1]), out_channels=int(out_shape[1]),
                  in_size=(int(in_shape[2]), int(in_shape[3])), out_size=(int(out_shape[2]), int(out_shape[3])),
                  node=node_name, owner=owner, ordinal=ordinal, fn=node.target)
    if node.target in FUNCTIONAL_GLOBAL:
        return Site(kind=SiteKind.GLOBAL_POOL, kernel=common['in_size'], stride=(1, 1), padding=(0, 0),
                    ceil_mode=False, **common)
    kind = SiteKind(FUNCTIONAL_POOLS[node.target])
    names = ['kernel_size', 'stride', 'padding', 'dilation', 'ceil_mode'] if kind == SiteKind.MAX_POOL else \
        ['kernel_size', 'stride', 'padding', 'ceil_mode']
    values = dict(zip(names, node.args[1:]))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    kernel = to_pair(values['kernel_size'], 'kernel_size')
    stride = values.get('stride') or kernel
    site = Site(kind=kind, kernel=kernel, stride=to_pair(stride, 'stride'),
                padding=to_pair(values.get('padding', 0), 'padding'), ceil_mode=bool(values.get('ceil_mode', False)),
                **common)
    if kind == SiteKind.MAX_POOL and to_pair(values.get('dilation', 1), 'dilation') != (1, 1):
        site.set_reason(ReasonCode.DILATED_POOL, 'dilated pooling is not supported')
    return site


def census_sites(g: ModelGraph, known: set) -> List[Site]:
    """Sites of the census modules that graph discovery did not list (see :func:`census`)."""
    out = []
    for name, _ in census(g.model):
        if name in known:
            continue
        module = g.model.get_submodule(name)
        rec = g.eager.get(name)
        site = _module_site(name, module, rec.in_shape if rec else None, rec.out_shape if rec else None, census=True)
        if rec is None and not site.reason:
            site.set_reason(ReasonCode.NOT_RUN, 'not run by the forward pass at this input size (eager run)')
        elif rec is not None and (site.in_size == (0, 0) or site.out_size == (0, 0)) and not site.reason:
            site.set_reason(ReasonCode.NOT_NCHW, 'its input or output is not an (N, C, H, W) tensor')
        out.append(site)
    return out


def _insert_in_order(g: ModelGraph, sites: List[Site], site: Site) -> None:
    """Insert a census site before the first listed site whose module runs after it (eager order)."""
    def order(s):
        rec = g.eager.get(s.owner if s.functional else s.name)
        return rec.order if rec is not None else float('inf')

    mine = order(site)
    at = next((i for i, s in enumerate(sites) if order(s) > mine and not (s.functional and not s.owner)), len(sites))
    sites.insert(at, site)


def discover_sites(g: ModelGraph) -> Tuple[List[Site], Dict[str, Optional[nn.Module]], Dict[str, fx.Node]]:
    """Every site, in forward order: those the graph shows (module and functional), then the census modules it
    does not show (inside FX leaves, conv-like modules traced through, or no graph at all; shapes from the eager
    run). Returns the sites and, by site name, their modules (None for functional sites) and graph nodes."""
    sites: List[Site] = []
    modules: Dict[str, Optional[nn.Module]] = {}
    nodes: Dict[str, fx.Node] = {}
    seen_modules = set()
    for n in g.nodes:
        site = None
        module = None
        if n.op == 'call_module':
            if n.target in seen_modules:
                continue
            module = g.gm.get_submodule(n.target)
            site = _site_for_module(g, n, module)
            if site is not None:
                seen_modules.add(n.target)
        elif n.op == 'call_function' and (n.target in FUNCTIONAL_POOLS or n.target in FUNCTIONAL_GLOBAL):
            site = _site_for_function(g, n)
        if site is None:
            continue
        sites.append(site)
        modules[site.name] = module
        nodes[site.name] = n
    for site in census_sites(g, {s.name for s in sites}):
        modules[site.name] = g.model.get_submodule(site.name)
        _insert_in_order(g, sites, site)
    return sites, modules, nodes
