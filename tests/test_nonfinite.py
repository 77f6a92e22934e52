"""Non-finite and empty activations (issue 33), the same contract in every CPU implementation of DPP2d.

A NaN, +inf or -inf input value makes NaN (never an infinity) every output whose computation reads it: the outputs whose window holds
it and, with the Full guide, those whose guide filter (kg x kg positions at the window's stride, starting kg - k
before the window) reaches it. Every other output is bit-identical to the output of the same input without it. In
the backward pass, the input gradient of every position that a non-finite output reads is non-finite and every other
one bit-identical; the theta (and guide-weight) gradients of the channel that holds a non-finite output become NaN,
those of the other channels stay bit-identical. Empty batches (N = 0) and C = 0 give empty outputs and zero-size
(or zero) gradients. The expected sets below come from a loop over the windows, not from any implementation.
"""
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from dpp_surgery.layers import PoolGeometry, dpp2d
from dpp_surgery.layers import functional

from conftest import kernel_available

N, C, H, W = 2, 3, 9, 9  # odd: with 2x2 windows the last row and column are read by no window (floor mode)
BAD = (1, 2)  # the (sample, channel) that gets the non-finite value
GEOMETRIES = {'2x2s2': (2, 2, 0), '3x3s2p1': (3, 2, 1)}  # kernel, stride, padding
POSITIONS = {'interior': (4, 5), 'border': (0, 8), 'corner': (8, 8)}
VALUES = {'nan': math.nan, '+inf': math.inf, '-inf': -math.inf}
VARIANTS = [(guide, reward) for guide in ('lite', 'full') for reward in ('sym', 'asym')]

needs_kernel = pytest.mark.skipif(not kernel_available(), reason='the fused CPU kernel is not built')


def _guide_kernel(k: int) -> int:
    return k + 1 if k % 2 == 0 else k


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _reads(geometry, full: bool, o: int) -> range:
    """The input rows (or columns) that output row o reads: its window and, with the Full guide, its guide filter."""
    k, s, p = geometry
    start = o * s - p
    return range(start - (_guide_kernel(k) - k if full else 0), start + k)


def _expected_outputs(geometry, full: bool, pos, c: int = C) -> np.ndarray:
    """(N, c, OH, OW) mask of the outputs that read input position ``pos`` of (sample, channel) BAD."""
    k, s, p = geometry
    oh, ow = _out_size(H, k, s, p), _out_size(W, k, s, p)
    mask = np.zeros((N, c, oh, ow), dtype=bool)
    for i in range(oh):
        for j in range(ow):
            mask[BAD[0], BAD[1], i, j] = pos[0] in _reads(geometry, full, i) and pos[1] in _reads(geometry, full, j)
    return mask


def _expected_grads(geometry, full: bool, outputs: np.ndarray) -> np.ndarray:
    """(N, C, H, W) mask of the input positions that some output of the mask ``outputs`` reads."""
    mask = np.zeros((N, C, H, W), dtype=bool)
    for n, c, i, j in zip(*np.nonzero(outputs)):
        for r in _reads(geometry, full, i):
            for q in _reads(geometry, full, j):
                if 0 <= r < H and 0 <= q < W:
                    mask[n, c, r, q] = True
    return mask


def _params(guide: str, geometry, dtype=torch.float32, c: int = C):
    gen = torch.Generator().manual_seed(1)
    ta = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    tl = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    kg = _guide_kernel(geometry[0])
    # filters with negative taps: a non-finite value can then turn the guide into an infinity of either sign
    gw = torch.randn(c, 1, kg, kg, generator=gen, dtype=torch.float64).to(dtype) if guide == 'full' else None
    return ta, tl, gw


def _clean(dtype=torch.float32, n=N, c=C):
    return torch.randn(n, c, H, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype) * 2


def _with(x: torch.Tensor, pos, value: float) -> torch.Tensor:
    x = x.clone()
    x[BAD[0], BAD[1], pos[0], pos[1]] = value
    return x


def _cases():
    for pname, pos in POSITIONS.items():
        for vname, value in VALUES.items():
            yield f'{vname} at {pname} {pos}', pos, value


