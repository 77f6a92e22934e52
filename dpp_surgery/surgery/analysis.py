"""Model analysis: the traced graph of a model with its shapes (:class:`ModelGraph`), eager shape records, and the
checks of what a module is (conv-like, pools of other kinds, 'same' padding)."""
from __future__ import annotations

import contextlib
import io
import operator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import BlurPool2d
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..utils import first_line
from ..layers import DPP2d
from ..layers.geometry import is_same_padding, to_pair
from .tracer import TraceError, trace

__all__ = ['FUNCTIONAL_POOLS', 'FUNCTIONAL_GLOBAL', 'ADD_TARGETS', 'node_shape', 'is_same_padding', 'eval_mode',
           'dpp_placement_of', 'pair_or_none', 'is_conv_like', 'is_blur_pool', 'is_other_pool', 'census',
           'device_dtype', 'ModuleRecord', 'eager_records', 'ModelGraph']


FUNCTIONAL_POOLS = {F.max_pool2d: 'max_pool', torch.max_pool2d: 'max_pool', F.avg_pool2d: 'avg_pool'}


FUNCTIONAL_GLOBAL = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


ADD_TARGETS = {operator.add, operator.iadd, torch.add}


def node_shape(node) -> Optional[torch.Size]:
    meta = node.meta.get('tensor_meta') if isinstance(node, fx.Node) else None
    return getattr(meta, 'shape', None)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``module`` in eval mode; its own mode (train or eval) is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def dpp_placement_of(m: nn.Module) -> Optional[str]:
    return getattr(type(m), 'dpp_placement', None)


def pair_or_none(v) -> Optional[Tuple[int, int]]:
    """``v`` as an (int, int) pair if it is an int or a 2-sequence of ints (:func:`to_pair`), else None."""
    try:
        return to_pair(v, 'value')
    except TypeError:
        return None


def is_conv_like(m: nn.Module) -> bool:
    """An ``nn.Conv2d`` (any subclass), or a module that is a 2-D conv without being one (timm's ``CondConv2d``):
    it has ``in_channels``, ``out_channels`` and 2-D ``kernel_size`` and ``stride``, holds no conv-like module
    itself, and is neither a pool nor a 1-D/3-D conv."""
    if isinstance(m, nn.Conv2d):
        return True
    if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, DPP2d)):
        return False
    if not all(hasattr(m, a) for a in ('in_channels', 'out_channels')) \
            or pair_or_none(getattr(m, 'stride', None)) is None \
            or pair_or_none(getattr(m, 'kernel_size', None)) is None:
        return False
    return not any(is_conv_like(c) for c in m.children())


_OTHER_POOL_TYPES = (nn.LPPool2d, nn.FractionalMaxPool2d)


def is_blur_pool(m: nn.Module) -> bool:
    """timm's ``BlurPool2d`` with symmetric padding of at most half its window (what DPP2d can take)."""
    if not isinstance(m, BlurPool2d) or pair_or_none(m.stride) is None:
        return False
    pads = list(m.padding)
    return len(set(pads)) == 1 and 2 * pads[0] <= m.filt_size


def is_other_pool(m: nn.Module) -> bool:
    """A downsampling pool that DPP does not replace (``nn.LPPool2d``, ``nn.FractionalMaxPool2d``, another
    pooling class by name; not max/average pools or blur pools): stride above 1."""
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, DPP2d)) or is_conv_like(m) or is_blur_pool(m):
        return False
    if not (isinstance(m, _OTHER_POOL_TYPES) or 'pool' in type(m).__name__.lower()):
        return False
    # nn pools: stride None means the kernel size
    stride = pair_or_none(getattr(m, 'stride', None) or getattr(m, 'kernel_size', None))
    return stride is not None and stride != (1, 1)


