"""The written ONNX decomposition of DPP2d (dpp_surgery.export.decomposition) against the PyTorch path, in
onnxruntime: every variant, norm and geometry, with fixed and dynamic sizes, with the parameters folded into
constants (decomposed files) or taken as inputs (function bodies); the decomposed layers also in OpenVINO and tract."""
import dataclasses
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from dpp_surgery.export import OTHER_RUNTIMES
from dpp_surgery.export.decomposition import DECOMPOSED_OPS, FUNCTION_OPS, Emitter, emit_dpp
from dpp_surgery.export.settings import DPPNodeSettings
from dpp_surgery.layers import PoolGeometry, dpp2d

C = 3
GEOMETRIES = [(2, 2, 0, False), (2, 2, 1, True), (2, 2, 'same', False), (3, 2, 1, False), ((3, 2), (2, 1), 0, True),
              (3, 2, 'same', False), (1, 2, 0, False), ((2, 3), (2, 3), 1, True), (3, 3, 1, True), (2, 2, 0, True)]
VARIANTS = list(itertools.product(('lite', 'full'), ('sym', 'asym'), ('mean', 'none', 'sum')))
MODES = ('fixed', 'dynamic', 'function')
SIZES = ((16, 16), (17, 13), (9, 11))


def _cfg(geometry, guide='lite', reward='sym', norm='mean'):
    k, s, p, c = geometry
    return DPPNodeSettings(PoolGeometry.create(k, s, p, c), full=guide == 'full', reward=reward, norm=norm)


def _model(cfg, mode, ta, tl, gw, size):
    """A one-layer ONNX model of the decomposition; returns it and the count of its non-constant nodes."""
    em = Emitter('dpp/', as_function=mode == 'function')
    inputs = [helper.make_tensor_value_info('X', 1, [None, C, *(size if mode == 'fixed' else (None, None))])]
    inits = []
    if mode == 'function':
        inputs += [helper.make_tensor_value_info(n, 1, [C]) for n in ('ta', 'tl')]
    if gw is not None:
        inits.append(numpy_helper.from_array(gw.numpy(), 'gw'))
    emit_dpp(em, 'X', 'ta', 'tl', 'gw' if gw is not None else None, cfg, C, size=size if mode == 'fixed' else None,
             params=None if mode == 'function' else (ta.numpy(), tl.numpy()), output='Y')
    graph = helper.make_graph(em.nodes, 'dpp', inputs, [helper.make_tensor_value_info('Y', 1, [None, C, None, None])],
                              initializer=inits + em.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model, sum(1 for n in em.nodes if n.op_type != 'Constant')


def _check(geometry, guide, reward, norm, mode, lam_scale=0.5, x_scale=3.0, sizes=SIZES, runtime='onnxruntime',
           folder=None, other_runtime=None):
    """The one-layer model against PyTorch in ``runtime`` (another than onnxruntime: saved to ``folder`` and run by
    the ``other_runtime`` fixture); returns the node count per size."""
    cfg = _cfg(geometry, guide, reward, norm)
    g = cfg.geometry
    gen = torch.Generator().manual_seed(0)
    ta = torch.randn(C, generator=gen)
    tl = torch.randn(C, generator=gen) * lam_scale if lam_scale < 10 else torch.full((C,), float(lam_scale)).log()
    gw = torch.randn(C, 1, *g.full_guide_kernel(), generator=gen) if guide == 'full' else None
    counts = {}
    for size in sizes:
        model, counts[size] = _model(cfg, mode, ta, tl, gw, size)
        x = torch.randn(2, C, *size, generator=gen) * x_scale
        if runtime == 'onnxruntime':
            session = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
            feed = {'X': x.numpy()}
            if mode == 'function':
                feed.update(ta=ta.numpy(), tl=tl.numpy())
            out = session.run(None, feed)[0]
        else:
            path = str(folder / f'layer_{size[0]}x{size[1]}.onnx')
            onnx.save(model, path)
            out = other_runtime(path, runtime, x.numpy())[0]
        with torch.no_grad():
            ref = dpp2d(x, ta, tl, guide_weight=gw, reward=reward, norm=norm, impl='torch', geometry=g).numpy()
        assert out.shape == ref.shape, (cfg, mode, size)
        assert np.isfinite(out).all(), (cfg, mode, size)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=f'{cfg} {mode} {size}')
        ops = {n.op_type for n in model.graph.node} - {'Constant'}
        assert ops <= (FUNCTION_OPS if mode == 'function' else DECOMPOSED_OPS), sorted(ops)
    return counts


@pytest.mark.parametrize('geometry', GEOMETRIES)
@pytest.mark.parametrize('guide,reward,norm', [('lite', 'sym', 'mean'), ('full', 'asym', 'sum')])
def test_node_settings_round_trip(geometry, guide, reward, norm):
    """A layer's settings reach the node and come back unchanged: layer -> op arguments -> node attributes -> node."""
    import inspect

    from dpp_surgery.layers import DPP2d
    k, s, p, c = geometry
    layer = DPP2d(C, kernel_size=k, stride=s, padding=p, ceil_mode=c, guide=guide, reward=reward, norm=norm, eps=1e-2)
    settings = DPPNodeSettings.from_layer(layer)
    assert (settings.geometry, settings.full, settings.reward, settings.norm, settings.eps) == (
        layer.geometry, guide == 'full', reward, norm, 1e-2)
    assert DPPNodeSettings.from_op_args(*settings.op_args(), full=settings.full) == settings
    assert all(type(v) in (list, bool, str, float) for v in settings.op_args())
    inputs = ['X', 'ta', 'tl'] + (['gw'] if settings.full else [])
    node = helper.make_node('DPP2d', inputs, ['Y'], domain='dpp_surgery', **settings.attributes())
    # (ONNX stores eps as float32)
    assert DPPNodeSettings.from_node(node) == dataclasses.replace(settings, eps=float(np.float32(settings.eps)))
    # a node without its optional attributes reads as the layer's defaults
    bare = helper.make_node('DPP2d', ['X', 'ta', 'tl'], ['Y'], domain='dpp_surgery',
                            kernel_shape=list(layer.geometry.kernel), strides=list(layer.geometry.stride))
    defaults = {n: p.default for n, p in inspect.signature(DPP2d).parameters.items()}
    read = DPPNodeSettings.from_node(bare)
    assert (read.reward, read.norm, read.eps, read.full) == (
        defaults['reward'], defaults['norm'], defaults['eps'], False)
    assert read.geometry.padding == (0, 0) and not read.geometry.ceil_mode
    assert settings.overload(C if settings.full else None).startswith(f'k{layer.geometry.kernel[0]}x')


