"""FX-guided DPP surgery of timm models: plan (read-only) and convert (in place)."""
from timm.layers import register_notrace_module

from ..layers import DPP2d
from .convert import ConversionError, NoEffectWarning, convert, dpp_layers
from .plan import (
    Plan, ReasonCode, Site, SiteAction, SiteKind, SitePlacement, census, default_input_size, is_conv_like,
    is_same_padding, plan,
)
from .policy import PLACEMENTS, TARGETS, ConversionPolicy, DPPVariant
from .tracer import TraceError, trace

# timm's FX feature extraction (and any timm-leaf tracer) keeps DPP2d as one node
register_notrace_module(DPP2d)

__all__ = ['plan', 'convert', 'Plan', 'Site', 'SiteKind', 'SiteAction', 'SitePlacement', 'ReasonCode',
           'ConversionPolicy', 'DPPVariant', 'TARGETS', 'PLACEMENTS', 'NoEffectWarning', 'ConversionError',
           'TraceError', 'dpp_layers', 'trace', 'default_input_size', 'census', 'is_conv_like', 'is_same_padding']