def census(model: nn.Module) -> List[Tuple[str, str]]:
    """Every downsampling module of ``model``, found from its modules alone (no tracing): (qualified name, kind)
    for each conv-like module (:func:`is_conv_like`) with stride > 1 (``'strided_conv'``) and each pooling module
    with stride > 1 (``'max_pool'``, ``'avg_pool'``, or ``'pool'`` for other pooling types). Converted sites (DPP)
    are not downsampling modules of their own and are not listed. :func:`plan` lists every census site."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, DPP2d):
            continue
        if is_conv_like(m) and to_pair(m.stride, 'stride') != (1, 1):
            out.append((name, 'strided_conv'))
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and to_pair(m.stride or m.kernel_size, 'stride') != (1, 1):
            out.append((name, 'max_pool' if isinstance(m, nn.MaxPool2d) else 'avg_pool'))
        elif is_blur_pool(m) and to_pair(m.stride, 'stride') != (1, 1):
            out.append((name, 'avg_pool'))
        elif is_other_pool(m):
            out.append((name, 'pool'))
    return out


def device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first floating-point parameter (CPU float32 if it has none)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device('cpu'), torch.float32)


@dataclass
class ModuleRecord:
    """What one eager forward pass saw of a module: its first call's tensor shapes and how often it ran."""
    calls: int = 0
    order: int = -1  # index of its first call among all module calls
    in_shape: Optional[Tuple[int, ...]] = None  # first tensor positional argument of the first call
    tensor_args: int = 0  # tensor positional arguments of the first call
    out_shape: Optional[Tuple[int, ...]] = None  # output of the first call, if a tensor
    after_conv: bool = False  # a conv-like or linear module started before it


def eager_records(model: nn.Module, example: torch.Tensor) -> Tuple[Dict[str, ModuleRecord], tuple]:
    """Per-module :class:`ModuleRecord` from one forward pass of ``model`` on ``example`` (hooks, no graph, no
    autograd; the caller picks train or eval mode, see :func:`eval_mode`), and the shapes of every tensor the model
    returns (lists, tuples and dicts of features included; other leaves by type name). The one shape recorder of
    the package: :func:`plan` and ``convert``'s size check both use it."""
    from torch.utils._pytree import tree_leaves

    records: Dict[str, ModuleRecord] = {}
    state = {'order': 0, 'conv': False}
    hooks = []
    convs = {id(m) for m in model.modules() if is_conv_like(m) or isinstance(m, nn.Linear)}

    def pre(mod, args, name):
        rec = records.setdefault(name, ModuleRecord())
        rec.calls += 1
        if rec.calls == 1:
            rec.order, rec.after_conv = state['order'], state['conv']
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            rec.tensor_args = len(tensors)
            rec.in_shape = tuple(tensors[0].shape) if tensors else None
        state['order'] += 1
        if id(mod) in convs:
            state['conv'] = True

    def post(mod, args, out, name):
        rec = records[name]
        if rec.out_shape is None and rec.calls == 1 and isinstance(out, torch.Tensor):
            rec.out_shape = tuple(out.shape)

    for name, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: pre(mod, args, name)))
        hooks.append(m.register_forward_hook(lambda mod, args, out, name=name: post(mod, args, out, name)))
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in hooks:
            h.remove()
    return records, tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                          for t in tree_leaves(out))


def _trace_tolerant(model: nn.Module, leaf_modules) -> Tuple[Optional[fx.GraphModule], List[Tuple[str, str]], str]:
    """Trace ``model``; a submodule whose forward does not trace becomes a leaf (its sites are then found by the
    module census) and the trace is retried. Returns (graph module or None if the model's own forward does not
    trace, [(qualified name, class name) made leaves], note)."""
    extra = list(leaf_modules)
    auto: List[Tuple[str, str]] = []
    for _ in range(32):
        try:
            return trace(model, extra), auto, ''
        except TraceError as e:
            cls = e.module_type
            if not e.module_name or cls is None or cls in extra or cls is type(model):
                return None, auto, (f"the model's forward does not trace with torch.fx ({first_line(e)[:160]}); "
                                    "sites come from the module census and an eager run, so functional pools are "
                                    "not analysed and 'block' uses eager sizes")
            extra.append(cls)
            auto.append((e.module_name, cls.__name__))
    return None, auto, 'torch.fx tracing kept failing; sites come from the module census and an eager run'


