"""Blocks: finding the residual block a strided conv belongs to, and switching a block's downsampling to stride 1
(the 'block' placement)."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch.fx as fx
from torch import nn

from ..layers.geometry import to_pair
from .tracer import trace
from .analysis import ADD_TARGETS, ModelGraph, is_blur_pool, is_conv_like, is_same_padding, node_shape
from .rewrite import Undo, set_attr, set_child
from .sites import ReasonCode, Site

__all__ = ['size_preserving_at_stride1', 'iterating_container', 'block_host', 'find_block',
           'owner_traces_consistently', 'block_stride1']


def size_preserving_at_stride1(m: nn.Module) -> bool:
    if is_same_padding(m) or getattr(m, 'padding', None) == 'same':
        return True
    if isinstance(m.padding, str):
        return False
    k, p = to_pair(m.kernel_size, 'kernel_size'), to_pair(m.padding, 'padding')
    d = to_pair(getattr(m, 'dilation', 1), 'dilation')
    return all(2 * pi == di * (ki - 1) for ki, pi, di in zip(k, p, d))


def iterating_container(m: nn.Module) -> bool:
    """A ModuleDict/ModuleList, or a Sequential subclass with a forward of its own: a module whose forward may run
    over all of its children, so an added child would change it."""
    if isinstance(m, (nn.ModuleDict, nn.ModuleList)):
        return True
    return isinstance(m, nn.Sequential) and type(m).forward is not nn.Sequential.forward


def block_host(block: nn.Module) -> Optional[nn.Module]:
    """The module that owns the DPP applied to ``block``'s output: the block itself, or for a plain
    ``nn.Sequential`` (which returns its last child's output) its last child, recursively, so that the container
    keeps its length, indexing and iteration. None where the host would be a container that iterates its
    children (an added child would become one more step of its forward), or where the block has entry points
    besides ``forward`` (see :func:`_other_entry_points`)."""
    if _other_entry_points(block):
        return None
    host = block
    while isinstance(host, nn.Sequential) and type(host).forward is nn.Sequential.forward and len(host):
        host = host[-1]
    if iterating_container(host) or isinstance(host, nn.Sequential):
        return None
    return host


def _other_entry_points(m: nn.Module) -> List[str]:
    """Methods other than ``forward`` through which callers run the module (xception's ``forward_with_tap``, which
    ``forward_intermediates`` calls): a DPP wrapped around ``forward`` would be bypassed there."""
    cls = type(m)
    return [n for n in dir(cls) if n.startswith('forward_') and callable(getattr(cls, n, None))
            and not hasattr(nn.Module, n)]


def _ancestors_from_graph(g: ModelGraph, node: fx.Node) -> List[str]:
    """The modules that contain the module called at ``node`` (graph module stack), outermost first, that can own
    a DPP (:func:`block_host`): containers whose own forward iterates or indexes their children (timm's
    MixedConv2d is a ModuleDict) cannot own a DPP child without changing what they compute."""
    return [p for p in g.stack(node)[:-1] if block_host(g.model.get_submodule(p)) is not None]


def _ancestors_from_name(g: ModelGraph, name: str) -> List[str]:
    """The modules that contain module ``name`` (by its qualified name), outermost first, that can own a DPP."""
    parts = name.split('.')
    paths = ('.'.join(parts[:i]) for i in range(1, len(parts)))
    return [p for p in paths if block_host(g.model.get_submodule(p)) is not None]


def _graph_io_shapes(g: ModelGraph, path: str) -> Optional[Tuple[Any, Any]]:
    """(input shape, output shape) of module ``path``'s graph region if it takes one tensor input, else None."""
    inputs, last = g.region_io(path)
    if len(inputs) != 1 or last is None:
        return None
    return node_shape(inputs[0]), node_shape(last)


def _eager_io_shapes(g: ModelGraph, path: str) -> Optional[Tuple[Any, Any]]:
    """(input shape, output shape) of module ``path`` in the eager run if it ran once with one tensor input."""
    rec = g.eager.get(path)
    if rec is None or rec.calls != 1 or rec.tensor_args != 1:
        return None
    return rec.in_shape, rec.out_shape


def _residual_block(g: ModelGraph, node: fx.Node, ancestors: List[str]) -> Optional[Tuple[Optional[str], str]]:
    """The block ending at the first add downstream of the conv at ``node`` that also takes a path not through
    the conv (a residual add): (block, how), (None, why not) where that block cannot be used, or None where there
    is no such add inside an ancestor (then the block is found from sizes)."""
    desc = g.descendants(node)
    ordered = sorted(desc, key=g.index.__getitem__)
    for n in ordered[:200]:
        is_add = (n.op == 'call_function' and n.target in ADD_TARGETS) or (n.op == 'call_method' and n.target in
                                                                              ('add', 'add_'))
        if not is_add:
            continue
        others = [a for a in n.all_input_nodes if a not in desc and a is not node]
        if not others:
            continue
        end = n
        users = list(n.users)
        if len(users) == 1:
            u = users[0]
            if u.op in ('call_module', 'call_function', 'call_method') and node_shape(u) == node_shape(n):
                end = u
        end_stack = g.stack(end)
        common = [p for p in ancestors if p in end_stack]
        if common:
            block = common[-1]
            inputs, last = g.region_io(block)
            if len(inputs) != 1:
                return None, f'block {block} takes {len(inputs)} tensor inputs'
            if last is not None and node_shape(last) == node_shape(end):
                return block, f'residual add {n.name}'
        return None
    return None


def find_block(g: ModelGraph, site: Site, node: Optional[fx.Node]) -> Tuple[Optional[str], str]:
    """The enclosing block for the 'block' placement: (qualified name or None, how it was found / why not).

    Where the graph shows the site (``node``): the block of its residual add (:func:`_residual_block`), else the
    innermost enclosing module whose input and output sizes are the conv's (graph shapes). A site the graph does
    not show (inside an FX leaf, or no graph at all): the innermost enclosing module, called once with one tensor
    input, whose sizes are the site's in the eager run. Never a container iterating its children."""
    if node is not None:
        ancestors = _ancestors_from_graph(g, node)
        if not ancestors:
            return None, 'the conv is not inside a block module'
        found = _residual_block(g, node, ancestors)
        if found is not None:
            return found
        io_shapes, how = _graph_io_shapes, 'block without residual'
    else:
        ancestors, io_shapes, how = _ancestors_from_name(g, site.name), _eager_io_shapes, 'block from eager sizes'
    for path in reversed(ancestors):  # innermost first
        shapes = io_shapes(g, path)
        if shapes is None:
            continue
        ins, outs = shapes
        if ins is not None and outs is not None and len(ins) == 4 and len(outs) == 4 and \
                tuple(ins[2:]) == site.in_size and tuple(outs[2:]) == site.out_size:
            return path, how
    return None, 'no enclosing block with the same input and output sizes'


def owner_traces_consistently(model: nn.Module, owner: str) -> Optional[Tuple[ReasonCode, str]]:
    """None if the owner's forward traces to the same graph in train and eval mode, else (code, why not)."""
    mod = model.get_submodule(owner)
    graphs = []
    was_training = mod.training
    try:
        for mode in (True, False):
            mod.train(mode)
            gm = trace(mod, leaf_all_children=True, name=owner)
            graphs.append([(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes])
    except Exception as e:  # noqa: BLE001 - reported as the reason for skipping
        return ReasonCode.FUNCTIONAL_OWNER_UNTRACEABLE, f'its owner cannot be traced on its own ({type(e).__name__})'
    finally:
        mod.train(was_training)
    if graphs[0] != graphs[1]:
        return ReasonCode.FUNCTIONAL_OWNER_MODE_DEPENDENT, "its owner's forward differs between train and eval mode"
    return None


def block_stride1(block: nn.Module, undo: Optional[Undo] = None) -> Undo:
    """Set every downsampling conv and pool inside ``block`` to stride 1 (in place), as the 'block' placement
    does: strided convs and blur pools run at stride 1, a pool whose stride equals its kernel becomes
    ``nn.Identity``, another pool runs at stride 1 where that keeps its size. Records each change in ``undo`` (a new
    :class:`~dpp_surgery.surgery.rewrite.Undo` if none is given) as it is made and returns it; raises ValueError if
    a layer cannot keep its size at stride 1 (the changes made so far stay recorded)."""
    undo = Undo() if undo is None else undo
    for name, m in list(block.named_modules()):
        if m is block:
            continue
        if is_conv_like(m) and to_pair(m.stride, 'stride') != (1, 1):
            if not size_preserving_at_stride1(m) and not (to_pair(m.kernel_size, 'kernel_size') == (1, 1)):
                raise ValueError(f'conv {name} does not keep its size at stride 1')
            set_attr(m, 'stride', (1, 1), undo, where=name)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and to_pair(m.stride or m.kernel_size, 'stride') != (1, 1):
            k, p = to_pair(m.kernel_size, 'kernel_size'), to_pair(m.padding, 'padding')
            if to_pair(m.stride, 'stride') == k:
                set_child(block, name, nn.Identity(), undo)
            elif is_same_padding(m) or all(2 * pi == ki - 1 for ki, pi in zip(k, p)):
                set_attr(m, 'stride', (1, 1), undo, where=name)
            else:
                raise ValueError(f'pool {name} does not keep its size at stride 1')
        elif is_blur_pool(m) and to_pair(m.stride, 'stride') != (1, 1):
            if 2 * int(m.padding[0]) != int(m.filt_size) - 1:
                raise ValueError(f'blur pool {name} does not keep its size at stride 1')
            set_attr(m, 'stride', 1, undo, where=name)
    return undo
