"""DPP layers: the module, its functional form, window geometry and the fused kernel loader."""
from ..native.kernel import KernelBuildWarning, kernel_status
from .dpp import DPP2d, GlobalDPP2d, INIT_PRESETS, LrScaleWarning, dpp_aa_layer, dpp_parameters, param_groups
from .functional import (DEFAULT_EPS, GUIDES, NORMS, REWARDS, THETA_ALPHA_MAX, NonFiniteParameterError, dpp2d,
                         full_guide)
from .geometry import PoolGeometry
from .s3dpp import S3DPP2d

__all__ = [
    'DPP2d', 'GlobalDPP2d', 'S3DPP2d', 'dpp2d', 'full_guide', 'PoolGeometry', 'INIT_PRESETS', 'param_groups',
    'dpp_parameters', 'kernel_status', 'KernelBuildWarning', 'DEFAULT_EPS', 'THETA_ALPHA_MAX', 'GUIDES', 'REWARDS',
    'NORMS', 'NonFiniteParameterError', 'LrScaleWarning', 'dpp_aa_layer',
]