class ModelGraph:
    """The traced model (where it traces) with shapes and module regions, plus an eager record of every module."""

    def __init__(self, model: nn.Module, input_size, leaf_modules):
        self.model = model
        self.gm, auto, self.note = _trace_tolerant(model, leaf_modules)
        if auto:
            made = ', '.join(f'{n} ({c})' for n, c in auto)
            self.note = '; '.join(x for x in (f'traced with {made} as FX leaves (their forward does not trace); '
                                              'the sites inside them come from the module census', self.note) if x)
        self.nodes = list(self.gm.graph.nodes) if self.gm is not None else []
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.device, self.dtype = device_dtype(model)
        # block name -> (FLOPs before, FLOPs at stride 1) or the reason it cannot run at stride 1
        self.block_trials: Dict[str, Union[Tuple[int, int], str]] = {}
        example = torch.randn(1, *input_size, device=self.device, dtype=self.dtype)
        with eval_mode(model):
            self.eager, _ = eager_records(model, example)
            if self.gm is not None:
                self._propagate(example)
        # module regions: qualified name -> nodes (in graph order) executed inside it
        self.regions: Dict[str, List[fx.Node]] = {}
        for n in self.nodes:
            for path in n.meta.get('nn_module_stack', {}):
                self.regions.setdefault(path, []).append(n)
        self.call_counts: Dict[str, int] = {}
        for n in self.nodes:
            if n.op == 'call_module':
                self.call_counts[n.target] = self.call_counts.get(n.target, 0) + 1
        self._owner_names: Dict[tuple, List[str]] = {}

    def _propagate(self, example: torch.Tensor) -> None:
        try:
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints tracebacks
                ShapeProp(self.gm).propagate(example)
        except Exception as e:  # noqa: BLE001 - fall back to shapes from the eager run
            # the traced graph does not run as the model does (shape-dependent Python in some forward); take
            # every module's shapes from the real forward pass instead
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            self.note = '; '.join(x for x in (self.note, (
                f'the traced graph does not run ({first}); shapes come from an eager run, so functional pools are '
                "not analysed and 'block' falls back to 'post'")) if x)
            for n in self.gm.graph.nodes:
                n.meta.pop('tensor_meta', None)
                rec = self.eager.get(n.target) if n.op == 'call_module' else None
                if rec is not None and rec.out_shape is not None:
                    n.meta['tensor_meta'] = SimpleNamespace(shape=torch.Size(rec.out_shape))
                    if rec.in_shape is not None:
                        n.meta['dpp_in_shape'] = torch.Size(rec.in_shape)

    def calls(self, name: str, node: Optional[fx.Node]) -> int:
        """How often module ``name`` runs in forward (graph calls where the graph has it, else eager calls)."""
        if node is not None:
            return self.call_counts.get(name, 1)
        rec = self.eager.get(name)
        return rec.calls if rec is not None else 0

    def block_shapes(self, block: str) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """Input and output shape of a (single-input, called-once) block module."""
        rec = self.eager[block]
        return rec.in_shape, rec.out_shape

    def owner_node_names(self, owner: str, target) -> List[str]:
        """Names of the calls of ``target`` in a trace of module ``owner`` alone, in order ([] if it fails)."""
        key = (owner, target)
        if key not in self._owner_names:
            names: List[str] = []
            if owner:
                try:
                    gm = trace(self.model.get_submodule(owner), leaf_all_children=True, name=owner)
                    names = [n.name for n in gm.graph.nodes if n.op == 'call_function' and n.target is target]
                except Exception:  # noqa: BLE001 - reported when the site is decided
                    names = []
            self._owner_names[key] = names
        return self._owner_names[key]

    def stack(self, node) -> List[str]:
        return list(node.meta.get('nn_module_stack', {}))

    def reads_image(self, node: fx.Node) -> bool:
        """Whether ``node``'s input comes from the model input without passing through a conv or linear."""
        todo, seen = list(node.all_input_nodes), set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == 'placeholder':
                return True
            if n.op == 'call_module':
                m = self.gm.get_submodule(n.target)
                if isinstance(m, (nn.Conv2d, nn.Linear)) or (isinstance(m, DPP2d)):
                    continue
            todo.extend(n.all_input_nodes)
        return False

    def region_io(self, path: str) -> Tuple[List[fx.Node], Optional[fx.Node]]:
        """External tensor inputs of a module's region and its last node."""
        region = self.regions.get(path, [])
        inside = set(region)
        inputs = []
        for n in region:
            for a in n.all_input_nodes:
                if a not in inside and a not in inputs and node_shape(a) is not None:
                    inputs.append(a)
        return inputs, (region[-1] if region else None)

    def descendants(self, node: fx.Node, limit: int = 400) -> set:
        out, todo = set(), [node]
        while todo and len(out) < limit:
            n = todo.pop()
            for u in n.users:
                if u not in out:
                    out.add(u)
                    todo.append(u)
        return out
