"""Discovery of downsampling sites and the conversion plan (read-only).

:func:`plan` traces a model with torch.fx (timm's leaves and autowrap functions), propagates the shapes of one
example input, and lists every downsampling site: module pools, functional pools (``F.max_pool2d`` in a
``forward``), strided convolutions and global pools, with what :func:`dpp_surgery.convert` would do to each.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import hashlib
import io
import operator
from dataclasses import dataclass, field
from enum import Enum
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import BlurPool2d
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..utils import first_line
from ..layers import DPP2d
from ..layers.geometry import to_pair
from .policy import ConversionPolicy, resolve_policy
from .tracer import TraceError, trace

__all__ = ['Site', 'Plan', 'SiteKind', 'SiteAction', 'SitePlacement', 'ReasonCode', 'plan', 'census',
           'is_conv_like', 'is_same_padding', 'block_stride1', 'flops_of', 'DPP_FLOPS_PER_ELEMENT',
           'default_input_size', 'model_fingerprint', 'eval_mode']

DPP_FLOPS_PER_ELEMENT = 10  # guide share, deviation, square, eps, log, normalise, scale, exp, weight, weighted sum

_FUNCTIONAL_POOLS = {F.max_pool2d: 'max_pool', torch.max_pool2d: 'max_pool', F.avg_pool2d: 'avg_pool'}
_FUNCTIONAL_GLOBAL = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
# the functions a functional site can hold, by a name that pickles (F.max_pool2d itself does not)
_SITE_FUNCTIONS = {'F.max_pool2d': F.max_pool2d, 'torch.max_pool2d': torch.max_pool2d, 'F.avg_pool2d': F.avg_pool2d,
                   'F.adaptive_avg_pool2d': F.adaptive_avg_pool2d, 'F.adaptive_max_pool2d': F.adaptive_max_pool2d}
_ADD_TARGETS = {operator.add, operator.iadd, torch.add}


class _StrEnum(str, Enum):
    """A str-valued Enum that stands for its value wherever a string is expected: it compares equal to the plain
    string, hashes like it (dict keys, sets), and ``str()``, f-strings and JSON give the value."""

    def __str__(self) -> str:
        return str.__str__(self)

    __format__ = str.__format__


class SiteKind(_StrEnum):
    """What a downsampling site is (:attr:`Site.kind`)."""
    MAX_POOL = 'max_pool'
    AVG_POOL = 'avg_pool'  # average pools and timm's BlurPool2d
    STRIDED_CONV = 'strided_conv'
    POOL = 'pool'  # another pooling type, which DPP does not replace
    GLOBAL_POOL = 'global_pool'
    DPP = 'dpp'  # already converted


class SiteAction(_StrEnum):
    """What conversion does to a site (:attr:`Site.action`)."""
    REPLACE = 'replace'
    SKIP = 'skip'


class SitePlacement(_StrEnum):
    """Where a site's DPP goes (:attr:`Site.placement`): for strided convs one of the policy placements
    (``'post'``, ``'pre'``, ``'block'``; :data:`~dpp_surgery.surgery.policy.PLACEMENTS`), for the other kinds
    ``'pool'`` (a module pool replaced by DPP2d), ``'functional'`` (a functional pool in a rewritten forward) or
    ``'global'`` (a global pool); ``''`` while undecided (most skipped sites)."""
    NONE = ''
    POOL = 'pool'
    POST = 'post'
    PRE = 'pre'
    BLOCK = 'block'
    FUNCTIONAL = 'functional'
    GLOBAL = 'global'


class ReasonCode(_StrEnum):
    """Why a site is skipped, or a note on how it is converted (:attr:`Site.reason_code`, beside the prose of
    :attr:`Site.reason`). Policy choices (``Site.policy_skip``) are the ``SKIP_*``, ``NOT_IN_TARGETS``,
    ``EXCLUDED_*`` and ``NOT_INCLUDED_*`` codes; the others are limitations or notes."""
    NONE = ''
    # found during discovery
    ALREADY_CONVERTED = 'already_converted'
    DILATED_POOL = 'dilated_pool'
    UNSUPPORTED_POOL_TYPE = 'unsupported_pool_type'  # LPPool2d, FractionalMaxPool2d, ...
    NOT_RUN = 'not_run'  # a census module the forward pass does not run at this input size
    NOT_NCHW = 'not_nchw'  # its input or output is not an (N, C, H, W) tensor
    # policy choices
    SKIP_GLOBAL = 'skip_global'
    NOT_IN_TARGETS = 'not_in_targets'
    SKIP_STRIDE1 = 'skip_stride1'
    SKIP_STEM = 'skip_stem'
    SKIP_PATCHIFY = 'skip_patchify'
    EXCLUDED_NAME = 'excluded_name'
    EXCLUDED_TYPE = 'excluded_type'
    NOT_INCLUDED_NAME = 'not_included_name'
    NOT_INCLUDED_TYPE = 'not_included_type'
    # limitations
    GLOBAL_POOL_UNSUPPORTED = 'global_pool_unsupported'  # output larger than 1x1, or functional
    CALLED_MORE_THAN_ONCE = 'called_more_than_once'
    FUNCTIONAL_IN_CONTAINER = 'functional_in_container'
    FUNCTIONAL_IN_ROOT = 'functional_in_root'
    FUNCTIONAL_OWNER_UNTRACEABLE = 'functional_owner_untraceable'
    FUNCTIONAL_OWNER_MODE_DEPENDENT = 'functional_owner_mode_dependent'
    PRE_NOT_SIZE_PRESERVING = 'pre_not_size_preserving'
    # notes on a replaced site: 'block' fell back to 'post'
    NO_BLOCK = 'no_block'
    BLOCK_HOLDS_SKIPPED = 'block_holds_skipped'


_KIND_LABEL = {
    SiteKind.MAX_POOL: 'max pool', SiteKind.AVG_POOL: 'avg pool', SiteKind.STRIDED_CONV: 'strided conv',
    SiteKind.GLOBAL_POOL: 'global pool', SiteKind.DPP: 'DPP (converted)', SiteKind.POOL: 'pool (other)',
}
_DOWNSAMPLING_KINDS = (SiteKind.MAX_POOL, SiteKind.AVG_POOL, SiteKind.STRIDED_CONV, SiteKind.POOL)


def default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """The model's ``pretrained_cfg['input_size']`` (timm), else (3, 224, 224)."""
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    size = cfg.get('input_size') if isinstance(cfg, dict) else None
    return tuple(size) if size else (3, 224, 224)


