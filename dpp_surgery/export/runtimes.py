"""Exported files in other runtimes than onnxruntime: OpenVINO and tract.

A decomposed file (``export_onnx(..., mode='decomposed')``) is standard ONNX, so runtimes other than onnxruntime run it
as they are. Two that install from PyPI and run on the CPU stand for them here: OpenVINO (Intel's runtime, ``pip
install openvino``; its CPU plugin) and tract (Sonos' runtime for edge devices, written in Rust; ``pip install
tract``). :func:`runtime_session` opens a file in either of them, or in onnxruntime, for one input shape, and returns a
function from a NumPy batch to the outputs, so the same checks and timings serve every runtime.

* OpenVINO computes in bfloat16 by default on CPUs with native bfloat16 (its ``INFERENCE_PRECISION_HINT``); the
  session asks for float32, the precision of the file.
* tract needs the sizes when it types the model (a ``Pad`` by an amount that depends on the input's size, as for
  'same' padding, cannot be typed otherwise): it reads a copy of the file with the input's shape fixed, and optimises
  the model for that shape. tract runs on the calling thread (``threads`` does not apply to it).

Custom files (``mode='custom'``) hold ``dpp_surgery.DPP2d`` nodes, which only onnxruntime runs (the native kernel,
or the functions the file carries); other runtimes take the decomposed file.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

import numpy as np

from ..utils import MissingExtraError, require_extra

__all__ = ['RUNTIMES', 'OTHER_RUNTIMES', 'RuntimeUnavailableError', 'runtime_session', 'run_once', 'runtime_version']

OTHER_RUNTIMES = ('openvino', 'tract')
RUNTIMES = ('onnxruntime',) + OTHER_RUNTIMES
_PACKAGE = {'onnxruntime': 'onnxruntime', 'openvino': 'openvino', 'tract': 'tract'}


class RuntimeUnavailableError(MissingExtraError):
    """The runtime's Python package is not installed; the message names the package to install."""


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f'unknown runtime {runtime!r}; supported runtimes: {", ".join(RUNTIMES)}')


def _import(runtime: str):
    _check_runtime(runtime)
    try:
        return __import__(_PACKAGE[runtime])
    except ImportError as e:
        extra = 'onnx' if runtime == 'onnxruntime' else 'runtimes'
        raise RuntimeUnavailableError(
            f"{runtime} is not installed ({e}): pip install 'dpp_surgery[{extra}]' (or pip install "
            f'{_PACKAGE[runtime]})') from e


def runtime_version(runtime: str) -> str:
    """The installed version of ``runtime`` (:class:`RuntimeUnavailableError` if it is not installed)."""
    module = _import(runtime)
    if runtime == 'tract':
        return module.version()
    return module.__version__.split('-')[0]


def _check_file(path: str, runtime: str):
    """The file exists and, for another runtime than onnxruntime, holds no DPP2d node; returns its ModelProto for those
    (with its weights for tract, which reads a changed copy; without external weights for OpenVINO, which reads the
    file itself), None for onnxruntime."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no ONNX file at {path}; write one with dpp_surgery.export_onnx or dpp-surgery export')
    if runtime == 'onnxruntime':
        return None
    import onnx

    from .onnx import dpp_nodes

    model = onnx.load(path, load_external_data=runtime == 'tract')
    if dpp_nodes(model):
        raise ValueError(f'{path} holds dpp_surgery.DPP2d nodes (a custom file), which only onnxruntime runs; '
                         f"export with mode='decomposed' for {runtime}")
    return model


def runtime_session(path: str, runtime: str, input_shape: Sequence[int],
                    threads: Optional[int] = None) -> Callable[[np.ndarray], List[np.ndarray]]:
    """``path`` opened in ``runtime`` (one of :data:`RUNTIMES`) for float32 inputs of ``input_shape`` (N, C, H, W),
    with ``threads`` intra-op threads (None: the runtime's default). Returns ``run(x) -> outputs`` (a list, in the
    graph's order, as onnxruntime's ``session.run``).

    Raises:
        RuntimeUnavailableError: the runtime's package is not installed.
        ValueError: an unknown runtime, a shape that is not four positive integers, or a custom file for a runtime
            other than onnxruntime.
    """
    _check_runtime(runtime)
    shape = [int(v) for v in input_shape]
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f'input_shape must be four positive integers (N, C, H, W), but got {list(input_shape)}')
    if threads is not None and threads < 1:
        raise ValueError(f'threads must be >= 1, but got {threads}')
    module = _import(runtime)  # a missing runtime is named before anything is read
    require_extra('onnx', 'runtime_session', modules=('onnx',))
    proto = _check_file(path, runtime)
    if runtime == 'onnxruntime':
        from .onnx import onnx_session

        session = onnx_session(path, threads=threads, spin=False)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    if runtime == 'openvino':
        core = module.Core()
        model = core.read_model(path)
        model.reshape(shape)
        config = {'INFERENCE_PRECISION_HINT': 'f32'}
        if threads:
            config['INFERENCE_NUM_THREADS'] = int(threads)
        compiled = core.compile_model(model, 'CPU', config)
        request = compiled.create_infer_request()
        outputs = list(compiled.outputs)

        def run_openvino(x: np.ndarray) -> List[np.ndarray]:
            results = request.infer({0: x})
            return [np.array(results[o]) for o in outputs]
        return run_openvino
    return _tract_session(module, proto, path, shape)


def _tract_session(tract, model, path: str, shape: List[int]) -> Callable[[np.ndarray], List[np.ndarray]]:
    """tract types a model before it binds sizes, and some sizes must be known then (a ``Pad`` whose amounts depend on
    the input's size, as for 'same' padding): it reads a copy of ``model`` (the file at ``path``) with the input's
    sizes fixed and the exporter's shape annotations (in terms of the file's symbols) left out."""
    import tempfile

    import onnx

    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ValueError(f'{path}: the first input has {len(dims)} dimensions; expected (N, C, H, W)')
    fixed = [d.dim_value for d in dims]
    if any(f and f != s for f, s in zip(fixed, shape)):
        raise ValueError(f'{path} takes inputs of shape {[f or None for f in fixed]}, not {shape}')
    for d, s in zip(dims, shape):
        d.dim_value = s
    del model.graph.value_info[:]
    for output in model.graph.output:
        output.type.tensor_type.ClearField('shape')
    with tempfile.TemporaryDirectory() as folder:
        copy = os.path.join(folder, 'model.onnx')
        onnx.save(model, copy)
        runnable = tract.onnx().load(copy).into_model().into_runnable()  # (tract runs on the calling thread)
    return lambda x: [t.to_numpy() for t in runnable.run([x])]


def run_once(path: str, runtime: str, x: np.ndarray, threads: Optional[int] = None) -> List[np.ndarray]:
    """The outputs of ``path`` for the batch ``x`` in ``runtime``: :func:`runtime_session` for ``x``'s shape, run once
    (a module-level function, so a worker process can run it)."""
    return runtime_session(path, runtime, x.shape, threads=threads)(np.ascontiguousarray(x, dtype=np.float32))
