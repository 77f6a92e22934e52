"""ONNX export of converted models, verified in onnxruntime.

``export_onnx(model, path, mode=...)`` writes one self-contained file (weights inside) with dynamic batch and
spatial sizes, in one of two modes:

* ``'decomposed'``: every DPP layer is standard ONNX operators: the windows are strided ``Slice`` ops (no gather
  per element), and the weighting is element-wise ``Sub``/``Mul``/``Log``/``Exp``/``ReduceSum``. It runs on
  onnxruntime and any other runtime.
* ``'custom'``: every DPP layer is one node ``DPP2d`` in the domain ``dpp_surgery`` (schema:
  :func:`register_onnx_schema`), with its geometry and variant as attributes (``kernel_shape``, ``strides``,
  ``pads``, ``auto_pad``, ``ceil_mode``, ``reward``, ``norm``, ``eps``) and ``theta_alpha``, ``theta_lambda`` (and
  the Full guide's ``guide_weight``) as inputs. The file also carries each configuration's decomposition as a
  model-local ONNX function (an overload of ``dpp_surgery.DPP2d``, IR version 10), so any onnxruntime runs it with no
  extra library; :func:`onnx_session` also registers the native kernel (:mod:`dpp_surgery.ort_kernel`), which
  onnxruntime then runs instead of the function.

``verify_onnx`` checks the file with ``onnx.checker`` and compares onnxruntime with PyTorch on random and real-photo
inputs at even and odd sizes, batch 1 and 8.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import traceback
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpoint import atomic_write
from ._text import first_line

__all__ = ['export_onnx', 'onnx_session', 'verify_onnx', 'register_onnx_schema', 'dpp_nodes', 'ExportError',
           'ExportWarning', 'SUPPORTED_MODES', 'SUPPORTED_OPSETS', 'DEFAULT_OPSET', 'DPP_DOMAIN', 'DPP_OP']

_logger = logging.getLogger(__name__)

SUPPORTED_MODES = ('decomposed', 'custom')
DPP_DOMAIN = 'dpp_surgery'
DPP_OP = 'DPP2d'
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


def register_onnx_schema() -> None:
    """Register the ONNX schema of ``dpp_surgery.DPP2d`` with the ``onnx`` package (once per process).

    Inputs ``X`` (N, C, H, W), ``theta_alpha`` (C,), ``theta_lambda`` (C,), optional ``guide_weight`` (C, 1, kh', kw')
    (the Full guide filter), all float32; output ``Y``. Attributes as :class:`dpp_surgery.DPP2d`: ``kernel_shape``,
    ``strides``, ``pads`` (top, left, bottom, right; symmetric), ``auto_pad`` ('NOTSET' or 'SAME' for timm's dynamic
    'same' padding), ``ceil_mode``, ``reward`` ('sym'/'asym'), ``norm`` ('mean'/'none'/'sum'), ``eps``.
    """
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(DPP_OP, DPP_DOMAIN):
        return
    attr, kind, param = OpSchema.Attribute, OpSchema.AttrType, OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        DPP_OP, DPP_DOMAIN, 1,
        doc='Detail-Preserving Pooling (Saeedan et al., CVPR 2018): a normalised weighted average over each window '
            'whose weights alpha + ((x - guide)^2 + eps)^(lambda / 2) reward deviation from a guide.',
        inputs=[param('X', 'T', 'input (N, C, H, W)'), param('theta_alpha', 'T', 'log alpha, (C,)'),
                param('theta_lambda', 'T', 'log lambda, (C,)'),
                param('guide_weight', 'T', 'Full guide filter (C, 1, kh\', kw\'); absent: Lite guide',
                      param_option=optional)],
        outputs=[param('Y', 'T', 'output (N, C, OH, OW)')],
        type_constraints=[('T', ['tensor(float)'], 'float32 tensors')],
        attributes=[attr('kernel_shape', kind.INTS, 'window size (kh, kw)'),
                    attr('strides', kind.INTS, 'window stride (sh, sw)'),
                    attr('pads', kind.INTS, 'padding (top, left, bottom, right), never part of a window', required=False),
                    attr('auto_pad', kind.STRING, "'NOTSET' or 'SAME' (timm's dynamic same padding)", required=False),
                    attr('ceil_mode', kind.INT, 'as in MaxPool', required=False),
                    attr('reward', kind.STRING, "'sym' or 'asym'", required=False),
                    attr('norm', kind.STRING, "'mean', 'none' or 'sum'", required=False),
                    attr('eps', kind.FLOAT, 'added to the squared deviation', required=False)])
    onnx.defs.register_schema(schema)


def _translation_table() -> dict:
    """torch.ops.dpp_surgery.dpp2d_onnx -> one dpp_surgery.DPP2d node (the exporter's custom_translation_table)."""
    import onnxscript

    from .layers import functional  # noqa: F401 - defines the op

    register_onnx_schema()
    opset = onnxscript.values.Opset(DPP_DOMAIN, 1)

    def dpp2d_onnx(x, theta_alpha, theta_lambda, guide_weight=None, kernel=(2, 2), stride=(2, 2), padding=(0,) * 4,
                   same=False, ceil_mode=False, asym=False, norm='mean', eps=1e-3):
        inputs = [x, theta_alpha, theta_lambda] + ([guide_weight] if guide_weight is not None else [])
        return opset.DPP2d(*inputs, kernel_shape=list(kernel), strides=list(stride), pads=list(padding),
                           auto_pad='SAME' if same else 'NOTSET', ceil_mode=int(ceil_mode),
                           reward='asym' if asym else 'sym', norm=str(norm), eps=float(eps))

    return {torch.ops.dpp_surgery.dpp2d_onnx.default: dpp2d_onnx}


def dpp_nodes(model) -> list:
    """The ``dpp_surgery.DPP2d`` nodes of an ONNX ModelProto's main graph."""
    return [n for n in model.graph.node if n.domain == DPP_DOMAIN and n.op_type == DPP_OP]


def _node_config(node) -> Dict:
    import onnx

    cfg = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    cfg = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in cfg.items()}
    cfg['full'] = len(node.input) > 3 and bool(node.input[3])
    return cfg


