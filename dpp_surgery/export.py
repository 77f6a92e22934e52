"""ONNX export of converted models, verified in onnxruntime.

``export_onnx(model, path, mode='decomposed')`` writes one self-contained file (weights inside) with dynamic batch
and spatial sizes, in which every DPP layer is standard ONNX operators: the windows are strided ``Slice`` ops (no
gather per element), and the weighting is element-wise ``Sub``/``Mul``/``Log``/``Exp``/``ReduceSum``. It runs on
onnxruntime and any other runtime. ``verify_onnx`` checks the file with ``onnx.checker`` and compares onnxruntime
with PyTorch on random and real-photo inputs at even and odd sizes, batch 1 and 8.
"""
from __future__ import annotations

import logging
import sys
import traceback
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpoint import atomic_write

__all__ = ['export_onnx', 'onnx_session', 'verify_onnx', 'ExportError', 'ExportWarning', 'SUPPORTED_MODES',
           'SUPPORTED_OPSETS', 'DEFAULT_OPSET']

_logger = logging.getLogger(__name__)

SUPPORTED_MODES = ('decomposed',)
SUPPORTED_OPSETS = tuple(range(18, 24))
DEFAULT_OPSET = 18
DEFAULT_RTOL = 1e-4


class ExportWarning(UserWarning):
    """The export succeeded with less than was asked (for example a fixed spatial size)."""


class ExportError(RuntimeError):
    """The model could not be exported (the message names the module and why) or failed verification."""


def _input_size(model: nn.Module) -> Tuple[int, int, int]:
    from .surgery import default_input_size
    return tuple(default_input_size(model))  # type: ignore[return-value]


def _failing_module(exc: BaseException, model: nn.Module) -> Optional[str]:
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get('self')
        if obj is not None and id(obj) in names:
            found = names[id(obj)] or '<root>'
    return found


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
) -> str:
    """Export ``model`` to ONNX at ``path`` (one file, weights inside), written atomically.

    Args:
        model: a (converted) model; exported in eval mode.
        path: destination ``.onnx`` file.
        mode: ``'decomposed'``: DPP as standard ONNX operators.
        example_input: an input to trace with; default ``(1, *pretrained_cfg['input_size'])``.
        opset: ONNX opset (18 and newer); default 18.
        dynamic: dynamic batch and spatial sizes (spatial sizes from ``min_size`` to 4096).
        verify: run :func:`verify_onnx` after writing and raise :class:`ExportError` if it fails.
        overwrite: replace an existing file.

    Returns:
        ``path``.
    """
    import onnx

    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    if mode not in SUPPORTED_MODES:
        raise ValueError(f'unsupported export mode {mode!r}; supported modes: {", ".join(SUPPORTED_MODES)} '
                         '(a single custom DPP2d operator is not available in this version)')
    opset = DEFAULT_OPSET if opset is None else opset
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f'unsupported opset {opset}; supported opsets: {SUPPORTED_OPSETS[0]} to '
                         f'{SUPPORTED_OPSETS[-1]}')
    if example_input is None:
        example_input = torch.randn(1, *_input_size(model))
    if example_input.dim() != 4:
        raise ValueError(f'example_input must be (N, C, H, W), but got shape {tuple(example_input.shape)}')
    was_training = model.training
    model.eval()
    attempts = [None]
    if dynamic:
        if example_input.shape[0] == 1:  # torch.export pins a batch of 1; trace with 2, keep the batch dynamic
            example_input = torch.cat([example_input, example_input])
        lo = min(min_size, *example_input.shape[-2:])
        batch = torch.export.Dim('batch', min=1, max=1024)
        full = {0: batch, 2: torch.export.Dim('height', min=lo, max=4096),
                3: torch.export.Dim('width', min=lo, max=4096)}
        # some models pin their spatial size in Python (timm's dynamic 'same' padding, fixed-size reshapes):
        # then only the batch stays dynamic
        attempts = [(full,), ({0: batch},)]
        if any(type(m).__name__.endswith('Same') for m in model.modules()):
            attempts = attempts[1:]  # dynamic 'same' padding computes pads from sizes in Python: fixed spatial size
    try:
        program, error = None, None
        for dynamic_shapes in attempts:
            try:
                program = torch.export.export(model, (example_input,), dynamic_shapes=dynamic_shapes)
                if dynamic_shapes is not None and 2 not in dynamic_shapes[0]:
                    warnings.warn(f'{type(model).__name__} pins its spatial input size under torch.export; the ONNX '
                                  f'file has a dynamic batch but a fixed {tuple(example_input.shape[-2:])} input.',
                                  ExportWarning, stacklevel=2)
                break
            except Exception as e:  # noqa: BLE001 - the next attempt, or reported with the failing module
                error = e
        if program is None:
            where = _failing_module(error, model)
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            place = f'in module {where!r}' if where else f'in {type(model).__name__}'
            raise ExportError(f'torch.export failed {place}: {type(error).__name__}: {first}') from error
        try:
            onnx_program = torch.onnx.export(program, (example_input,), dynamo=True, opset_version=opset,
                                             external_data=False, optimize=True, verbose=False)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f'ONNX conversion failed: {type(e).__name__}: {first}') from e
    finally:
        model.train(was_training)

    def write(tmp):
        onnx_program.save(tmp)
        onnx.checker.check_model(tmp, full_check=True)

    atomic_write(path, write, overwrite)
    if verify:
        report = verify_onnx(model, path, base_size=tuple(example_input.shape[-2:]))
        if not report['ok']:
            raise ExportError(f'{path}: onnxruntime differs from PyTorch: {report["worst"]}')
    return path