def _model_name(model: nn.Module) -> str:
    """The name a plan gives ``model``: its timm architecture, else its class name."""
    cfg = getattr(model, 'pretrained_cfg', None)
    name = cfg.get('architecture') if isinstance(cfg, dict) else None
    return name or type(model).__name__


def model_fingerprint(model: nn.Module) -> str:
    """A digest of ``model``'s module structure: every module's qualified name, class and stride. Conversion
    changes it (classes, strides), so a :class:`Plan` made before stops matching the model once it is applied."""
    h = hashlib.sha1()
    for name, m in model.named_modules():
        h.update(f'{name}|{type(m).__module__}.{type(m).__qualname__}|{getattr(m, "stride", None)!r};'.encode())
    return h.hexdigest()


@dataclass
class Site:
    """One downsampling site and what conversion does to it.

    ``name`` is the module's qualified name as ``named_modules()`` prints it; a functional site is named by its
    owner module's name and the fx node name (``Mixed_6a.max_pool2d``). ``kind``, ``action``, ``placement`` and
    ``reason_code`` are str-valued enums (:class:`SiteKind`, :class:`SiteAction`, :class:`SitePlacement`,
    :class:`ReasonCode`): they compare equal to their plain-string values.
    """
    name: str
    kind: SiteKind
    module_type: str
    functional: bool
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Any
    ceil_mode: bool
    in_channels: int
    out_channels: int
    in_size: Tuple[int, int]
    out_size: Tuple[int, int]
    action: SiteAction = SiteAction.SKIP
    reason: str = ''
    reason_code: ReasonCode = ReasonCode.NONE  # the reason as a code (set wherever ``reason`` is)
    policy_skip: bool = False  # skipped by a policy choice (stem, targets, exclude, ...), not by a limitation
    placement: SitePlacement = SitePlacement.NONE
    block: str = ''  # the enclosing block (placement 'block')
    block_channels: int = 0  # its output channels
    flops_before: int = 0
    flops_after: int = 0
    # internal
    node: Optional[str] = field(default=None, repr=False)
    owner: str = field(default='', repr=False)
    ordinal: int = field(default=0, repr=False)  # functional sites: index among the owner's calls of the function
    fn: Any = field(default=None, repr=False)  # functional sites: the function

    def __post_init__(self):
        self.kind, self.action = SiteKind(self.kind), SiteAction(self.action)
        self.placement, self.reason_code = SitePlacement(self.placement), ReasonCode(self.reason_code)

    def set_reason(self, code: ReasonCode, text: str) -> None:
        """Set :attr:`reason_code` and :attr:`reason` together."""
        self.reason_code, self.reason = ReasonCode(code), text

    def skip(self, code: ReasonCode, text: str, policy: bool = False) -> None:
        """Mark the site skipped, for ``text`` (coded ``code``); ``policy``: by a policy choice."""
        self.action, self.policy_skip = SiteAction.SKIP, policy
        self.set_reason(code, text)

    @property
    def geometry(self) -> str:
        k, s = self.kernel, self.stride
        text = f'k{k[0]}' + (f'x{k[1]}' if k[1] != k[0] else '') + f' s{s[0]}' + (f'x{s[1]}' if s[1] != s[0] else '')
        if self.padding == 'same':
            text += ' same'
        elif isinstance(self.padding, tuple) and any(self.padding):
            p = self.padding
            text += f' p{p[0]}' + (f'x{p[1]}' if p[1] != p[0] else '')
        if self.ceil_mode:
            text += ' ceil'
        return text

    def to_dict(self) -> dict:
        return {k: v.value if isinstance(v, Enum) else v for k, v in self.__dict__.items()
                if k not in ('node', 'owner', 'ordinal', 'fn')}

    # pickling (torch.save of a converted model, which records its plan): the function by name
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if state['fn'] is not None:
            state['fn'] = next((k for k, f in _SITE_FUNCTIONS.items() if f is state['fn']), None)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        if isinstance(state.get('fn'), str):
            state['fn'] = _SITE_FUNCTIONS.get(state['fn'])
        self.__dict__.update(state)


