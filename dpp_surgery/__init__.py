"""dpp_surgery: Detail-Preserving Pooling for timm models.

Public API (flat, like ``timm.layers``): the DPP layer :class:`DPP2d`, its functional form :func:`dpp2d`,
optimizer parameter groups that keep DPP parameters free of weight decay (:func:`param_groups`),
:func:`kernel_status` for the fused CPU kernel, the surgery of timm models (:func:`plan`, read-only, and
:func:`convert`, in place), checkpoints (:func:`save`, :func:`load`, :func:`create`), :func:`finetune` and ONNX
export (:func:`export_onnx`, :func:`onnx_session`).

The package is layered; each part imports only parts listed before it (tests/test_architecture.py checks this):

* ``native/``: the C++ sources, their build and loaders, the Triton kernels;
* ``layers/``: the DPP2d, GlobalDPP2d and S3DPP2d modules, their functional form, window geometry;
* ``surgery/``: the conversion policy, FX tracing, the plan (sites, analysis, detection, blocks, decisions, FLOPs),
  the rewrite engine and the conversion;
* ``export/`` (the ONNX writer, DPP's translations, other runtimes) and ``checkpoint.py`` (the checkpoint format);
* ``models/``: the offline EfficientNet-Lite0 weights and the paper's small network;
* ``training/``: fine-tuning, data sets, precision choice;
* ``timing.py``: timing and the machine description the benchmarks print;
* ``zoo/``: the zoo's registry (timm models ``<arch>_dpp``) and its runner;
* ``tools/``: the programs that use the library (benchmarks, coverage, demo, experiments).

``import dpp_surgery`` registers the zoo's models with timm and imports nothing else: every name below is loaded
on first use (module-level ``__getattr__``), so neither the training stack nor onnx is imported until asked for.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__
from . import zoo as _zoo  # noqa: F401 - registers the zoo recipes as timm models '<arch>_dpp' (builds none)

# public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(('DPP2d', 'GlobalDPP2d', 'S3DPP2d', 'dpp2d', 'full_guide', 'PoolGeometry', 'INIT_PRESETS',
                     'param_groups', 'dpp_parameters', 'kernel_status', 'KernelBuildWarning', 'LrScaleWarning',
                     'DEFAULT_EPS', 'THETA_ALPHA_MAX', 'GUIDES', 'REWARDS', 'NORMS', 'dpp_aa_layer'),
                    'dpp_surgery.layers'),
    **dict.fromkeys(('plan', 'convert', 'Plan', 'Site', 'SiteKind', 'SiteAction', 'SitePlacement', 'ReasonCode',
                     'ConversionPolicy', 'DPPVariant', 'NoEffectWarning', 'ConversionError', 'TraceError', 'dpp_layers',
                     'trace', 'conversion_history', 'is_converted'), 'dpp_surgery.surgery'),
    **dict.fromkeys(('save', 'load', 'create', 'CheckpointError'), 'dpp_surgery.checkpoint'),
    'finetune': 'dpp_surgery.training.finetune',
    **dict.fromkeys(('export_onnx', 'onnx_session'), 'dpp_surgery.export.onnx'),
}

__all__ = [*_LAZY, '__version__']


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # the real signatures, for type checkers and IDEs
    from .export.onnx import export_onnx, onnx_session
    from .layers import (
        DEFAULT_EPS, DPP2d, GUIDES, INIT_PRESETS, NORMS, REWARDS, THETA_ALPHA_MAX, GlobalDPP2d, KernelBuildWarning,
        LrScaleWarning, PoolGeometry, S3DPP2d, dpp2d, dpp_aa_layer, dpp_parameters, full_guide, kernel_status,
        param_groups,
    )
    from .surgery import (
        ConversionError, ConversionPolicy, DPPVariant, NoEffectWarning, Plan, ReasonCode, Site, SiteAction, SiteKind,
        SitePlacement, TraceError, conversion_history, convert, dpp_layers, is_converted, plan, trace,
    )
    from .checkpoint import CheckpointError, create, load, save
    from .training.finetune import finetune
