"""The conversion policy: which downsampling sites become DPP, where, and which DPP variant they get."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple, Type, Union

import torch
from torch import nn

from ..layers import DPP2d
from ..utils import (IDENTIFIER, did_you_mean, field_path, is_finite_number, one_of, short_repr, string_list,
                     unknown_key)

__all__ = ['DPPVariant', 'ConversionPolicy', 'TARGETS', 'PLACEMENTS', 'OPERATORS', 'BLUR_PADS', 'resolve_policy',
           'policy_from_dict']

TARGETS = ('max_pool', 'avg_pool', 'strided_conv')
PLACEMENTS = ('post', 'pre', 'block')
# the downsampling a converted site gets: DPP (the default), the paper's stochastic S3DPP, and, for comparison,
# timm's BlurPool2d (antialiased-cnns' operator) and plain average or max pooling
OPERATORS = ('dpp', 's3dpp', 'blur', 'avg', 'max')
BLUR_PADS = ('reflect', 'constant')  # timm's BlurPool2d paddings: reflect (its default) and constant (its 'blurpc')
BLUR_FILTERS = range(2, 8)  # binomial filter sizes


def _check_operator(operator: Any) -> None:
    if operator not in OPERATORS:
        raise ValueError(f'unknown operator {operator!r}{did_you_mean(str(operator), OPERATORS)}; '
                         f'valid operators: {", ".join(OPERATORS)}')


@dataclass(frozen=True)
class DPPVariant:
    """What one kind of site gets: the downsampling ``operator`` and its options.

    Args:
        guide, reward, norm, init: the DPP options (see :class:`DPP2d`), for the ``'dpp'`` and ``'s3dpp'`` operators.
        operator: ``'dpp'`` (:class:`DPP2d`, the default), ``'s3dpp'`` (:class:`dpp_surgery.S3DPP2d`, the paper's
            stochastic DPP; stride 2 only), or, to compare DPP with what one would pick instead, ``'blur'`` (timm's
            ``BlurPool2d``, antialiased-cnns' operator; at a max pool, a max pool at stride 1 then the blur, as
            antialiased-cnns does), ``'avg'`` or ``'max'`` (plain pooling). Every operator gives the replaced layer's
            output size (ceil mode at odd sizes), so residual adds still meet.
        blur_filter: the binomial filter size of ``'blur'`` (2 to 7; timm's default 3).
        blur_pad: the padding of ``'blur'``: ``'reflect'`` (timm's default) or ``'constant'`` (zeros, timm's
            ``blurpc``).
    """
    guide: str = 'lite'
    reward: str = 'sym'
    norm: str = 'mean'
    init: Union[str, Tuple[float, float]] = 'paper'
    operator: str = 'dpp'
    blur_filter: int = 3
    blur_pad: str = 'reflect'

    def __post_init__(self):
        DPP2d(1, guide=self.guide, reward=self.reward, norm=self.norm, init=self.init)  # validates every field
        _check_operator(self.operator)
        if isinstance(self.blur_filter, bool) or not isinstance(self.blur_filter, int) \
                or self.blur_filter not in BLUR_FILTERS:
            raise ValueError(f'blur_filter must be an integer from {BLUR_FILTERS[0]} to {BLUR_FILTERS[-1]}, but got '
                             f'{self.blur_filter!r}')
        if self.blur_pad not in BLUR_PADS:
            raise ValueError(f'unknown blur_pad {self.blur_pad!r}; valid: {", ".join(BLUR_PADS)}')

    @classmethod
    def coerce(cls, value: Any, what: str) -> 'DPPVariant':
        if isinstance(value, DPPVariant):
            return value
        if isinstance(value, Mapping):
            fields = [f.name for f in dataclasses.fields(cls)]
            for key in value:
                if key not in fields:
                    raise ValueError(f'unknown DPP variant option {key!r} for {what}{did_you_mean(key, fields)}; '
                                     f'valid: {", ".join(fields)}')
            return cls(**value)
        raise TypeError(f'{what} must be a DPPVariant or a dict of its options, but got {type(value).__name__}')

    def describe(self) -> str:
        if self.operator in ('avg', 'max'):
            return f'operator={self.operator}'
        if self.operator == 'blur':
            return f'operator=blur, filter={self.blur_filter}, pad={self.blur_pad}'
        init = self.init if isinstance(self.init, str) else f'alpha={self.init[0]:g},lambda={self.init[1]:g}'
        text = f'{self.guide}-{self.reward}, norm={self.norm}, init={init}'
        return text if self.operator == 'dpp' else f'operator={self.operator}, {text}'

    def to_dict(self) -> dict:
        out = {'guide': self.guide, 'reward': self.reward, 'norm': self.norm,
               'init': self.init if isinstance(self.init, str) else list(self.init)}
        if self.operator != 'dpp':  # (files of earlier versions, and of the default, hold no operator)
            out['operator'] = self.operator
        if self.operator == 'blur':
            out.update(blur_filter=self.blur_filter, blur_pad=self.blur_pad)
        return out


@dataclass(frozen=True)
class ConversionPolicy:
    """What :func:`dpp_surgery.convert` changes. Every field can also be passed to ``plan``/``convert`` as a keyword.

    Args:
        targets: site kinds to convert: ``'max_pool'``, ``'avg_pool'``, ``'strided_conv'``.
        placement: where DPP goes for a strided conv: ``'block'`` (default: every strided conv and pool of the
            enclosing block runs at stride 1 and one DPP follows the block's output, after its residual add and
            activation; a conv outside any block falls back to ``'post'``), ``'post'`` (the conv runs at stride 1,
            DPP right after it), ``'pre'`` (DPP first, then the conv at stride 1 on the smaller map; needs a conv
            that keeps its size at stride 1). The default preserves a pretrained model's function best (README).
        max_pool, avg_pool, strided_conv: the :class:`DPPVariant` (or a dict of its fields) for each kind. The
            defaults use the authors' init (alpha = lambda = 1), asymmetric for max pools, so that fine-tuning can
            move them; ``init='avg'``/``'max'`` start as the replaced pooling but barely learn.
        include: name patterns (fnmatch, on the site names that :func:`plan` prints); if given, only sites
            matching one of them are converted. A pattern that matches no site is an error.
        exclude: name patterns of sites to leave alone.
        include_types, exclude_types: module classes (or class names) to convert only / to leave alone.
        skip_stem: leave the conv that reads the image alone.
        skip_patchify: leave convs whose kernel equals their stride alone (patch embeddings, ConvNeXt
            downsampling: learned, channel-mixing pooling already).
        skip_global: leave global/adaptive pools alone.
        skip_stride1: leave pools with stride 1 alone (they do not downsample).
        leaf_modules: extra module classes for torch.fx to keep whole when tracing.
        operator: the downsampling operator of every kind at once (``DPPVariant.operator``: ``'dpp'``, ``'s3dpp'``,
            ``'blur'``, ``'avg'``, ``'max'``); None (the default) leaves each kind's own.
    """
    targets: Tuple[str, ...] = TARGETS
    placement: str = 'block'
    # the authors' init everywhere: the 'avg'/'max' presets start as the pooling they imitate, but where the
    # gradients of the log-parameters nearly vanish, so fine-tuning barely moves them (`bench init`, README)
    max_pool: DPPVariant = DPPVariant(reward='asym')
    avg_pool: DPPVariant = DPPVariant()
    strided_conv: DPPVariant = DPPVariant()
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    include_types: Tuple[Union[str, Type[nn.Module]], ...] = ()
    exclude_types: Tuple[Union[str, Type[nn.Module]], ...] = ()
    skip_stem: bool = True
    skip_patchify: bool = True
    skip_global: bool = True
    skip_stride1: bool = True
    leaf_modules: Tuple[Type[nn.Module], ...] = field(default=())
    operator: Optional[str] = None

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        for t in targets:
            if t not in TARGETS:
                raise ValueError(f'unknown target {t!r}{did_you_mean(str(t), TARGETS)}; '
                                 f'valid targets: {", ".join(TARGETS)}')
        object.__setattr__(self, 'targets', targets)
        if self.placement not in PLACEMENTS:
            raise ValueError(f'unknown placement {self.placement!r}{did_you_mean(str(self.placement), PLACEMENTS)}; '
                             f'valid placements: {", ".join(PLACEMENTS)}')
        if self.operator is not None:
            _check_operator(self.operator)
        for kind in TARGETS:
            variant = DPPVariant.coerce(getattr(self, kind), kind)
            if self.operator is not None:
                variant = dataclasses.replace(variant, operator=self.operator)
            object.__setattr__(self, kind, variant)
        for name in ('include', 'exclude', 'include_types', 'exclude_types', 'leaf_modules'):
            value = getattr(self, name)
            if isinstance(value, (str, type)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        for name in ('include_types', 'exclude_types'):
            for t in getattr(self, name):
                if not isinstance(t, (str, type)):
                    raise TypeError(f'{name} takes module classes or class names, but got {t!r}')

    def variant(self, target: str) -> DPPVariant:
        return getattr(self, target)

    def to_dict(self) -> dict:
        """A JSON-friendly description (classes as names), as saved with checkpoints."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == 'operator' and v is None:  # (the variants say it; files of earlier versions lack it)
                continue
            if isinstance(v, DPPVariant):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = [x.__name__ if isinstance(x, type) else x for x in v]
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Any, field: str = 'policy') -> 'ConversionPolicy':
        """The policy that :meth:`to_dict` wrote, read from a file: every field checked (:func:`policy_from_dict`)."""
        return policy_from_dict(data, field)

    def describe(self) -> str:
        parts = [f'targets={",".join(self.targets)}', f'placement={self.placement}']
        for kind in self.targets:
            parts.append(f'{kind}: {self.variant(kind).describe()}')
        return '; '.join(parts)