@dataclass
class Plan:
    """The sites of a model and the action for each; ``print(plan)`` shows a table.

    ``fingerprint`` is :func:`model_fingerprint` of the model when it was planned: :meth:`check_applies_to` (and
    ``convert(model, plan=...)``) refuse a model it does not match."""
    model_name: str
    input_size: Tuple[int, int, int]
    policy: ConversionPolicy
    sites: List[Site]
    note: str = ''
    fingerprint: str = field(default='', repr=False, compare=False)

    @property
    def to_replace(self) -> List[Site]:
        return [s for s in self.sites if s.action == SiteAction.REPLACE]

    def counts(self) -> Dict[str, int]:
        return {'sites': len(self.sites), 'replace': len(self.to_replace),
                'skip': len(self.sites) - len(self.to_replace)}

    def flops(self) -> Tuple[int, int]:
        """Total FLOPs of the sites before and after conversion (replaced sites only change)."""
        before = sum(s.flops_before for s in self.sites)
        after = sum(s.flops_after if s.action == SiteAction.REPLACE else s.flops_before for s in self.sites)
        return before, after

    def check_applies_to(self, model: nn.Module, input_size: Optional[Sequence[int]] = None,
                         policy: Optional[ConversionPolicy] = None) -> None:
        """Raise ValueError unless this plan was made for ``model`` as it is now (the same architecture and module
        structure, see :func:`model_fingerprint`), and for ``input_size`` and ``policy`` where they are given."""
        _unwrap_check(model)
        name = _model_name(model)
        if name != self.model_name:
            raise ValueError(f'the plan was made for {self.model_name}, not for this model ({name}); '
                             'make a new one with dpp_surgery.plan(model)')
        if self.fingerprint and model_fingerprint(model) != self.fingerprint:
            raise ValueError(f'the plan was made for a {self.model_name} with another module structure (was the '
                             'model converted or changed since it was planned?); make a new one with '
                             'dpp_surgery.plan(model)')
        if input_size is not None and tuple(input_size) != tuple(self.input_size):
            raise ValueError(f'the plan was made at input size {tuple(self.input_size)}, not {tuple(input_size)}')
        if policy is not None and policy != self.policy:
            differ = '; '.join(f'{f.name} {getattr(self.policy, f.name)!r} in the plan, {getattr(policy, f.name)!r} '
                               'given' for f in dataclasses.fields(ConversionPolicy)
                               if getattr(self.policy, f.name) != getattr(policy, f.name))
            raise ValueError(f'the plan was made with another policy ({differ}); pass the plan alone, or plan '
                             'again with that policy')

    def to_dict(self) -> dict:
        return {'model': self.model_name, 'input_size': list(self.input_size), 'policy': self.policy.to_dict(),
                'sites': [s.to_dict() for s in self.sites], 'counts': self.counts()}

    def __str__(self) -> str:
        rows = [('site', 'kind', 'type', 'geometry', 'channels', 'size', 'action', 'detail', 'MFLOPs')]
        for s in self.sites:
            detail = s.reason if s.action == SiteAction.SKIP else s.placement + (f' ({s.block})' if s.block else '') + (
                f'; {s.reason}' if s.reason else '')
            mflops = f'{s.flops_before / 1e6:.1f}'
            if s.action == SiteAction.REPLACE:
                mflops += f' -> {s.flops_after / 1e6:.1f}'
            channels = f'{s.in_channels}->{s.out_channels}' if s.in_channels != s.out_channels else str(s.in_channels)
            size = f'{s.in_size[0]}x{s.in_size[1]}->{s.out_size[0]}x{s.out_size[1]}'
            rows.append((s.name, _KIND_LABEL.get(s.kind, str(s.kind)), s.module_type, s.geometry, channels, size,
                         str(s.action), detail, mflops))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f'Plan for {self.model_name} at input {self.input_size}: {self.policy.describe()}']
        for i, r in enumerate(rows):
            lines.append('  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append('  '.join('-' * w for w in widths))
        before, after = self.flops()
        c = self.counts()
        lines.append(f'{c["sites"]} sites: {c["replace"]} to replace, {c["skip"]} to skip; '
                     f'site MFLOPs {before / 1e6:.1f} -> {after / 1e6:.1f}')
        if self.note:
            lines.append(f'note: {self.note}')
        return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------------
# helpers

def _shape(node) -> Optional[torch.Size]:
    meta = node.meta.get('tensor_meta') if isinstance(node, fx.Node) else None
    return getattr(meta, 'shape', None)


def is_same_padding(m: nn.Module) -> bool:
    """Whether ``m`` pads 'same' dynamically, from its input size at run time: timm's ``*Same`` layers
    (``Conv2dSame``, ``MaxPool2dSame``, ``AvgPool2dSame``, by class name) and modules flagged ``same_pad`` or
    ``dynamic_padding``. (A static ``padding='same'`` of ``nn.Conv2d`` is not dynamic.)"""
    return type(m).__name__.endswith('Same') or bool(getattr(m, 'same_pad', False)) or \
        bool(getattr(m, 'dynamic_padding', False))


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``module`` in eval mode; its own mode (train or eval) is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _conv_flops(cin: int, cout: int, groups: int, k: Tuple[int, int], out: Tuple[int, int]) -> int:
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


def _dpp_placement_of(m: nn.Module) -> Optional[str]:
    return getattr(type(m), '_dpp_placement', None)


def _pair_or_none(v) -> Optional[Tuple[int, int]]:
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
            or _pair_or_none(getattr(m, 'stride', None)) is None \
            or _pair_or_none(getattr(m, 'kernel_size', None)) is None:
        return False
    return not any(is_conv_like(c) for c in m.children())


_OTHER_POOL_TYPES = (nn.LPPool2d, nn.FractionalMaxPool2d)


def _is_blur_pool(m: nn.Module) -> bool:
    """timm's ``BlurPool2d`` with symmetric padding of at most half its window (what DPP2d can take)."""
    if not isinstance(m, BlurPool2d) or _pair_or_none(m.stride) is None:
        return False
    pads = list(m.padding)
    return len(set(pads)) == 1 and 2 * pads[0] <= m.filt_size


def _other_pool(m: nn.Module) -> bool:
    """A downsampling pool that DPP does not replace (``nn.LPPool2d``, ``nn.FractionalMaxPool2d``, another
    pooling class by name; not max/average pools or blur pools): stride above 1."""
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, DPP2d)) or is_conv_like(m) or _is_blur_pool(m):
        return False
    if not (isinstance(m, _OTHER_POOL_TYPES) or 'pool' in type(m).__name__.lower()):
        return False
    # nn pools: stride None means the kernel size
    stride = _pair_or_none(getattr(m, 'stride', None) or getattr(m, 'kernel_size', None))
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
        elif _is_blur_pool(m) and to_pair(m.stride, 'stride') != (1, 1):
            out.append((name, 'avg_pool'))
        elif _other_pool(m):
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


