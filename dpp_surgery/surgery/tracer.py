"""torch.fx tracing of timm models for discovery: leaf rules, timm's autowrap functions, clear failures."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple, Type

import torch.fx as fx
from torch import nn

from ..layers import DPP2d

__all__ = ['DPPTracer', 'trace', 'TraceError', 'LEAF_TYPES']

# Modules that discovery keeps whole: every pooling and conv subclass (so StdConv2d / Conv2dSame / the *Same pools
# stay one node with their own semantics), norm layers, and DPP2d itself.
LEAF_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.modules.batchnorm._NormBase,
    nn.GroupNorm, nn.LayerNorm, DPP2d,
)


class TraceError(RuntimeError):
    """torch.fx could not trace the model; the message names the module and how to mark it as a leaf.

    ``module_name`` is the qualified name of the innermost module being traced ('' for the root) and ``module_type``
    its class."""

    def __init__(self, message: str, module_name: str = '', module_type: Optional[type] = None):
        super().__init__(message)
        self.module_name = module_name
        self.module_type = module_type


def _timm_leaves():
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is a dependency, but keep the tracer usable on plain torch models
        return (), ()
    return tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))


class DPPTracer(fx.Tracer):
    """An fx Tracer whose leaves are decided with ``isinstance``: :data:`LEAF_TYPES`, timm's notrace modules and
    ``extra_leaves``; timm's notrace functions are auto-wrapped. fx's own ``module_stack`` tells, on failure,
    which module was being traced."""

    def __init__(self, extra_leaves: Iterable[Type[nn.Module]] = (), leaf_all_children: bool = False):
        timm_modules, timm_functions = _timm_leaves()
        super().__init__(autowrap_functions=timm_functions)
        self.leaf_types = tuple(LEAF_TYPES) + tuple(timm_modules) + tuple(extra_leaves)
        self.leaf_all_children = leaf_all_children

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_all_children:
            return True
        if isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, extra_leaves: Sequence[Type[nn.Module]] = (), leaf_all_children: bool = False,
          name: Optional[str] = None) -> fx.GraphModule:
    """Trace ``module`` with :class:`DPPTracer` into a GraphModule (for analysis; the model itself is unchanged).

    Raises:
        TraceError: naming the innermost module being traced when tracing failed.
    """
    tracer = DPPTracer(extra_leaves, leaf_all_children)
    try:
        graph = tracer.trace(module)
    except Exception as e:
        stack = list(tracer.module_stack.values())
        qualified, module_type = stack[-1] if stack else ('', type(module))
        if not isinstance(module_type, type):
            module_type = type(module)
        cls = module_type.__name__
        where = qualified or (name or '<root>')
        raise TraceError(
            f'torch.fx could not trace module {where!r} ({cls}): {type(e).__name__}: '
            f'{str(e).splitlines()[0] if str(e) else ""}. '
            f'Mark it as a leaf, either with timm.layers.register_notrace_module({cls}) or by passing '
            f'leaf_modules=[{cls}] to plan()/convert().', module_name=qualified or '', module_type=module_type) from e
    return fx.GraphModule(tracer.root, graph, module.__class__.__name__)
