"""DPP's ONNX translations: the ``dpp_surgery.DPP2d`` node (schema, the op that export traces, the exporter's
translation table), its decomposition carried in custom files as model-local ONNX functions, and decomposed files'
decomposition written in place of each node (:func:`inline_decompositions`; both from :mod:`.decomposition`).

While :func:`dpp_as_custom_nodes` is active, every DPP2d layer of a model whose window the native kernels take runs
as the opaque op ``torch.ops.dpp_surgery.dpp2d_onnx``, which :func:`translation_table` turns into one ``DPP2d``
node; :func:`attach_functions` then adds one decomposition per configuration. The layer itself knows nothing of ONNX.
"""
from __future__ import annotations

import contextlib
import types
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..layers import DPP2d, GlobalDPP2d, dpp2d
from .decomposition import DECOMPOSED_OPS, Emitter, emit_dpp
from .settings import DPPNodeSettings

__all__ = ['DPP_DOMAIN', 'DPP_OP', 'DECOMPOSED_OPS', 'DEFAULT_RTOL', 'ExportError', 'register_onnx_schema',
           'dpp_as_custom_nodes', 'translation_table', 'dpp_nodes', 'attach_functions', 'inline_decompositions']

DPP_DOMAIN = 'dpp_surgery'
DPP_OP = 'DPP2d'
DEFAULT_RTOL = 1e-4


class ExportError(RuntimeError):
    """The model could not be exported (the message names the module and why) or failed verification."""


@torch.library.custom_op('dpp_surgery::dpp2d_onnx', mutates_args=())
def _dpp2d_onnx_op(
        x: Tensor, theta_alpha: Tensor, theta_lambda: Tensor, guide_weight: Optional[Tensor], kernel: List[int],
        stride: List[int], padding: List[int], same: bool, ceil_mode: bool, asym: bool, norm: str, eps: float,
) -> Tensor:
    """DPP as one opaque op with the ONNX node's signature (what ``export_onnx(mode='custom')`` traces; the arguments
    after the tensors are :meth:`DPPNodeSettings.op_args`)."""
    s = DPPNodeSettings.from_op_args(kernel, stride, padding, same, ceil_mode, asym, norm, eps,
                                     full=guide_weight is not None)
    return dpp2d(x, theta_alpha, theta_lambda, guide_weight=guide_weight, reward=s.reward, norm=s.norm, eps=s.eps,
                 impl='torch', geometry=s.geometry)


@_dpp2d_onnx_op.register_fake
def _(x, theta_alpha, theta_lambda, guide_weight, kernel, stride, padding, same, ceil_mode, asym, norm, eps):
    s = DPPNodeSettings.from_op_args(kernel, stride, padding, same, ceil_mode, asym, norm, eps,
                                     full=guide_weight is not None)
    r = s.geometry.resolve(x.shape[-2], x.shape[-1])
    return x.new_empty(x.shape[0], x.shape[1], r.out_size[0], r.out_size[1])


def _as_custom_node(layer: DPP2d, x: Tensor) -> Tensor:
    """DPP2d's forward as the one op that becomes a ``DPP2d`` node."""
    return torch.ops.dpp_surgery.dpp2d_onnx(x, layer.theta_alpha, layer.theta_lambda, layer.guide_weight,
                                            *DPPNodeSettings.from_layer(layer).op_args())


def _custom_node_wanted(layer: DPP2d, max_window: int) -> bool:
    # only for windows the native kernels take, with a static geometry (global DPP's window is the input size)
    if isinstance(layer, GlobalDPP2d):  # its window is the whole map: no fixed-window node can hold it
        return False
    g = layer.geometry
    static = all(type(v) is int for v in (*g.kernel, *g.stride))
    return static and g.kernel[0] * g.kernel[1] <= max_window


@contextlib.contextmanager
def dpp_as_custom_nodes(model: nn.Module, max_window: int) -> Iterator[int]:
    """Inside this context, every DPP2d layer of ``model`` with a static window of at most ``max_window`` positions
    runs as one ``dpp_surgery::dpp2d_onnx`` op (one ONNX ``DPP2d`` node once exported); yields how many layers do.
    Global DPP (a window as large as the input) and larger windows keep their decomposition."""
    patched = [m for m in model.modules() if isinstance(m, DPP2d) and _custom_node_wanted(m, max_window)]
    for layer in patched:
        # an instance attribute shadows the class's: DPP2d.forward (and S3DPP2d's DPP step) call it
        layer.compute = types.MethodType(_as_custom_node, layer)
    try:
        yield len(patched)
    finally:
        for layer in patched:
            del layer.compute


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


def translation_table() -> dict:
    """torch.ops.dpp_surgery.dpp2d_onnx -> one dpp_surgery.DPP2d node (the exporter's custom_translation_table)."""
    import onnxscript

    register_onnx_schema()
    opset = onnxscript.values.Opset(DPP_DOMAIN, 1)

    # (the exporter matches the arguments by name: the op's signature, spelled out)
    def dpp2d_onnx(x, theta_alpha, theta_lambda, guide_weight, kernel, stride, padding, same, ceil_mode, asym, norm,
                   eps):
        full = guide_weight is not None
        settings = DPPNodeSettings.from_op_args(kernel, stride, padding, same, ceil_mode, asym, norm, eps, full)
        inputs = [x, theta_alpha, theta_lambda] + ([guide_weight] if full else [])
        return opset.DPP2d(*inputs, **settings.attributes())

    return {torch.ops.dpp_surgery.dpp2d_onnx.default: dpp2d_onnx}