class _Graph:
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
                if a not in inside and a not in inputs and _shape(a) is not None:
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


def _site_for_module(g: _Graph, node: fx.Node, m: nn.Module) -> Optional[Site]:
    in_shape = node.meta.get('dpp_in_shape') or (_shape(node.args[0]) if node.args else None)
    return _module_site(node.target, m, in_shape, _shape(node), node=node.name)


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
    if isinstance(m, DPP2d) or _dpp_placement_of(m) in ('post', 'pre'):
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
    if _is_blur_pool(m):
        # anti-aliased downsampling (a fixed binomial average over a window, then the stride): DPP takes the same
        # window, stride and (symmetric) padding
        k, pad = int(m.filt_size), int(m.padding[0])
        return Site(kind=SiteKind.AVG_POOL, kernel=(k, k), stride=to_pair(m.stride, 'stride'), padding=(pad, pad),
                    ceil_mode=False, **common)
    if _other_pool(m):
        kernel = _pair_or_none(getattr(m, 'kernel_size', None) or getattr(m, 'filt_size', None))
        stride = _pair_or_none(getattr(m, 'stride', None)) or kernel or (0, 0)
        kernel = kernel or stride
        return Site(kind=SiteKind.POOL, kernel=kernel, stride=stride, padding=(0, 0), ceil_mode=False,
                    reason=f'{type(m).__name__} is a pooling type DPP does not replace (max and average pools only)',
                    reason_code=ReasonCode.UNSUPPORTED_POOL_TYPE, **common)
    return None


def _site_for_function(g: _Graph, node: fx.Node) -> Optional[Site]:
    in_shape, out_shape = _shape(node.args[0]) if node.args else None, _shape(node)
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
    if node.target in _FUNCTIONAL_GLOBAL:
        return Site(kind=SiteKind.GLOBAL_POOL, kernel=common['in_size'], stride=(1, 1), padding=(0, 0),
                    ceil_mode=False, **common)
    kind = SiteKind(_FUNCTIONAL_POOLS[node.target])
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