def _overload(cfg: Dict, channels: Optional[int]) -> str:
    """A readable name for one DPP configuration, e.g. ``k2x2_s2x2_p0x0_lite_sym_mean_eps0.001``."""
    k, s, p = cfg['kernel_shape'], cfg['strides'], cfg.get('pads', [0, 0, 0, 0])
    pad = 'same' if cfg.get('auto_pad') == 'SAME' else f'p{p[0]}x{p[1]}'
    name = (f"k{k[0]}x{k[1]}_s{s[0]}x{s[1]}_{pad}{'_ceil' if cfg.get('ceil_mode') else ''}_"
            f"{'full' if cfg['full'] else 'lite'}_{cfg.get('reward', 'sym')}_{cfg.get('norm', 'mean')}_"
            f"eps{cfg.get('eps', 1e-3):.6g}")
    return name if channels is None else f'{name}_c{channels}'


class _DPPFunction(nn.Module):
    """One DPP configuration as a module of (X, theta_alpha, theta_lambda[, guide_weight]): exported to build the
    model-local ONNX function of its DPP2d nodes."""

    def __init__(self, cfg: Dict):
        super().__init__()
        from .layers import PoolGeometry
        p = cfg.get('pads', [0, 0, 0, 0])
        self.geometry = PoolGeometry.create(tuple(cfg['kernel_shape']), tuple(cfg['strides']),
                                            'same' if cfg.get('auto_pad') == 'SAME' else (p[0], p[1]),
                                            bool(cfg.get('ceil_mode', 0)))
        self.reward, self.norm, self.eps = cfg.get('reward', 'sym'), cfg.get('norm', 'mean'), cfg.get('eps', 1e-3)

    def forward(self, X, theta_alpha, theta_lambda, guide_weight=None):  # noqa: N803 - the ONNX input names
        from .layers import dpp2d
        return dpp2d(X, theta_alpha, theta_lambda, guide_weight=guide_weight, reward=self.reward, norm=self.norm,
                     eps=self.eps, impl='torch', geometry=self.geometry)