def dpp_nodes(model) -> list:
    """The ``dpp_surgery.DPP2d`` nodes of an ONNX ModelProto's main graph."""
    return [n for n in model.graph.node if n.domain == DPP_DOMAIN and n.op_type == DPP_OP]


class _DPPFunction(nn.Module):
    """One DPP configuration as a module of (X, theta_alpha, theta_lambda[, guide_weight]): the PyTorch reference its
    ONNX decomposition is checked against."""

    def __init__(self, settings: DPPNodeSettings):
        super().__init__()
        self.settings = settings

    def forward(self, X, theta_alpha, theta_lambda, guide_weight=None):  # noqa: N803 - the ONNX input names
        s = self.settings
        return dpp2d(X, theta_alpha, theta_lambda, guide_weight=guide_weight, reward=s.reward, norm=s.norm, eps=s.eps,
                     impl='torch', geometry=s.geometry)


_FUNCTION_INPUTS = ('X', 'theta_alpha', 'theta_lambda', 'guide_weight')


def _dpp_function(settings: DPPNodeSettings, channels: int, opset: int):
    """The decomposition of one DPP configuration as an ONNX FunctionProto (dynamic N, H, W; C too for Lite),
    checked in onnxruntime against PyTorch."""
    from onnx import helper

    full = settings.full
    names = list(_FUNCTION_INPUTS[:4 if full else 3])
    em = Emitter('', as_function=True)
    emit_dpp(em, 'X', 'theta_alpha', 'theta_lambda', 'guide_weight' if full else None, settings, channels, output='Y')
    function = helper.make_function(
        DPP_DOMAIN, DPP_OP, names, ['Y'], em.nodes, [helper.make_opsetid('', opset)],
        attributes=list(settings.attributes()),
        doc_string=f'{DPP_OP} decomposed into standard operators ({"Full" if full else "Lite"} guide)',
        overload=settings.overload(channels if full else None))
    _check_function(function, settings, channels, opset)
    return function


def _check_function(function, settings: DPPNodeSettings, channels: int, opset: int) -> None:
    """Run the function in onnxruntime at even and odd sizes against PyTorch (ExportError if they differ)."""
    import onnxruntime as ort
    from onnx import helper

    module = _DPPFunction(settings).eval()
    (kh, kw), (sh, sw) = settings.geometry.kernel, settings.geometry.stride
    lo = max(kh, kw) + 2 * max(sh, sw) + 1  # at least two windows per side

    names = list(function.input)
    node = helper.make_node(DPP_OP, names, ['Y'], domain=DPP_DOMAIN, overload=function.overload)
    inputs = [helper.make_tensor_value_info(n, 1, None) for n in names]
    graph = helper.make_graph([node], 'check', inputs, [helper.make_tensor_value_info('Y', 1, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', opset), helper.make_opsetid(DPP_DOMAIN, 1)],
                              functions=[function], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(channels, generator=gen), torch.randn(channels, generator=gen) * 0.5]
    if settings.full:
        params.append(torch.randn(channels, 1, *settings.geometry.full_guide_kernel(), generator=gen))
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


def attach_functions(model, opset: int) -> int:
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
        settings = DPPNodeSettings.from_node(node)
        channels = (inits.get(node.input[1]) or shapes.get(node.input[1]) or [None])[0]
        if channels is None:
            raise ExportError(f'cannot tell the channel count of DPP2d node {node.name!r}')
        node.overload = settings.overload(channels if settings.full else None)
        if node.overload not in functions:
            functions[node.overload] = _dpp_function(settings, channels, opset)
    if nodes:
        model.functions.extend(functions.values())
        model.ir_version = max(model.ir_version, 10)  # function overloads
        if not any(o.domain == DPP_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DPP_DOMAIN, 1))
    return len(nodes)


def _static_size(model, name: str) -> Optional[Tuple[int, int]]:
    """The fixed (H, W) of the (N, C, H, W) tensor ``name`` in ``model``'s graph, or None where either is dynamic."""
    for vi in list(model.graph.value_info) + list(model.graph.input):
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) == 4 and all(d.HasField('dim_value') for d in dims[2:]):
                return int(dims[2].dim_value), int(dims[3].dim_value)
            return None
    return None


def inline_decompositions(model) -> int:
    """Replace every DPP2d node of ``model`` (a ModelProto, changed in place) by its decomposition in standard
    operators (:mod:`.decomposition`): the parameters' transforms folded into constants, fixed sizes where the graph
    knows them. Removes the then unused parameter initializers and the ``dpp_surgery`` opset. Returns the number of
    nodes replaced."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    replaced = 0
    nodes = []
    extra = []
    for node in model.graph.node:
        if not (node.domain == DPP_DOMAIN and node.op_type == DPP_OP):
            nodes.append(node)
            continue
        settings = DPPNodeSettings.from_node(node)
        x, ta, tl = node.input[:3]
        gw = node.input[3] if settings.full else None
        channels = list(inits[ta].dims)[0] if ta in inits else None
        if settings.full and channels is None:
            raise ExportError(f'cannot tell the channel count of DPP2d node {node.name!r}')
        params = (numpy_helper.to_array(inits[ta]), numpy_helper.to_array(inits[tl])) if (
            ta in inits and tl in inits) else None
        em = Emitter(f'{node.name or f"dpp{replaced}"}/', as_function=False)
        emit_dpp(em, x, ta, tl, gw, settings, channels, size=_static_size(model, x), params=params,
                 output=node.output[0])
        nodes.extend(em.nodes)
        extra.extend(em.initializers)
        replaced += 1
    if not replaced:
        return 0
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(extra)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    kept_opsets = [o for o in model.opset_import if o.domain != DPP_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept_opsets)
    return replaced
