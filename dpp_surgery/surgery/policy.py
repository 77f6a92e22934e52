"""The conversion policy: which downsampling sites become DPP, where, and which DPP variant they get."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple, Type, Union

from torch import nn

from ..utils import did_you_mean
from ..layers import DPP2d

__all__ = ['DPPVariant', 'ConversionPolicy', 'TARGETS', 'PLACEMENTS', 'resolve_policy']

TARGETS = ('max_pool', 'avg_pool', 'strided_conv')
PLACEMENTS = ('post', 'pre', 'block')


@dataclass(frozen=True)
class DPPVariant:
    """The DPP2d options used for one kind of site: guide, reward, norm and init (see :class:`DPP2d`)."""
    guide: str = 'lite'
    reward: str = 'sym'
    norm: str = 'mean'
    init: Union[str, Tuple[float, float]] = 'paper'

    def __post_init__(self):
        DPP2d(1, guide=self.guide, reward=self.reward, norm=self.norm, init=self.init)  # validates every field

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
        init = self.init if isinstance(self.init, str) else f'alpha={self.init[0]:g},lambda={self.init[1]:g}'
        return f'{self.guide}-{self.reward}, norm={self.norm}, init={init}'

    def to_dict(self) -> dict:
        return {'guide': self.guide, 'reward': self.reward, 'norm': self.norm,
                'init': self.init if isinstance(self.init, str) else list(self.init)}


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
        for kind in TARGETS:
            object.__setattr__(self, kind, DPPVariant.coerce(getattr(self, kind), kind))
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
            if isinstance(v, DPPVariant):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = [x.__name__ if isinstance(x, type) else x for x in v]
            out[f.name] = v
        return out

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
