"""The plan's data model: :class:`Site` (one downsampling site and what conversion does to it), :class:`Plan` (the
sites of a model; ``print(plan)`` shows the table) and the str-valued enums they hold."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .policy import ConversionPolicy

__all__ = ['SITE_FUNCTIONS', 'SiteKind', 'SiteAction', 'SitePlacement', 'ReasonCode', 'KIND_LABEL',
           'DOWNSAMPLING_KINDS', 'default_input_size', 'plan_model_name', 'model_fingerprint', 'Site', 'Plan',
           'check_unwrapped']


# the functions a functional site can hold, by a name that pickles (F.max_pool2d itself does not)
SITE_FUNCTIONS = {'F.max_pool2d': F.max_pool2d, 'torch.max_pool2d': torch.max_pool2d, 'F.avg_pool2d': F.avg_pool2d,
                   'F.adaptive_avg_pool2d': F.adaptive_avg_pool2d, 'F.adaptive_max_pool2d': F.adaptive_max_pool2d}


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


KIND_LABEL = {
    SiteKind.MAX_POOL: 'max pool', SiteKind.AVG_POOL: 'avg pool', SiteKind.STRIDED_CONV: 'strided conv',
    SiteKind.GLOBAL_POOL: 'global pool', SiteKind.DPP: 'DPP (converted)', SiteKind.POOL: 'pool (other)',
}


DOWNSAMPLING_KINDS = (SiteKind.MAX_POOL, SiteKind.AVG_POOL, SiteKind.STRIDED_CONV, SiteKind.POOL)


def default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """The model's ``pretrained_cfg['input_size']`` (timm), else (3, 224, 224)."""
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    size = cfg.get('input_size') if isinstance(cfg, dict) else None
    return tuple(size) if size else (3, 224, 224)


def plan_model_name(model: nn.Module) -> str:
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
            state['fn'] = next((k for k, f in SITE_FUNCTIONS.items() if f is state['fn']), None)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        if isinstance(state.get('fn'), str):
            state['fn'] = SITE_FUNCTIONS.get(state['fn'])
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
        check_unwrapped(model)
        name = plan_model_name(model)
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
            rows.append((s.name, KIND_LABEL.get(s.kind, str(s.kind)), s.module_type, s.geometry, channels, size,
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


def check_unwrapped(model: nn.Module) -> None:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(f'{type(model).__name__} wraps the model: convert the underlying model '
                        f'(model.module) before wrapping it, then wrap the converted model.')
    if not isinstance(model, nn.Module):
        raise TypeError(f'expected a torch.nn.Module, but got {type(model).__name__}')
