"""ONNX export of converted models: the writer (:mod:`.onnx`), DPP's translations (:mod:`.translation`: one custom
node; :mod:`.decomposition`: standard operators) and exported files in other runtimes (:mod:`.runtimes`). The native
onnxruntime kernel lives with the other native code (:mod:`dpp_surgery.native.ort_kernel`; :func:`build_ort_library`
writes it for any onnxruntime host); its names are importable from here too.

Importing this package imports onnx and onnxruntime only when a name is first used.
"""
from __future__ import annotations

import importlib

_LAZY = {
    **dict.fromkeys(('export_onnx', 'onnx_session', 'verify_onnx', 'register_onnx_schema', 'dpp_nodes', 'ExportError',
                     'ExportWarning', 'SUPPORTED_MODES', 'SUPPORTED_OPSETS', 'DEFAULT_OPSET', 'DPP_DOMAIN', 'DPP_OP',
                     'DECOMPOSED_OPS'),
                    'dpp_surgery.export.onnx'),
    **dict.fromkeys(('ort_kernel_library', 'ort_kernel_status', 'build_ort_library', 'OrtKernelWarning'),
                    'dpp_surgery.native.ort_kernel'),
    **dict.fromkeys(('runtime_session', 'runtime_version', 'RUNTIMES', 'OTHER_RUNTIMES', 'RuntimeUnavailableError'),
                    'dpp_surgery.export.runtimes'),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(module), name)
