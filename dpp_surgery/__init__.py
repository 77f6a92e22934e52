"""dpp_surgery: Detail-Preserving Pooling for timm models.

Public API (flat, like ``timm.layers``): the DPP layer :class:`DPP2d`, its functional form :func:`dpp2d`,
optimizer parameter groups that keep DPP parameters free of weight decay (:func:`param_groups`),
:func:`kernel_status` for the fused CPU kernel, and the surgery of timm models: :func:`plan` (read-only) and
:func:`convert` (in place).
"""
from .layers import (
    DEFAULT_EPS, DPP2d, INIT_PRESETS, GUIDES, NORMS, REWARDS, THETA_ALPHA_MAX, KernelBuildWarning, PoolGeometry,
    dpp2d, dpp_parameters, full_guide, kernel_status, param_groups,
)
from .surgery import (
    ConversionError, ConversionPolicy, DPPVariant, NoEffectWarning, Plan, Site, TraceError, convert, dpp_layers, plan,
)
from .checkpoint import CheckpointError, create, load, save
from .version import __version__
from . import zoo as _zoo  # noqa: F401 - registers the zoo recipes as timm models '<arch>_dpp' (builds none)


def export_onnx(*args, **kwargs):
    """See :func:`dpp_surgery.export.export_onnx` (imported on first use: onnx is heavy)."""
    from .export import export_onnx as _export_onnx
    return _export_onnx(*args, **kwargs)


def onnx_session(*args, **kwargs):
    """See :func:`dpp_surgery.export.onnx_session`."""
    from .export import onnx_session as _onnx_session
    return _onnx_session(*args, **kwargs)


def finetune(*args, **kwargs):
    """See :func:`dpp_surgery.train.finetune` (imported on first use)."""
    from .train import finetune as _finetune
    return _finetune(*args, **kwargs)

__all__ = [
    'DPP2d', 'dpp2d', 'full_guide', 'PoolGeometry', 'INIT_PRESETS', 'param_groups', 'dpp_parameters',
    'kernel_status', 'KernelBuildWarning', 'DEFAULT_EPS', 'THETA_ALPHA_MAX', 'GUIDES', 'REWARDS', 'NORMS',
    'plan', 'convert', 'Plan', 'Site', 'ConversionPolicy', 'DPPVariant', 'NoEffectWarning', 'ConversionError',
    'TraceError', 'dpp_layers', 'save', 'load', 'create', 'CheckpointError', 'finetune', 'export_onnx', 'onnx_session',
    '__version__',
]