def resolve_policy(policy: Optional[ConversionPolicy] = None, **kwargs) -> ConversionPolicy:
    """A policy from an optional base policy plus keyword overrides; unknown keywords fail with the valid names."""
    if policy is not None and not isinstance(policy, ConversionPolicy):
        raise TypeError(f'policy must be a ConversionPolicy, but got {type(policy).__name__}')
    fields = [f.name for f in dataclasses.fields(ConversionPolicy)]
    for key in kwargs:
        if key not in fields:
            raise TypeError(f'unknown policy option {key!r}{did_you_mean(key, fields)}; '
                            f'valid options: {", ".join(fields)}')
    base = policy or ConversionPolicy()
    return dataclasses.replace(base, **kwargs) if kwargs else base


# ---------------------------------------------------------------------------------------------------------------
# reading a policy from a file (checkpoints, zoo recipes): data only, every field checked

_POLICY_FLAGS = ('skip_stem', 'skip_patchify', 'skip_global', 'skip_stride1')


def _variant_from_dict(value: Any, field: str) -> Dict[str, Any]:
    """A DPPVariant dict of JSON values: known keys, known choices, init a preset or two finite positive numbers."""
    from ..layers import GUIDES, INIT_PRESETS, NORMS, REWARDS

    keys = [f.name for f in dataclasses.fields(DPPVariant)]
    if not isinstance(value, dict):
        raise ValueError(f'{field} must be an object with DPP variant options ({", ".join(keys)}), but got '
                         f'{short_repr(value)}')
    out = {}
    for key, v in value.items():
        where = field_path(field, key)
        if key not in keys:
            raise ValueError(f'{field} has unknown DPP variant option {unknown_key(key, keys)}')
        if key == 'blur_filter':
            if isinstance(v, bool) or not isinstance(v, int) or v not in BLUR_FILTERS:
                raise ValueError(f'{where} must be an integer from {BLUR_FILTERS[0]} to {BLUR_FILTERS[-1]}, but got '
                                 f'{short_repr(v)}')
            out[key] = v
        elif key == 'init':
            if isinstance(v, str):
                out[key] = one_of(v, where, tuple(INIT_PRESETS), fold_case=True)
            elif isinstance(v, (list, tuple)) and len(v) == 2 and all(is_finite_number(x) and x > 0 for x in v):
                out[key] = (float(v[0]), float(v[1]))
            else:
                raise ValueError(f'{where} must be one of {", ".join(map(repr, INIT_PRESETS))} or two finite positive '
                                 f'numbers [alpha, lambda], but got {short_repr(v)}')
        else:
            choices = {'guide': GUIDES, 'reward': REWARDS, 'norm': NORMS, 'operator': OPERATORS, 'blur_pad': BLUR_PADS}
            out[key] = one_of(v, where, choices[key], fold_case=key in ('guide', 'reward', 'norm'))
    return out


