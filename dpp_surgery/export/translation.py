"""DPP's ONNX translations: the ``dpp_surgery.DPP2d`` node (schema, the op that export traces, the exporter's
translation table) and its decomposition carried in the file as model-local ONNX functions.

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

from ..layers import DPP2d, PoolGeometry, dpp2d

__all__ = ['DPP_DOMAIN', 'DPP_OP', 'DECOMPOSED_OPS', 'DEFAULT_RTOL', 'ExportError', 'register_onnx_schema',
           'dpp_as_custom_nodes', 'translation_table', 'dpp_nodes', 'attach_functions']

DPP_DOMAIN = 'dpp_surgery'
DPP_OP = 'DPP2d'
# Every ONNX operator (default domain) that DPP's decomposition uses, over every variant, norm and geometry, with
# dynamic or fixed sizes (tests/test_export.py keeps this list exact): what a runtime must support to run a
# decomposed file, beyond the model's own operators.
DECOMPOSED_OPS = frozenset({
    'Add', 'AveragePool', 'Cast', 'Clip', 'Concat', 'Conv', 'Div', 'Exp', 'Expand', 'Greater', 'Log', 'MaxPool',
    'Mul', 'Neg', 'Pad', 'Pow', 'Reciprocal', 'ReduceMax', 'ReduceSum', 'Reshape', 'Resize', 'Shape', 'Slice',
    'Squeeze', 'Sub', 'Unsqueeze', 'Where'})
DEFAULT_RTOL = 1e-4


class ExportError(RuntimeError):
    """The model could not be exported (the message names the module and why) or failed verification."""


def _geometry_from(kernel: List[int], stride: List[int], padding: List[int], same: bool,
                   ceil_mode: bool) -> PoolGeometry:
    return PoolGeometry.create(tuple(kernel), tuple(stride), 'same' if same else tuple(padding[:2]), ceil_mode)


@torch.library.custom_op('dpp_surgery::dpp2d_onnx', mutates_args=())
def _dpp2d_onnx_op(
        x: Tensor, theta_alpha: Tensor, theta_lambda: Tensor, guide_weight: Optional[Tensor], kernel: List[int],
        stride: List[int], padding: List[int], same: bool, ceil_mode: bool, asym: bool, norm: str, eps: float,
) -> Tensor:
    """DPP as one opaque op with the ONNX node's signature (what ``export_onnx(mode='custom')`` traces)."""
    return dpp2d(x, theta_alpha, theta_lambda, guide_weight=guide_weight, reward='asym' if asym else 'sym', norm=norm,
                 eps=eps, impl='torch', geometry=_geometry_from(kernel, stride, padding, same, ceil_mode))


@_dpp2d_onnx_op.register_fake
def _(x, theta_alpha, theta_lambda, guide_weight, kernel, stride, padding, same, ceil_mode, asym, norm, eps):
    r = _geometry_from(kernel, stride, padding, same, ceil_mode).resolve(x.shape[-2], x.shape[-1])
    return x.new_empty(x.shape[0], x.shape[1], r.out_size[0], r.out_size[1])


def _as_custom_node(layer: DPP2d, x: Tensor) -> Tensor:
    """DPP2d's forward as the one op that becomes a ``DPP2d`` node."""
    g = layer.geometry
    pad = (0, 0) if g.is_same else g.padding
    return torch.ops.dpp_surgery.dpp2d_onnx(
        x, layer.theta_alpha, layer.theta_lambda, layer.guide_weight, list(g.kernel), list(g.stride),
        [pad[0], pad[1], pad[0], pad[1]], g.is_same, g.ceil_mode, layer.reward == 'asym', layer.norm,
        float(layer.eps))


def _custom_node_wanted(layer: DPP2d, max_window: int) -> bool:
    # only for windows the native kernels take, with a static geometry (global DPP's window is the input size)
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
        layer.forward = types.MethodType(_as_custom_node, layer)  # an instance attribute shadows DPP2d.forward
    try:
        yield len(patched)
    finally:
        for layer in patched:
            del layer.forward


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
        p = cfg.get('pads', [0, 0, 0, 0])
        self.geometry = PoolGeometry.create(tuple(cfg['kernel_shape']), tuple(cfg['strides']),
                                            'same' if cfg.get('auto_pad') == 'SAME' else (p[0], p[1]),
                                            bool(cfg.get('ceil_mode', 0)))
        self.reward, self.norm, self.eps = cfg.get('reward', 'sym'), cfg.get('norm', 'mean'), cfg.get('eps', 1e-3)

    def forward(self, X, theta_alpha, theta_lambda, guide_weight=None):  # noqa: N803 - the ONNX input names
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