def _dpp_function(cfg: Dict, channels: int, opset: int):
    """The decomposition of one DPP configuration as an ONNX FunctionProto (dynamic N, H, W; C too for Lite)."""
    from onnx import helper

    module = _DPPFunction(cfg).eval()
    kh, kw = cfg['kernel_shape']
    sh, sw = cfg['strides']
    lo = max(kh, kw) + 2 * max(sh, sw) + 1  # the traced graph assumes at least two windows per side
    args: Tuple = (torch.randn(2, channels, 4 * lo, 4 * lo), torch.zeros(channels), torch.zeros(channels))
    auto = torch.export.Dim.AUTO  # (named ranges make the solver reject guards it cannot prove, e.g. 2*(H//2) <= H)
    # the Full guide is a grouped convolution, whose group count ONNX keeps static: C is part of its overload
    static = torch.export.Dim.STATIC
    c = static if cfg['full'] else auto
    shapes: Tuple = ({0: auto, 1: c, 2: auto, 3: auto}, {0: c}, {0: c})
    if cfg['full']:
        kg = module.geometry.full_guide_kernel()
        args += (torch.zeros(channels, 1, *kg),)
        shapes += ({0: static},)
    program = torch.export.export(module, args, dynamic_shapes=shapes)
    graph = torch.onnx.export(program, args, dynamo=True, opset_version=opset, external_data=False, optimize=True,
                              verbose=False).model_proto.graph
    x_dims = graph.input[0].type.tensor_type.shape.dim
    if any(d.HasField('dim_value') for i, d in enumerate(x_dims) if i != 1 or not cfg['full']):
        raise ExportError(f'the decomposition of DPP2d {_overload(cfg, None)} did not stay dynamic in its input size')
    # constants folded into initializers become Constant nodes of the function body
    consts = [helper.make_node('Constant', [], [t.name], value=t) for t in graph.initializer]
    function = helper.make_function(
        DPP_DOMAIN, DPP_OP, [i.name for i in graph.input], [o.name for o in graph.output], consts + list(graph.node),
        [helper.make_opsetid('', opset)], attributes=['kernel_shape', 'strides', 'pads', 'auto_pad', 'ceil_mode',
                                                      'reward', 'norm', 'eps'],
        doc_string=f'{DPP_OP} decomposed into standard operators ({"Full" if cfg["full"] else "Lite"} guide)',
        overload=_overload(cfg, channels if cfg['full'] else None))
    _check_function(function, module, args, lo, opset)
    return function


