"""FX-guided DPP surgery of timm models: plan (read-only) and convert (in place)."""
from .convert import ConversionError, NoEffectWarning, conversion_history, convert, dpp_layers, is_converted
from .plan import (
    Plan, ReasonCode, Site, SiteAction, SiteKind, SitePlacement, census, default_input_size, is_conv_like,
    is_same_padding, plan,
)
from .policy import PLACEMENTS, TARGETS, ConversionPolicy, DPPVariant
from .tracer import TraceError, trace

__all__ = ['plan', 'convert', 'Plan', 'Site', 'SiteKind', 'SiteAction', 'SitePlacement', 'ReasonCode',
           'ConversionPolicy', 'DPPVariant', 'TARGETS', 'PLACEMENTS', 'NoEffectWarning', 'ConversionError',
           'TraceError', 'dpp_layers', 'conversion_history', 'is_converted', 'trace', 'default_input_size', 'census',
           'is_conv_like', 'is_same_padding']