def _matches(name: str, patterns: Sequence[str]) -> Optional[str]:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def _type_matches(type_name: str, module: Optional[nn.Module], types) -> Optional[str]:
    for t in types:
        if isinstance(t, str) and t == type_name:
            return t
        if isinstance(t, type) and module is not None and isinstance(module, t):
            return t.__name__
    return None


def _size_preserving_at_stride1(m: nn.Module) -> bool:
    if is_same_padding(m) or getattr(m, 'padding', None) == 'same':
        return True
    if isinstance(m.padding, str):
        return False
    k, p = to_pair(m.kernel_size, 'kernel_size'), to_pair(m.padding, 'padding')
    d = to_pair(getattr(m, 'dilation', 1), 'dilation')
    return all(2 * pi == di * (ki - 1) for ki, pi, di in zip(k, p, d))


def _iterating_container(m: nn.Module) -> bool:
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
    if _iterating_container(host) or isinstance(host, nn.Sequential):
        return None
    return host


def _other_entry_points(m: nn.Module) -> List[str]:
    """Methods other than ``forward`` through which callers run the module (xception's ``forward_with_tap``, which
    ``forward_intermediates`` calls): a DPP wrapped around ``forward`` would be bypassed there."""
    cls = type(m)
    return [n for n in dir(cls) if n.startswith('forward_') and callable(getattr(cls, n, None))
            and not hasattr(nn.Module, n)]


def _ancestors_from_graph(g: _Graph, node: fx.Node) -> List[str]:
    """The modules that contain the module called at ``node`` (graph module stack), outermost first, that can own
    a DPP (:func:`block_host`): containers whose own forward iterates or indexes their children (timm's
    MixedConv2d is a ModuleDict) cannot own a DPP child without changing what they compute."""
    return [p for p in g.stack(node)[:-1] if block_host(g.model.get_submodule(p)) is not None]


def _ancestors_from_name(g: _Graph, name: str) -> List[str]:
    """The modules that contain module ``name`` (by its qualified name), outermost first, that can own a DPP."""
    parts = name.split('.')
    paths = ('.'.join(parts[:i]) for i in range(1, len(parts)))
    return [p for p in paths if block_host(g.model.get_submodule(p)) is not None]


def _graph_io_shapes(g: _Graph, path: str) -> Optional[Tuple[Any, Any]]:
    """(input shape, output shape) of module ``path``'s graph region if it takes one tensor input, else None."""
    inputs, last = g.region_io(path)
    if len(inputs) != 1 or last is None:
        return None
    return _shape(inputs[0]), _shape(last)


def _eager_io_shapes(g: _Graph, path: str) -> Optional[Tuple[Any, Any]]:
    """(input shape, output shape) of module ``path`` in the eager run if it ran once with one tensor input."""
    rec = g.eager.get(path)
    if rec is None or rec.calls != 1 or rec.tensor_args != 1:
        return None
    return rec.in_shape, rec.out_shape