def _assert_contract(out: np.ndarray, clean: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert np.isfinite(clean).all(), what
    assert out.shape == clean.shape == expected.shape, (what, out.shape, clean.shape, expected.shape)
    bad = ~np.isfinite(out)
    assert np.array_equal(bad, expected), (
        f'{what}: non-finite at {np.argwhere(bad).tolist()}, expected at {np.argwhere(expected).tolist()}')
    assert np.isnan(out[bad]).all(), f'{what}: non-finite outputs other than NaN: {out[bad].tolist()}'
    assert np.array_equal(out[~expected], clean[~expected]), (
        f'{what}: outputs that do not read the value changed: {np.argwhere((out != clean) & ~expected).tolist()}')


# ---- PyTorch: the fused CPU kernel and the PyTorch path, forward and backward ---------------------------------------

TORCH_IMPLS = [pytest.param('kernel', torch.float32, marks=needs_kernel, id='kernel-f32'),
               pytest.param('kernel', torch.float64, marks=needs_kernel, id='kernel-f64'),
               pytest.param('torch', torch.float32, id='torch-f32'),
               pytest.param('torch', torch.float64, id='torch-f64')]


def _run_torch(impl, x, geometry, guide, reward, params, grad_out=None, channels_last=False):
    k, s, p = geometry
    ta, tl, gw = (None if t is None else t.clone().requires_grad_(grad_out is not None) for t in params)
    x = x.clone().requires_grad_(grad_out is not None)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    if impl == 'pooled':  # the PyTorch path's pooling form (torch.export, ONNX tracing, torch.compile): tiling windows
        g = PoolGeometry.create(k, s, p, False)
        r = g.resolve(H, W)
        xo, guide_t, alpha, lam = functional._operands(xin, ta, tl, gw, g, r)
        out = functional._pooled(xo, guide_t, alpha, lam, r, reward == 'asym', 'mean', functional.DEFAULT_EPS)
    else:
        out = dpp2d(xin, ta, tl, kernel_size=k, stride=s, padding=p, guide_weight=gw, reward=reward, impl=impl)
    if grad_out is None:
        return out.detach().numpy()
    out.backward(grad_out)
    grads = [x.grad, ta.grad, tl.grad] + ([gw.grad] if gw is not None else [])
    return out.detach().numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize('impl,dtype', TORCH_IMPLS + [pytest.param('pooled', torch.float32, id='pooled-f32')])
@pytest.mark.parametrize('geometry', list(GEOMETRIES), ids=list(GEOMETRIES))
@pytest.mark.parametrize('guide,reward', VARIANTS)
def test_forward_and_backward(impl, dtype, geometry, guide, reward):
    geometry = GEOMETRIES[geometry]
    if impl == 'pooled' and geometry[0] != geometry[1]:
        pytest.skip('the pooling form is for windows that tile the input')
    params = _params(guide, geometry, dtype)
    full = guide == 'full'
    x0 = _clean(dtype)
    oh, ow = (_out_size(H, *geometry), _out_size(W, *geometry))
    grad_out = torch.randn(N, C, oh, ow, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    clean, clean_grads = _run_torch(impl, x0, geometry, guide, reward, params, grad_out)
    assert all(np.isfinite(g).all() for g in clean_grads)
    for what, pos, value in _cases():
        expected = _expected_outputs(geometry, full, pos)
        out, grads = _run_torch(impl, _with(x0, pos, value), geometry, guide, reward, params, grad_out)
        _assert_contract(out, clean, expected, what)
        # input gradient: non-finite exactly where a non-finite output reads
        reach = _expected_grads(geometry, full, expected)
        gx, gx0 = grads[0], clean_grads[0]
        assert np.array_equal(~np.isfinite(gx), reach), (
            f'{what}: input gradient non-finite at {np.argwhere(~np.isfinite(gx)).tolist()}, expected at '
            f'{np.argwhere(reach).tolist()}')
        assert np.array_equal(gx[~reach], gx0[~reach]), f'{what}: input gradients that read no NaN changed'
        # theta (and guide weight) gradients: NaN for the channel with a non-finite output, others unchanged
        hit = expected.any()
        others = [c for c in range(C) if c != BAD[1] or not hit]
        for name, g, g0 in zip(('theta_alpha', 'theta_lambda', 'guide_weight'), grads[1:], clean_grads[1:]):
            assert np.array_equal(g[others], g0[others]), f'{what}: {name} gradient of other channels changed'
            if hit:
                assert not np.isfinite(g[BAD[1]]).all(), f'{what}: {name} gradient of the channel stayed finite'


@needs_kernel
@pytest.mark.parametrize('guide,reward', VARIANTS)
def test_kernel_channels_last(guide, reward):
    """The kernel's NHWC path (channels_last inputs with at least 16 channels), forward only: lanes are channels."""
    geometry, c = GEOMETRIES['3x3s2p1'], 16
    params = _params(guide, geometry, c=c)
    x0 = _clean(c=c)
    clean = _run_torch('kernel', x0, geometry, guide, reward, params, channels_last=True)
    for what, pos, value in _cases():
        out = _run_torch('kernel', _with(x0, pos, value), geometry, guide, reward, params, channels_last=True)
        _assert_contract(out, clean, _expected_outputs(geometry, guide == 'full', pos, c), what)


EMPTY_SHAPES = [(0, C, H, W), (N, 0, H, W), (0, 0, H, W)]


@pytest.mark.parametrize('impl,dtype', TORCH_IMPLS)
@pytest.mark.parametrize('shape', EMPTY_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('guide', ['lite', 'full'])
def test_empty(impl, dtype, shape, guide):
    for geometry in GEOMETRIES.values():
        c = shape[1]
        ta, tl = (torch.zeros(c, dtype=dtype, requires_grad=True) for _ in range(2))
        kg = _guide_kernel(geometry[0])
        gw = torch.ones(c, 1, kg, kg, dtype=dtype, requires_grad=True) if guide == 'full' else None
        x = torch.zeros(shape, dtype=dtype, requires_grad=True)
        k, s, p = geometry
        out = dpp2d(x, ta, tl, kernel_size=k, stride=s, padding=p, guide_weight=gw, impl=impl)
        assert out.shape == (shape[0], c, _out_size(H, *geometry), _out_size(W, *geometry))
        out.sum().backward()
        assert x.grad.shape == x.shape
        for t in (ta, tl) + ((gw,) if gw is not None else ()):
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


# ---- onnxruntime: the decomposition, the custom file's function fallback and its native kernel ---------------------

def _cfg(geometry, guide, reward):
    from dpp_surgery.export.settings import DPPNodeSettings
    k, s, p = geometry
    return DPPNodeSettings(PoolGeometry.create(k, s, p), full=guide == 'full', reward=reward)


def _decomposed_model(cfg, params):
    from dpp_surgery.export.decomposition import Emitter, emit_dpp
    ta, tl, gw = params
    em = Emitter('dpp/', as_function=False)
    inits = [] if gw is None else [numpy_helper.from_array(gw.numpy(), 'gw')]
    emit_dpp(em, 'X', 'ta', 'tl', 'gw' if gw is not None else None, cfg, C, params=(ta.numpy(), tl.numpy()),
             output='Y')
    graph = helper.make_graph(em.nodes, 'dpp', [helper.make_tensor_value_info('X', 1, [None, C, None, None])],
                              [helper.make_tensor_value_info('Y', 1, [None, C, None, None])],
                              initializer=inits + em.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)], ir_version=10)


def _custom_model(cfg, params):
    """One dpp_surgery.DPP2d node with its decomposition as a model-local function, as export_onnx(mode='custom')
    writes it (parameters as initializers)."""
    from dpp_surgery.export.translation import DPP_DOMAIN, DPP_OP, _dpp_function
    function = _dpp_function(cfg, C, 18)
    ta, tl, gw = params
    inits = [numpy_helper.from_array(ta.numpy(), 'theta_alpha'), numpy_helper.from_array(tl.numpy(), 'theta_lambda')]
    inputs = ['X', 'theta_alpha', 'theta_lambda']
    if gw is not None:
        inits.append(numpy_helper.from_array(gw.numpy(), 'guide_weight'))
        inputs.append('guide_weight')
    node = helper.make_node(DPP_OP, inputs, ['Y'], domain=DPP_DOMAIN, overload=function.overload, **cfg.attributes())
    graph = helper.make_graph([node], 'dpp', [helper.make_tensor_value_info('X', 1, [None, C, None, None])],
                              [helper.make_tensor_value_info('Y', 1, [None, C, None, None])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18), helper.make_opsetid(DPP_DOMAIN, 1)],
                             functions=[function], ir_version=10)