def _leaf_module(name: Any, field: str) -> type:
    """The nn.Module subclass called ``name`` in torch.nn or timm.layers (looked up in their namespaces only)."""
    import timm.layers

    cls = None
    if isinstance(name, str) and IDENTIFIER.fullmatch(name):
        for namespace in (vars(torch.nn), vars(timm.layers)):
            candidate = namespace.get(name)
            if isinstance(candidate, type) and issubclass(candidate, nn.Module):
                cls = candidate
                break
    if cls is None:
        raise ValueError(f'{field} names {short_repr(name)}, which is not an nn.Module class of torch.nn or '
                         'timm.layers; allowed: such class names (for others, call dpp_surgery.convert(..., '
                         'leaf_modules=[...]) yourself)')
    return cls


def _policy_field(key: str, value: Any, where: str) -> Any:
    """One field of a policy read from a file, checked."""
    if key == 'placement':
        return one_of(value, where, PLACEMENTS)
    if key == 'operator':
        return None if value is None else one_of(value, where, OPERATORS)
    if key == 'targets':
        return tuple(one_of(t, where, TARGETS) for t in string_list(value, where, what='target names'))
    if key in TARGETS:
        return _variant_from_dict(value, where)
    if key in _POLICY_FLAGS:
        if not isinstance(value, bool):
            raise ValueError(f'{where} must be true or false, but got {short_repr(value)}')
        return value
    if key in ('include', 'exclude'):
        return string_list(value, where, what='name patterns')
    if key in ('include_types', 'exclude_types'):
        return string_list(value, where, IDENTIFIER, 'class names')
    if key == 'leaf_modules':
        return tuple(_leaf_module(name, where) for name in string_list(value, where, what='class names'))
    # a ConversionPolicy field this function does not know how to check: refuse rather than pass it on
    raise ValueError(f'{where} cannot be read from a file; leave it out')