def _residual_block(g: _Graph, node: fx.Node, ancestors: List[str]) -> Optional[Tuple[Optional[str], str]]:
    """The block ending at the first add downstream of the conv at ``node`` that also takes a path not through
    the conv (a residual add): (block, how), (None, why not) where that block cannot be used, or None where there
    is no such add inside an ancestor (then the block is found from sizes)."""
    desc = g.descendants(node)
    ordered = sorted(desc, key=g.index.__getitem__)
    for n in ordered[:200]:
        is_add = (n.op == 'call_function' and n.target in _ADD_TARGETS) or (n.op == 'call_method' and n.target in
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
            if u.op in ('call_module', 'call_function', 'call_method') and _shape(u) == _shape(n):
                end = u
        end_stack = g.stack(end)
        common = [p for p in ancestors if p in end_stack]
        if common:
            block = common[-1]
            inputs, last = g.region_io(block)
            if len(inputs) != 1:
                return None, f'block {block} takes {len(inputs)} tensor inputs'
            if last is not None and _shape(last) == _shape(end):
                return block, f'residual add {n.name}'
        return None
    return None


def _find_block(g: _Graph, site: Site, node: Optional[fx.Node]) -> Tuple[Optional[str], str]:
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


def _owner_traces_consistently(model: nn.Module, owner: str) -> Optional[Tuple[ReasonCode, str]]:
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


def flops_of(module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> int:
    """FLOPs of one eval-mode call of ``module`` on zeros of ``input_shape`` (torch's ``FlopCounterMode``:
    convolutions and matrix products, a multiply-add counted as 2); the module's mode is restored."""
    return _counted_call(module, input_shape, dtype, device)[0]


def _counted_call(module: nn.Module, input_shape, dtype, device) -> Tuple[int, Any]:
    """(FLOPs, output) of one eval-mode call of ``module`` on zeros of ``input_shape``."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(*input_shape, dtype=dtype, device=device)
    with eval_mode(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = module(x)
    return int(counter.get_total_flops()), out


def block_stride1(block: nn.Module, undo: List[Tuple[nn.Module, str, Any]]) -> None:
    """Set every downsampling conv and pool inside ``block`` to stride 1 (in place), as the 'block' placement
    does: strided convs and blur pools run at stride 1, a pool whose stride equals its kernel becomes
    ``nn.Identity``, another pool runs at stride 1 where that keeps its size. Appends an undo record
    (object, attribute, old value) for each change as it is made; raises ValueError if a layer cannot keep its
    size at stride 1."""
    for name, m in list(block.named_modules()):
        if m is block:
            continue
        if is_conv_like(m) and to_pair(m.stride, 'stride') != (1, 1):
            if not _size_preserving_at_stride1(m) and not (to_pair(m.kernel_size, 'kernel_size') == (1, 1)):
                raise ValueError(f'conv {name} does not keep its size at stride 1')
            undo.append((m, 'stride', m.stride))
            m.stride = (1, 1)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and to_pair(m.stride or m.kernel_size, 'stride') != (1, 1):
            parent_name, _, child = name.rpartition('.')
            parent = block.get_submodule(parent_name) if parent_name else block
            k, p = to_pair(m.kernel_size, 'kernel_size'), to_pair(m.padding, 'padding')
            if to_pair(m.stride, 'stride') == k:
                undo.append((parent, child, m))
                setattr(parent, child, nn.Identity())
            elif is_same_padding(m) or all(2 * pi == ki - 1 for ki, pi in zip(k, p)):
                undo.append((m, 'stride', m.stride))
                m.stride = (1, 1)
            else:
                raise ValueError(f'pool {name} does not keep its size at stride 1')
        elif _is_blur_pool(m) and to_pair(m.stride, 'stride') != (1, 1):
            if 2 * int(m.padding[0]) != int(m.filt_size) - 1:
                raise ValueError(f'blur pool {name} does not keep its size at stride 1')
            undo.append((m, 'stride', m.stride))
            m.stride = 1


# ---------------------------------------------------------------------------------------------------------------
# decisions

def _try_block(model: nn.Module, g: _Graph, block: str) -> Union[Tuple[int, int], str]:
    """FLOPs of ``block`` as it is and with every downsampling layer at stride 1 (on a copy), or why the copy
    cannot run; computed once per block."""
    if block not in g.block_trials:
        module = model.get_submodule(block)
        shape, out_shape = g.block_shapes(block)
        try:
            clone = copy.deepcopy(module)
            block_stride1(clone, [])
            after, out = _counted_call(clone, shape, g.dtype, g.device)
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


def _skipped(site: Site, code: ReasonCode, reason: str, policy: bool = False) -> bool:
    """:meth:`Site.skip`, returning False (the site is not converted) for the decision steps."""
    site.skip(code, reason, policy)
    return False


def _decide_by_kind(g: _Graph, site: Site, node: Optional[fx.Node], policy: ConversionPolicy) -> bool:
    """The policy's and DPP's rules for the site's kind; sets its placement. False if that skips it."""
    if site.kind == SiteKind.GLOBAL_POOL:
        if policy.skip_global:
            return _skipped(site, ReasonCode.SKIP_GLOBAL, 'global/adaptive pool (skip_global=True)', policy=True)
        if site.out_size != (1, 1) or site.functional:
            return _skipped(site, ReasonCode.GLOBAL_POOL_UNSUPPORTED,
                            'adaptive pool with output larger than 1x1 or functional: not supported')
        site.placement = SitePlacement.GLOBAL
    elif site.kind in (SiteKind.MAX_POOL, SiteKind.AVG_POOL):
        if site.kind not in policy.targets:
            return _skipped(site, ReasonCode.NOT_IN_TARGETS, f'{site.kind} not in targets', policy=True)
        if site.stride == (1, 1) and policy.skip_stride1:
            return _skipped(site, ReasonCode.SKIP_STRIDE1, 'stride-1 pool, does not downsample (skip_stride1=True)',
                            policy=True)
        site.placement = SitePlacement.FUNCTIONAL if site.functional else SitePlacement.POOL
    else:  # strided conv
        if SiteKind.STRIDED_CONV not in policy.targets:
            return _skipped(site, ReasonCode.NOT_IN_TARGETS, 'strided_conv not in targets', policy=True)
        stem = g.reads_image(node) if node is not None else not g.eager[site.name].after_conv
        if policy.skip_stem and stem:
            return _skipped(site, ReasonCode.SKIP_STEM, 'stem conv reads the image (skip_stem=True)', policy=True)
        if policy.skip_patchify and site.kernel == site.stride and site.padding in ((0, 0), 'valid'):
            return _skipped(site, ReasonCode.SKIP_PATCHIFY,
                            'patch-embedding conv, kernel == stride (skip_patchify=True)', policy=True)
        site.placement = SitePlacement(policy.placement)
    return True


def _decide_by_selection(g: _Graph, site: Site, node: Optional[fx.Node], module: Optional[nn.Module],
                         policy: ConversionPolicy) -> bool:
    """A module called more than once, and the policy's include/exclude patterns and types. False if they skip
    the site."""
    calls = 1 if site.functional else g.calls(site.name, node)
    if calls > 1:
        return _skipped(site, ReasonCode.CALLED_MORE_THAN_ONCE,
                        f'module is called {calls} times in forward; cannot give each call its own DPP')
    pattern = _matches(site.name, policy.exclude)
    if pattern:
        return _skipped(site, ReasonCode.EXCLUDED_NAME, f'excluded by pattern {pattern!r}', policy=True)
    t = _type_matches(site.module_type, module, policy.exclude_types)
    if t:
        return _skipped(site, ReasonCode.EXCLUDED_TYPE, f'excluded by type {t}', policy=True)
    if policy.include and not _matches(site.name, policy.include):
        return _skipped(site, ReasonCode.NOT_INCLUDED_NAME, 'not matched by include', policy=True)
    if policy.include_types and not _type_matches(site.module_type, module, policy.include_types):
        return _skipped(site, ReasonCode.NOT_INCLUDED_TYPE, 'not matched by include_types', policy=True)
    return True


def _decide_functional(model: nn.Module, site: Site) -> bool:
    """Whether the forward of a functional pool's owner can be rewritten; False (skipped) if not."""
    if site.owner and _iterating_container(model.get_submodule(site.owner)):
        return _skipped(site, ReasonCode.FUNCTIONAL_IN_CONTAINER,
                        f'functional pool in {site.owner}, a container whose forward runs over its children: '
                        'a DPP child would change what it computes')
    if not site.owner:
        return _skipped(site, ReasonCode.FUNCTIONAL_IN_ROOT,
                        "functional pool in the model's own forward: forward_features/forward_head would disagree")
    why = _owner_traces_consistently(model, site.owner)
    if why:
        return _skipped(site, why[0], f'functional pool: {why[1]}')
    return True


def _decide_block(model: nn.Module, g: _Graph, site: Site, node: Optional[fx.Node]) -> None:
    """The block of a 'block' placement, which must run at stride 1 on its own; else DPP right after the conv
    ('post', with the reason)."""
    block, how = _find_block(g, site, node)
    if block is not None:
        trial = _try_block(model, g, block)
        if isinstance(trial, str):
            block, how = None, trial
    if block is None:  # fall back to DPP right after the conv
        site.placement = SitePlacement.POST
        site.set_reason(ReasonCode.NO_BLOCK, f'no block ({how})')
    else:
        site.block, site.block_channels = block, int(g.block_shapes(block)[1][1])


def _decide(model: nn.Module, g: _Graph, site: Site, node: Optional[fx.Node], module: Optional[nn.Module],
            policy: ConversionPolicy) -> None:
    """Set the site's action, placement and reason: the policy's choices, then what DPP can take."""
    if site.kind == SiteKind.DPP:
        site.skip(ReasonCode.ALREADY_CONVERTED, 'already converted')
        return
    if site.reason:  # set during discovery (unsupported geometry)
        site.skip(site.reason_code, site.reason)
        return
    if not _decide_by_kind(g, site, node, policy) or not _decide_by_selection(g, site, node, module, policy):
        return
    if site.functional and not _decide_functional(model, site):
        return
    if site.placement == SitePlacement.BLOCK:
        _decide_block(model, g, site, node)
    if site.placement == SitePlacement.PRE and not _size_preserving_at_stride1(module):
        site.skip(ReasonCode.PRE_NOT_SIZE_PRESERVING,
                  "placement 'pre' needs a conv that keeps its size at stride 1 (padding (k-1)/2 or 'same')")
        return
    site.action = SiteAction.REPLACE


def _flops(model, g: _Graph, site: Site, module, policy: ConversionPolicy, block_cache) -> None:
    c_in, c_out, out = site.in_channels, site.out_channels, site.out_size
    window = site.kernel[0] * site.kernel[1]
    if site.kind != SiteKind.STRIDED_CONV:  # pools of every kind, global pools, DPP
        site.flops_before = c_in * out[0] * out[1] * window
    else:
        groups = getattr(module, 'groups', 1)
        site.flops_before = _conv_flops(c_in, c_out, groups, site.kernel, out)
    if site.action != SiteAction.REPLACE:
        site.flops_after = site.flops_before
        return
    variant = policy.variant(SiteKind.AVG_POOL if site.kind == SiteKind.GLOBAL_POOL else site.kind)
    if site.placement in (SitePlacement.POOL, SitePlacement.FUNCTIONAL, SitePlacement.GLOBAL):
        site.flops_after = operator_flops(variant, c_in, out, window)
    elif site.placement == SitePlacement.POST:
        groups = getattr(module, 'groups', 1)
        h1 = tuple(n * s for n, s in zip(out, site.stride))  # conv at stride 1 (about s times the outputs per side)
        site.flops_after = _conv_flops(c_in, c_out, groups, site.kernel, h1) + operator_flops(
            variant, c_out, out, site.stride[0] * site.stride[1])
    elif site.placement == SitePlacement.PRE:
        site.flops_after = site.flops_before + operator_flops(variant, c_in, out, site.stride[0] * site.stride[1])
    elif site.placement == SitePlacement.BLOCK:
        # the whole block is measured before and after with torch's FLOP counter; the first site of a block
        # carries the block's numbers, the others none
        if site.block in block_cache:
            site.flops_before = site.flops_after = 0
            return
        before, after = _try_block(model, g, site.block)
        last_shape = g.block_shapes(site.block)[1]
        after += operator_flops(variant, int(last_shape[1]), tuple(last_shape[2:]), site.stride[0] * site.stride[1])
        block_cache[site.block] = True
        site.flops_before, site.flops_after = before, after


# ---------------------------------------------------------------------------------------------------------------
# plan

def _census_sites(g: _Graph, known: set) -> List[Site]:
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


def _insert_in_order(g: _Graph, sites: List[Site], site: Site) -> None:
    """Insert a census site before the first listed site whose module runs after it (eager order)."""
    def order(s):
        rec = g.eager.get(s.owner if s.functional else s.name)
        return rec.order if rec is not None else float('inf')

    mine = order(site)
    at = next((i for i, s in enumerate(sites) if order(s) > mine and not (s.functional and not s.owner)), len(sites))
    sites.insert(at, site)


def _unwrap_check(model: nn.Module) -> None:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(f'{type(model).__name__} wraps the model: convert the underlying model '
                        f'(model.module) before wrapping it, then wrap the converted model.')
    if not isinstance(model, nn.Module):
        raise TypeError(f'expected a torch.nn.Module, but got {type(model).__name__}')


def _discover(g: _Graph) -> Tuple[List[Site], Dict[str, Optional[nn.Module]], Dict[str, fx.Node]]:
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
        elif n.op == 'call_function' and (n.target in _FUNCTIONAL_POOLS or n.target in _FUNCTIONAL_GLOBAL):
            site = _site_for_function(g, n)
        if site is None:
            continue
        sites.append(site)
        modules[site.name] = module
        nodes[site.name] = n
    for site in _census_sites(g, {s.name for s in sites}):
        modules[site.name] = g.model.get_submodule(site.name)
        _insert_in_order(g, sites, site)
    return sites, modules, nodes


def _check_include(policy: ConversionPolicy, sites: List[Site]) -> None:
    """Every include pattern must match a site (ValueError listing the sites otherwise)."""
    for pattern in policy.include:
        if not any(fnmatch.fnmatchcase(s.name, pattern) for s in sites):
            names = ', '.join(s.name for s in sites[:12]) + (' ...' if len(sites) > 12 else '')
            raise ValueError(f'include pattern {pattern!r} matches no downsampling site; sites are: {names}')


def _share_blocks(sites: List[Site]) -> None:
    """With the block placement, every downsampling site inside a converted block runs at stride 1 too; a block
    with a site the policy leaves alone (excluded, not targeted) falls back to 'post' for its convs."""
    blocks = {s.block: s for s in sites if s.action == SiteAction.REPLACE and s.placement == SitePlacement.BLOCK}
    for block, owner in blocks.items():
        inner = [s for s in sites if s.name.startswith(block + '.') and s.stride != (1, 1)
                 and s.kind in _DOWNSAMPLING_KINDS]
        kept = [s for s in inner if s.action == SiteAction.SKIP]
        for site in inner:
            if kept:
                if site.placement == SitePlacement.BLOCK:
                    site.placement, site.block = SitePlacement.POST, ''
                    site.set_reason(ReasonCode.BLOCK_HOLDS_SKIPPED,
                                    f'block {block} holds {kept[0].name}, which the policy leaves alone')
            elif site.action == SiteAction.REPLACE:
                site.placement, site.block, site.block_channels = SitePlacement.BLOCK, block, owner.block_channels


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
    """
    _unwrap_check(model)
    policy = resolve_policy(policy, **policy_kwargs)
    input_size = tuple(input_size) if input_size is not None else default_input_size(model)
    if len(input_size) != 3:
        raise ValueError(f'input_size must be (C, H, W), but got {input_size}')
    fingerprint = model_fingerprint(model)
    g = _Graph(model, input_size, policy.leaf_modules)
    sites, modules, nodes = _discover(g)
    _check_include(policy, sites)
    for site in sites:
        _decide(model, g, site, nodes.get(site.name), modules[site.name], policy)
    _share_blocks(sites)
    block_cache: Dict[str, bool] = {}
    for site in sites:
        _flops(model, g, site, modules[site.name], policy, block_cache)
    return Plan(model_name=_model_name(model), input_size=input_size, policy=policy, sites=sites, note=g.note,
                fingerprint=fingerprint)