def _session(kind, geometry, guide, reward, folder):
    import dpp_surgery
    params = _params(guide, geometry)
    cfg = _cfg(geometry, guide, reward)
    model = _decomposed_model(cfg, params) if kind == 'decomposed' else _custom_model(cfg, params)
    path = str(folder / f'{kind}.onnx')
    onnx.save(model, path)
    return dpp_surgery.onnx_session(path, threads=2, native=kind == 'native')


def _native_available() -> bool:
    try:
        from dpp_surgery.native.ort_kernel import ort_kernel_library
        return ort_kernel_library() is not None
    except Exception:
        return False


ORT_KINDS = ['decomposed', 'function',
             pytest.param('native', marks=pytest.mark.skipif(not _native_available(), reason='no native ORT kernel'))]


@pytest.mark.parametrize('kind', ORT_KINDS)
@pytest.mark.parametrize('geometry', list(GEOMETRIES), ids=list(GEOMETRIES))
@pytest.mark.parametrize('guide,reward', VARIANTS)
def test_onnxruntime(kind, geometry, guide, reward, tmp_path):
    pytest.importorskip('onnxruntime')
    geometry = GEOMETRIES[geometry]
    session = _session(kind, geometry, guide, reward, tmp_path)
    x0 = _clean().numpy()
    clean = session.run(None, {'X': x0})[0]
    with torch.no_grad():  # the same model as the PyTorch path
        ref = _run_torch('torch', torch.from_numpy(x0), geometry, guide, reward, _params(guide, geometry))
    np.testing.assert_allclose(clean, ref, rtol=1e-4, atol=1e-4)
    for what, pos, value in _cases():
        out = session.run(None, {'X': _with(torch.from_numpy(x0), pos, value).numpy()})[0]
        _assert_contract(out, clean, _expected_outputs(geometry, guide == 'full', pos), f'{kind}: {what}')
    # an empty batch (the files' batch dimension is dynamic)
    empty = session.run(None, {'X': np.zeros((0, C, H, W), np.float32)})[0]
    assert empty.shape == (0, C, _out_size(H, *geometry), _out_size(W, *geometry))