# a covering set by default (every variant, norm, mode and geometry at least once); the full product is slow
_COVER = [(GEOMETRIES[i % len(GEOMETRIES)], *VARIANTS[i % len(VARIANTS)], MODES[i % len(MODES)]) for i in range(30)]


@pytest.mark.parametrize('geometry,guide,reward,norm,mode', _COVER)
def test_decomposition_matches_pytorch(geometry, guide, reward, norm, mode):
    _check(geometry, guide, reward, norm, mode)


@pytest.mark.slow
@pytest.mark.parametrize('geometry', GEOMETRIES)
@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('mode', MODES)
def test_decomposition_matches_pytorch_everywhere(geometry, variant, mode):
    _check(geometry, *variant, mode)


# decomposed layers (parameters folded, fixed or dynamic sizes) in OpenVINO and tract: every geometry, variant and
# norm at least once per runtime (test_export runs a whole file of every variant in them too)
_OTHER_COVER = [(GEOMETRIES[i % len(GEOMETRIES)], *VARIANTS[i % len(VARIANTS)], ('fixed', 'dynamic')[i % 2])
                for i in range(12)]


@pytest.mark.parametrize('runtime', OTHER_RUNTIMES)
@pytest.mark.parametrize('geometry,guide,reward,norm,mode', _OTHER_COVER)
def test_decomposition_matches_pytorch_in_other_runtimes(geometry, guide, reward, norm, mode, runtime, tmp_path,
                                                         other_runtime):
    _check(geometry, guide, reward, norm, mode, runtime=runtime, folder=tmp_path, other_runtime=other_runtime)


@pytest.mark.slow
@pytest.mark.parametrize('runtime', OTHER_RUNTIMES)
@pytest.mark.parametrize('geometry', GEOMETRIES)
@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('mode', ['fixed', 'dynamic'])
def test_decomposition_matches_pytorch_in_other_runtimes_everywhere(geometry, variant, mode, runtime, tmp_path,
                                                                    other_runtime):
    _check(geometry, *variant, mode, runtime=runtime, folder=tmp_path, other_runtime=other_runtime)


@pytest.mark.parametrize('mode', ['fixed', 'dynamic'])
@pytest.mark.parametrize('lam', [60.0, 400.0, 5000.0])
def test_large_lambda_stays_finite(mode, lam):
    """Large lambda: the lean form (window-sum normaliser) gives way to the max-shift form before any weight could
    leave the normal float32 range; the output stays finite and equal to PyTorch's."""
    for geometry in ((2, 2, 0, False), (3, 2, 1, False)):
        _check(geometry, 'lite', 'sym', 'mean', mode, lam_scale=lam, x_scale=50.0, sizes=((16, 16), (9, 11)))


def test_lean_tiling_layer_is_short():
    """A 2x2 tiling layer (what convert makes of strided convolutions): 20 nodes without padding, with dynamic or
    fixed sizes (the one-hot convolution drops what floor mode leaves out: no shape arithmetic); ceil_mode, 'same'
    and padding 1 (edge padding instead of a mask) at most 25; the Full guide adds four (its convolution, and the Sub
    and Add that make a window whose guide reads a non-finite value NaN), the asym reward one."""
    lite = _check((2, 2, 0, False), 'lite', 'sym', 'mean', 'dynamic', sizes=((16, 16), (17, 13)))[(16, 16)]
    fixed = _check((2, 2, 0, False), 'lite', 'sym', 'mean', 'fixed', sizes=((16, 16),))[(16, 16)]
    full = _check((2, 2, 0, False), 'full', 'asym', 'mean', 'dynamic', sizes=((16, 16), (17, 13)))[(16, 16)]
    assert lite <= 20 and fixed <= 20 and full <= lite + 5, (lite, fixed, full)
    for geometry in ((2, 2, 0, True), (2, 2, 'same', False), (2, 2, 1, False), (2, 2, 1, True)):
        for reward in ('sym', 'asym'):
            n = _check(geometry, 'lite', reward, 'mean', 'dynamic', sizes=((16, 16), (17, 13)))[(16, 16)]
            assert n <= 25, (geometry, reward, n)


def test_function_and_folded_forms_agree_on_extremes():
    """Inputs far apart in scale (the max-shift and the lean normaliser both keep weights finite)."""
    for mode in MODES:
        _check((2, 2, 0, False), 'lite', 'sym', 'mean', mode, x_scale=1e4, sizes=((8, 8),))
        _check((3, 2, 1, False), 'lite', 'asym', 'none', mode, x_scale=1e-3, sizes=((9, 9),))