def policy_from_dict(data: Any, field: str = 'policy') -> ConversionPolicy:
    """The :class:`ConversionPolicy` described by ``data``, a JSON object of its fields (as
    :meth:`ConversionPolicy.to_dict` writes them; omitted fields keep their defaults), every field checked.

    Checkpoints and zoo recipes both go through it: ``targets``, ``include``, ``exclude``, ``include_types`` and
    ``exclude_types`` are lists of strings, the ``skip_*`` flags booleans, ``placement`` a known placement, the
    variants objects of known options, and ``leaf_modules`` names of nn.Module classes in torch.nn or timm.layers.
    Nothing in it can make the program read a file, import a module or run code.

    Args:
        data: the policy object.
        field: the name of the field it came from, for error messages.

    Raises:
        ValueError: naming the field, the value and what is allowed.
    """
    fields = [f.name for f in dataclasses.fields(ConversionPolicy)]
    if not isinstance(data, dict):
        raise ValueError(f'{field} must be an object of ConversionPolicy fields ({{}} for the default), but got '
                         f'{short_repr(data)}')
    kwargs: Dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f'{field}: unknown policy field {unknown_key(key, fields)}')
        kwargs[key] = _policy_field(key, value, field_path(field, key))
    try:
        return ConversionPolicy(**kwargs)
    except (TypeError, ValueError) as e:  # cross-field rules (init='max' needs reward='asym')
        raise ValueError(f'{field}: {e}') from e