@pytest.mark.slow
@pytest.mark.parametrize('runtime', ['openvino', 'tract'])
def test_other_runtimes_observed(runtime, tmp_path, other_runtime):
    """OpenVINO and tract on the decomposition: recorded (printed), not required to follow the contract."""
    pytest.importorskip(runtime)
    lines = []
    for gname, geometry in GEOMETRIES.items():
        for guide, reward in VARIANTS:
            path = tmp_path / f'{gname}_{guide}_{reward}.onnx'
            onnx.save(_decomposed_model(_cfg(geometry, guide, reward), _params(guide, geometry)), str(path))
            x0 = _clean().numpy()
            clean = other_runtime(path, runtime, x0)[0]
            follows = 0
            notes = []
            for what, pos, value in _cases():
                out = other_runtime(path, runtime, _with(torch.from_numpy(x0), pos, value).numpy())[0]
                expected = _expected_outputs(geometry, guide == 'full', pos)
                bad = ~np.isfinite(out)
                same = np.array_equal(out[~expected], clean[~expected])
                if np.array_equal(bad, expected) and same:
                    follows += 1
                else:
                    notes.append(f'{what}: non-finite {int(bad.sum())} (expected {int(expected.sum())}), '
                                 f'{"others bit-identical" if same else "others changed"}')
            lines.append(f'{runtime} {gname} {guide}-{reward}: {follows}/9 cases follow the contract'
                         + ''.join(f'\n    {n}' for n in notes))
    print('\n'.join(lines))


@pytest.mark.slow
def test_exported_files_run_empty_batch_and_nan(tmp_path):
    """Whole files from export_onnx (dynamic batch): an empty batch runs, a NaN stays in its windows."""
    import dpp_surgery
    from torch import nn
    from dpp_surgery import DPP2d
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DPP2d(4, guide='full', reward='asym'),
                          DPP2d(4, 3, 2, padding=1)).eval()
    x = torch.randn(2, 3, 64, 64)
    xb = x.clone()
    xb[1, 0, 20, 20] = math.nan
    for mode, natives in (('decomposed', (None,)), ('custom', (True, False))):
        path = dpp_surgery.export_onnx(model, str(tmp_path / f'{mode}.onnx'), mode=mode, example_input=x)
        for native in natives:
            session = dpp_surgery.onnx_session(path, native=native)
            name = session.get_inputs()[0].name
            assert session.run(None, {name: np.zeros((0, 3, 64, 64), np.float32)})[0].shape == (0, 4, 16, 16)
            clean, out = (session.run(None, {name: t.numpy()})[0] for t in (x, xb))
            bad = ~np.isfinite(out)
            assert bad[1].any() and not bad[0].any(), (mode, native)
            assert np.array_equal(out[~bad], clean[~bad]), (mode, native)