def onnx_session(path: str, threads: Optional[int] = None, profile: bool = False):
    """An onnxruntime CPU InferenceSession for ``path`` (``threads``: intra-op threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if profile:
        opts.enable_profiling = True
    return ort.InferenceSession(path, sess_options=opts, providers=['CPUExecutionProvider'])


def _photo_batch(batch: int, size: Tuple[int, int], mean, std) -> torch.Tensor:
    import torch.nn.functional as F

    from .photos import load_photos
    photos = list(load_photos().values())
    if not photos:
        return torch.randn(batch, 3, *size)
    imgs = [F.interpolate(photos[i % len(photos)], size=size, mode='bilinear', antialias=True) for i in range(batch)]
    x = torch.cat(imgs)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def verify_onnx(model: nn.Module, path: str, base_size: Optional[Sequence[int]] = None,
                batches: Sequence[int] = (1, 8), rtol: float = DEFAULT_RTOL) -> Dict:
    """Check ``path`` with onnx.checker and compare onnxruntime with PyTorch.

    Inputs: random normal and real photos, at ``base_size`` (default the model's input size) and one pixel larger
    (an odd size for even bases), each at every batch size. The error is ``max|ort - torch| / max|torch|``.
    """
    import onnx

    onnx.checker.check_model(path, full_check=True)
    if base_size is None:
        base_size = _input_size(model)[1:]
    h, w = base_size
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    mean, std = cfg.get('mean', (0.5,) * 3), cfg.get('std', (0.5,) * 3)
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    spatial_dynamic = not all(isinstance(d, int) for d in session.get_inputs()[0].shape[2:])
    rows: List[Dict] = []
    model.eval()
    torch.manual_seed(0)
    sizes = ((h, w), (h + 1, w + 1)) if spatial_dynamic else ((h, w),)
    for size in sizes:
        for batch in batches:
            for kind in ('random', 'photo'):
                x = torch.randn(batch, 3, *size) if kind == 'random' else _photo_batch(batch, size, mean, std)
                with torch.no_grad():
                    ref = model(x)
                out = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
                err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                rows.append({'input': kind, 'batch': batch, 'size': list(size), 'max_rel_error': err,
                             'ok': err <= rtol and out.shape == ref.shape})
    worst = max(rows, key=lambda r: r['max_rel_error'])
    return {'ok': all(r['ok'] for r in rows), 'rows': rows, 'worst': worst, 'rtol': rtol,
            'spatial_dynamic': spatial_dynamic}


if __name__ == '__main__':  # pragma: no cover
    sys.exit('use: dpp-surgery export')