def _check_function(function, module: nn.Module, args: Tuple, lo: int, opset: int) -> None:
    """Run the function in onnxruntime at even and odd sizes against PyTorch: torch.export may specialise a traced
    graph to properties of the example's size (a guard), which would make the function wrong at other sizes."""
    import onnxruntime as ort
    from onnx import helper

    names = list(function.input)
    node = helper.make_node(DPP_OP, names, ['Y'], domain=DPP_DOMAIN, overload=function.overload)
    inputs = [helper.make_tensor_value_info(n, 1, None) for n in names]
    graph = helper.make_graph([node], 'check', inputs, [helper.make_tensor_value_info('Y', 1, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', opset), helper.make_opsetid(DPP_DOMAIN, 1)],
                              functions=[function], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
    gen = torch.Generator().manual_seed(0)
    channels = args[1].shape[0]
    params = [torch.randn(channels, generator=gen), torch.randn(channels, generator=gen) * 0.5] + [
        torch.randn(a.shape, generator=gen) for a in args[3:]]
    for h, w in ((lo, lo + 1), (lo + 2, lo + 3), (2 * lo + 1, 3 * lo)):
        x = torch.randn(1, channels, h, w, generator=gen)
        with torch.no_grad():
            ref = module(x, *params)
        out = session.run(None, dict(zip(names, [t.numpy() for t in [x, *params]])))[0]
        err = float('inf') if out.shape != tuple(ref.shape) else float(
            (torch.from_numpy(out) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if err > DEFAULT_RTOL:
            raise ExportError(f'the decomposition of DPP2d {function.overload} is wrong at input size {h}x{w} '
                              f'(output {out.shape}, expected {tuple(ref.shape)}, error {err:.2g})')


def _attach_functions(model, opset: int) -> int:
    """Give every DPP2d node an overload naming its configuration, and add one model-local function per
    configuration (the decomposition). Returns the number of DPP2d nodes."""
    from onnx import helper

    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input):
        shapes[vi.name] = [d.dim_value if d.HasField('dim_value') else None for d in vi.type.tensor_type.shape.dim]
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    functions: Dict[str, object] = {}
    nodes = dpp_nodes(model)
    for node in nodes:
        cfg = _node_config(node)
        channels = (inits.get(node.input[1]) or shapes.get(node.input[1]) or [None])[0]
        if channels is None:
            raise ExportError(f'cannot tell the channel count of DPP2d node {node.name!r}')
        node.overload = _overload(cfg, channels if cfg['full'] else None)
        if node.overload not in functions:
            functions[node.overload] = _dpp_function(cfg, channels, opset)
    if nodes:
        model.functions.extend(functions.values())
        model.ir_version = max(model.ir_version, 10)  # function overloads
        if not any(o.domain == DPP_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DPP_DOMAIN, 1))
    return len(nodes)


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
        mode: ``'decomposed'``: DPP as standard ONNX operators; ``'custom'``: one ``dpp_surgery.DPP2d`` node per DPP
            layer, with its decomposition as a model-local function (see the module docstring). Global DPP (a
            window as large as the input) and windows of more than 64 positions stay decomposed in either mode.
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
        raise ValueError(f'unsupported export mode {mode!r}; supported modes: {", ".join(SUPPORTED_MODES)}')
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
    from .layers.functional import onnx_custom_node
    custom = mode == 'custom'
    try:
        program, error = None, None
        for dynamic_shapes in attempts:
            try:
                with onnx_custom_node() if custom else contextlib.nullcontext():
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
            first = first_line(error)
            place = f'in module {where!r}' if where else f'in {type(model).__name__}'
            raise ExportError(f'torch.export failed {place}: {type(error).__name__}: {first}') from error
        try:
            onnx_program = torch.onnx.export(program, (example_input,), dynamo=True, opset_version=opset,
                                             external_data=False, optimize=True, verbose=False,
                                             custom_translation_table=_translation_table() if custom else None)
            proto = None
            if custom:
                proto = onnx_program.model_proto
                _attach_functions(proto, opset)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001
            first = first_line(e)
            raise ExportError(f'ONNX conversion failed: {type(e).__name__}: {first}') from e
    finally:
        model.train(was_training)

    def write(tmp):
        if proto is None:
            onnx_program.save(tmp)
        else:
            onnx.save(proto, tmp)
        onnx.checker.check_model(tmp, full_check=True)

    atomic_write(path, write, overwrite)
    if verify:
        report = verify_onnx(model, path, base_size=tuple(example_input.shape[-2:]))
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
    (:mod:`dpp_surgery.ort_kernel`, built on first use). ``None`` (default): if it can be built, else run the
    decomposition carried in the file (with one OrtKernelWarning saying why); ``True``: require it (RuntimeError if
    it cannot be built); ``False``: never (the decomposition runs).
    """
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
        from .ort_kernel import ort_kernel_library, ort_kernel_status
        library = ort_kernel_library()
        if library is not None:
            opts.register_custom_ops_library(library)
        elif native:
            raise RuntimeError(f'the native onnxruntime DPP2d kernel is unavailable: {ort_kernel_status()["error"]}')
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
    (an odd size for even bases), each at every batch size. The error is ``max|ort - torch| / max|torch|``. Files
    with DPP2d nodes are checked twice: with the native kernel (if it builds) and with the ONNX functions.
    """
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
        from .ort_kernel import ort_kernel_library
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
            for kind in ('random', 'photo'):
                x = torch.randn(batch, 3, *size) if kind == 'random' else _photo_batch(batch, size, mean, std)
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
