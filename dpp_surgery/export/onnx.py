"""ONNX export of converted models, verified in onnxruntime.

``export_onnx(model, path, mode=...)`` writes one self-contained file (weights inside) with dynamic batch and
spatial sizes, in one of two modes:

* ``'decomposed'``: every DPP layer is standard ONNX operators (:data:`DECOMPOSED_OPS`), written directly in place
  of each DPP2d node (:mod:`.decomposition`): the windows unfolded by one grouped convolution with one-hot filters,
  then reductions over the window axis and element-wise ``Sub``/``Mul``/``Log``/``Exp``, with the parameters'
  transforms folded into constants. It runs on onnxruntime and any other runtime.
* ``'custom'``: every DPP layer is one node ``DPP2d`` in the domain ``dpp_surgery`` (schema:
  :func:`register_onnx_schema`), with its geometry and variant as attributes (``kernel_shape``, ``strides``,
  ``pads``, ``auto_pad``, ``ceil_mode``, ``reward``, ``norm``, ``eps``) and ``theta_alpha``, ``theta_lambda`` (and
  the Full guide's ``guide_weight``) as inputs. The file also carries each configuration's decomposition as a
  model-local ONNX function (an overload of ``dpp_surgery.DPP2d``, IR version 10), so any onnxruntime runs it with no
  extra library; :func:`onnx_session` also registers the native kernel (:mod:`dpp_surgery.native.ort_kernel`), which
  onnxruntime then runs instead of the function.

``verify_onnx`` checks the file with ``onnx.checker`` and compares onnxruntime with PyTorch on random inputs and
given real images at even and odd sizes, batch 1 and 8. DPP's own ONNX forms live in :mod:`.translation` and
:mod:`.decomposition`. Both modes trace the model once, with every DPP layer as one op.

Models that run at no other spatial size than the example's (attention biases or position embeddings tied to the
resolution) and timm's 'same'-padding models are exported with a dynamic batch and a fixed size (ExportWarning).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import traceback
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..native.kernel import MAX_WINDOW
from ..utils import atomic_write, first_line, require_extra
from ..layers.geometry import is_same_padding
from .translation import (
    DECOMPOSED_OPS, DEFAULT_RTOL, DPP_DOMAIN, DPP_OP, ExportError, attach_functions, dpp_as_custom_nodes, dpp_nodes,
    inline_decompositions, register_onnx_schema, translation_table,
)

__all__ = ['export_onnx', 'onnx_session', 'verify_onnx', 'register_onnx_schema', 'dpp_nodes', 'ExportError',
           'ExportWarning', 'SUPPORTED_MODES', 'SUPPORTED_OPSETS', 'DEFAULT_OPSET', 'DPP_DOMAIN', 'DPP_OP',
           'DECOMPOSED_OPS']

SUPPORTED_MODES = ('decomposed', 'custom')
SUPPORTED_OPSETS = tuple(range(18, 24))
DEFAULT_OPSET = 18


class ExportWarning(UserWarning):
    """The export succeeded with less than was asked (for example a fixed spatial size)."""


def _input_size(model: nn.Module) -> Tuple[int, int, int]:
    from ..surgery import default_input_size
    return tuple(default_input_size(model))  # type: ignore[return-value]


def _failing_module(exc: BaseException, model: nn.Module) -> Optional[str]:
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get('self')
        if obj is not None and id(obj) in names:
            found = names[id(obj)] or '<root>'
    return found


def _check_arguments(mode: str, opset: Optional[int]) -> int:
    if mode not in SUPPORTED_MODES:
        raise ValueError(f'unsupported export mode {mode!r}; supported modes: {", ".join(SUPPORTED_MODES)}')
    opset = DEFAULT_OPSET if opset is None else opset
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f'unsupported opset {opset}; supported opsets: {SUPPORTED_OPSETS[0]} to '
                         f'{SUPPORTED_OPSETS[-1]}')
    return opset


def _shape_attempts(model: nn.Module, example_input: torch.Tensor, dynamic: bool,
                    min_size: int) -> Tuple[torch.Tensor, List]:
    """The example to trace with and the ``dynamic_shapes`` to try, most dynamic first."""
    if not dynamic:
        return example_input, [None]
    if example_input.shape[0] == 1:  # torch.export pins a batch of 1; trace with 2, keep the batch dynamic
        example_input = torch.cat([example_input, example_input])
    lo = min(min_size, *example_input.shape[-2:])
    batch = torch.export.Dim('batch', min=1, max=1024)
    full = {0: batch, 2: torch.export.Dim('height', min=lo, max=4096), 3: torch.export.Dim('width', min=lo, max=4096)}
    # some models pin their spatial size in Python (timm's dynamic 'same' padding, fixed-size reshapes):
    # then only the batch stays dynamic
    if any(is_same_padding(m) for m in model.modules()):
        return example_input, [({0: batch},)]  # 'same' padding computed from sizes in Python: fixed spatial size
    if not _runs_at_other_sizes(model, example_input):
        return example_input, [({0: batch},)]
    return example_input, [(full,), ({0: batch},)]


def _runs_at_other_sizes(model: nn.Module, example_input: torch.Tensor) -> bool:
    """Whether ``model`` (in eval mode) runs one pixel larger than the example, the size verification checks: models
    whose attention biases or position embeddings are tied to the input resolution (timm's levit, efficientformer,
    vitamin) do not, and torch.export may still accept dynamic sizes for them, making a file wrong at any other size."""
    h, w = example_input.shape[-2:]
    probe = torch.zeros(1, example_input.shape[1], h + 1, w + 1, dtype=example_input.dtype)
    try:
        with torch.no_grad():
            model(probe)
    except Exception:  # noqa: BLE001 - any failure: the model serves its example size only
        return False
    return True


def _torch_export(model: nn.Module, example_input: torch.Tensor, attempts: List):
    """The ExportedProgram of the first of ``attempts`` that torch.export accepts, with every DPP layer the native
    kernels take as one op (either mode: decomposed files get their decomposition written in place of each node,
    not traced); ExportError naming the module that failed otherwise."""
    error = None
    for dynamic_shapes in attempts:
        try:
            with dpp_as_custom_nodes(model, max_window=MAX_WINDOW):
                program = torch.export.export(model, (example_input,), dynamic_shapes=dynamic_shapes)
        except Exception as e:  # noqa: BLE001 - the next attempt, or reported with the failing module
            error = e
            continue
        if dynamic_shapes is not None and 2 not in dynamic_shapes[0]:
            warnings.warn(f'{type(model).__name__} pins its spatial input size (under torch.export, or it runs at '
                          f'no other size); the ONNX file has a dynamic batch but a fixed '
                          f'{tuple(example_input.shape[-2:])} input.', ExportWarning, stacklevel=3)
        return program
    where = _failing_module(error, model)
    place = f'in module {where!r}' if where else f'in {type(model).__name__}'
    raise ExportError(f'torch.export failed {place}: {type(error).__name__}: {first_line(error)}') from error


@contextlib.contextmanager
def _plain_attention(modules: Sequence[nn.Module]):
    """timm attention modules computing attention as matmul/softmax instead of the fused kernel, inside."""
    for m in modules:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in modules:
            m.fused_attn = True


def _to_onnx(program, example_input: torch.Tensor, opset: int, custom: bool):
    """The ONNX ModelProto of ``program``: with the DPP2d nodes and their functions (custom), or with each DPP2d
    node replaced by its decomposition (decomposed)."""
    try:
        onnx_program = torch.onnx.export(program, (example_input,), dynamo=True, opset_version=opset,
                                         external_data=False, optimize=True, verbose=False,
                                         custom_translation_table=translation_table())
        proto = onnx_program.model_proto
        if custom:
            attach_functions(proto, opset)
        else:
            inline_decompositions(proto)
        return proto
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportError(f'ONNX conversion failed: {type(e).__name__}: {first_line(e)}') from e


def _write(exported, path: str, overwrite: bool) -> None:
    import onnx

    def write(tmp):
        if isinstance(exported, onnx.ModelProto):
            onnx.save(exported, tmp)
        else:
            exported.save(tmp)
        onnx.checker.check_model(tmp, full_check=True)

    atomic_write(path, write, overwrite)


def export_onnx(
        model: nn.Module,
        path: str,
        mode: str = 'decomposed',
        example_input: Optional[torch.Tensor] = None,
        opset: Optional[int] = None,
        dynamic: bool = True,
        verify: bool = False,
        overwrite: bool = False,
        min_size: int = 64,
        verify_images: Optional[Sequence[torch.Tensor]] = None,
) -> str:
    """Export ``model`` to ONNX at ``path`` (one file, weights inside), written atomically.

    Args:
        model: a (converted) model; exported in eval mode.
        path: destination ``.onnx`` file.
        mode: ``'decomposed'``: DPP as standard ONNX operators; ``'custom'``: one ``dpp_surgery.DPP2d`` node per DPP
            layer, with its decomposition as a model-local function (see the module docstring). Global DPP (a
            window as large as the input) and windows of more than 64 positions stay decomposed in either mode.
        example_input: an input to trace with; default ``(1, *pretrained_cfg['input_size'])``.
        opset: ONNX opset (18 and newer); default 18.
        dynamic: dynamic batch and spatial sizes (spatial sizes from ``min_size`` to 4096).
        verify: run :func:`verify_onnx` after writing and raise :class:`ExportError` if it fails.
        overwrite: replace an existing file.
        verify_images: real images for the verification (see :func:`verify_onnx`).

    Returns:
        ``path``.
    """
    require_extra('onnx', 'export_onnx')
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    opset = _check_arguments(mode, opset)
    if example_input is None:
        example_input = torch.randn(1, *_input_size(model))
    if example_input.dim() != 4:
        raise ValueError(f'example_input must be (N, C, H, W), but got shape {tuple(example_input.shape)}')
    was_training = model.training
    model.eval()
    try:
        example_input, attempts = _shape_attempts(model, example_input, dynamic, min_size)
        try:
            exported = _to_onnx(_torch_export(model, example_input, attempts), example_input, opset,
                                custom=mode == 'custom')
        except ExportError as error:
            # timm's fused attention (F.scaled_dot_product_attention) trips the ONNX exporter in some models (5-D
            # inputs in nest, a view of its output in maxxvit): retry with the same attention written out
            fused = [m for m in model.modules() if getattr(m, 'fused_attn', None) is True]
            if not fused:
                raise
            try:
                with _plain_attention(fused):
                    exported = _to_onnx(_torch_export(model, example_input, attempts), example_input, opset,
                                        custom=mode == 'custom')
            except ExportError:
                raise error from None
    finally:
        model.train(was_training)
    _write(exported, path, overwrite)
    if verify:
        report = verify_onnx(model, path, base_size=tuple(example_input.shape[-2:]), images=verify_images)
        if not report['ok']:
            raise ExportError(f'{path}: onnxruntime differs from PyTorch: {report["worst"]}')
    return path


def _has_dpp_nodes(path: str) -> bool:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return bool(dpp_nodes(model))


def onnx_session(path: str, threads: Optional[int] = None, profile: bool = False, native: Optional[bool] = None,
                 spin: bool = True):
    """An onnxruntime CPU InferenceSession for ``path`` (``threads``: intra-op threads).

    ``spin=False`` stops the session's idle threads from spin-waiting after a run (onnxruntime's
    ``session.intra_op.allow_spinning``). Benchmarks that time a session in turn with PyTorch or other sessions use it:
    otherwise the spinning threads of the session that ran last take cores from the next one.

    ``native``: for files with ``dpp_surgery.DPP2d`` nodes (``mode='custom'``), register the native kernel library
    (:mod:`dpp_surgery.native.ort_kernel`, built on first use). ``None`` (default): if it can be built, else run the
    decomposition carried in the file (with one OrtKernelWarning saying why); ``True``: require it (RuntimeError if
    it cannot be built); ``False``: never (the decomposition runs).
    """
    require_extra('onnx', 'onnx_session', modules=('onnx', 'onnxruntime'))
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise FileNotFoundError(f'no ONNX file at {path}; write one with dpp_surgery.export_onnx or dpp-surgery export')
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
    if profile:  # the profile goes to a temporary file; session.end_profiling() returns its path
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tempfile.gettempdir(), f'dpp_surgery_ort_profile_{os.getpid()}')
    if native is not False and _has_dpp_nodes(path):
        from ..native.ort_kernel import ort_kernel_library, ort_kernel_status
        library = ort_kernel_library()
        if library is not None:
            opts.register_custom_ops_library(library)
        elif native:
            raise RuntimeError(f'the native onnxruntime DPP2d kernel is unavailable: {ort_kernel_status()["error"]}')
    return ort.InferenceSession(path, sess_options=opts, providers=['CPUExecutionProvider'])


def _image_batch(images: Sequence[torch.Tensor], batch: int, size: Tuple[int, int], mean, std) -> torch.Tensor:
    """``batch`` of ``images`` (each (1, 3, H, W) in [0, 1]) in turn, resized to ``size`` and normalised."""
    import torch.nn.functional as F

    imgs = [F.interpolate(images[i % len(images)], size=size, mode='bilinear', antialias=True) for i in range(batch)]
    x = torch.cat(imgs)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def verify_onnx(model: nn.Module, path: str, base_size: Optional[Sequence[int]] = None,
                batches: Sequence[int] = (1, 8), rtol: float = DEFAULT_RTOL,
                images: Optional[Sequence[torch.Tensor]] = None) -> Dict:
    """Check ``path`` with onnx.checker and compare onnxruntime with PyTorch.

    Inputs: random normal and, when ``images`` are given (real photos, each (1, 3, H, W) in [0, 1]; the
    ``dpp-surgery export --verify`` command and the tools pass the sample photos of
    :mod:`dpp_surgery.tools.photos`), those images resized and normalised with the model's ``pretrained_cfg``, at
    ``base_size`` (default the model's input size) and one pixel larger (an odd size for even bases), each at every
    batch size. The error is ``max|ort - torch| / max|torch|``. Files with DPP2d nodes are checked twice: with the
    native kernel (if it builds) and with the ONNX functions.
    """
    require_extra('onnx', 'verify_onnx', modules=('onnx', 'onnxruntime'))
    import onnx

    onnx.checker.check_model(path, full_check=True)
    if base_size is None:
        base_size = _input_size(model)[1:]
    h, w = base_size
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    mean, std = cfg.get('mean', (0.5,) * 3), cfg.get('std', (0.5,) * 3)
    sessions = {'onnxruntime': onnx_session(path, native=False)}
    if _has_dpp_nodes(path):
        sessions = {'function': sessions['onnxruntime']}
        from ..native.ort_kernel import ort_kernel_library
        if ort_kernel_library() is not None:
            sessions['kernel'] = onnx_session(path, native=True)
    first = next(iter(sessions.values())).get_inputs()[0]
    name = first.name
    spatial_dynamic = not all(isinstance(d, int) for d in first.shape[2:])
    rows: List[Dict] = []
    model.eval()
    torch.manual_seed(0)
    sizes = ((h, w), (h + 1, w + 1)) if spatial_dynamic else ((h, w),)
    for size in sizes:
        for batch in batches:
            for kind in ('random', 'photo') if images else ('random',):
                x = torch.randn(batch, 3, *size) if kind == 'random' else _image_batch(images, batch, size, mean, std)
                with torch.no_grad():
                    ref = model(x)
                for runtime, session in sessions.items():
                    out = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
                    err = float('inf') if out.shape != ref.shape else (
                        (out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                    rows.append({'runtime': runtime, 'input': kind, 'batch': batch, 'size': list(size),
                                 'max_rel_error': err, 'ok': err <= rtol})
    worst = max(rows, key=lambda r: r['max_rel_error'])
    return {'ok': all(r['ok'] for r in rows), 'rows': rows, 'worst': worst, 'rtol': rtol,
            'spatial_dynamic': spatial_dynamic, 'runtimes': list(sessions)}


if __name__ == '__main__':  # pragma: no cover
    sys.exit('use: dpp-surgery export')
