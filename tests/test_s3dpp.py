"""S3DPP2d, the paper's stochastic DPP (DPP_SPEC.md section 2b): DPP with 2x2 windows at stride 1 over the input with
its last row and column replicated, then S3Pool by 2 (random rows and columns per grid in training, 2x2 averages in
evaluation).

The reference below is written from the spec with Python loops in float64 and calls none of the layer's helpers; its
DPP formula is first checked against DPP2d itself at stride 2."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import dpp_surgery
from dpp_surgery import DPP2d, S3DPP2d
from dpp_surgery.layers.s3dpp import s3pool_indices

pytestmark = pytest.mark.usefixtures('one_thread')

EPS = 1e-3  # added to the squared deviation (DPP_SPEC section 1)


# ---------------------------------------------------------------------------------------------------------- reference

def ref_dpp(x, theta_alpha, theta_lambda, guide_weight, reward, norm, stride, eps=EPS):
    """DPP with 2x2 windows at ``stride``, no padding (floor), window by window. Lite guide: the window mean; Full
    guide: the 3x3 depthwise filter starting one row and column before the window, zero outside the input.
    w = alpha + (y / m)^(lambda / 2), y = rho(I - G)^2 + eps, m the window mean / sum of y or 1; alpha =
    exp(min(theta_alpha, 10)), lambda = exp(theta_lambda)."""
    n_, c_, h, w = x.shape
    oh, ow = (h - 2) // stride + 1, (w - 2) // stride + 1
    xs = x.tolist()
    alpha = [math.exp(min(t, 10.0)) for t in theta_alpha.tolist()]
    lam = [math.exp(t) for t in theta_lambda.tolist()]
    gw = None if guide_weight is None else guide_weight.tolist()
    out = np.zeros((n_, c_, oh, ow))
    for n in range(n_):
        for c in range(c_):
            img = xs[n][c]
            for i in range(oh):
                for j in range(ow):
                    r0, c0 = i * stride, j * stride
                    vals = [img[r0 + a][c0 + b] for a in (0, 1) for b in (0, 1)]
                    if gw is None:
                        g = sum(vals) / 4
                    else:
                        g = 0.0
                        for a in range(3):
                            for b in range(3):
                                r, q = r0 - 1 + a, c0 - 1 + b
                                if 0 <= r < h and 0 <= q < w:
                                    g += gw[c][0][a][b] * img[r][q]
                    dev = [v - g for v in vals]
                    if reward == 'asym':
                        dev = [max(0.0, d) for d in dev]
                    y = [d * d + eps for d in dev]
                    m = {'mean': sum(y) / 4, 'sum': sum(y), 'none': 1.0}[norm]
                    wts = [alpha[c] + (v / m) ** (lam[c] / 2) for v in y]
                    out[n, c, i, j] = sum(wv * v for wv, v in zip(wts, vals)) / sum(wts)
    return torch.from_numpy(out)


def ref_s3dpp(layer, x, indices=None):
    """S3DPP from the spec: replicate the last row and column, DPP 2x2 at stride 1 (H x W), then the 2x2 average
    (ceil: a window over the edge averages its valid positions), or, given ``indices`` (rows, cols), those rows and
    columns."""
    h, w = x.shape[-2:]
    x = x.double()
    xp = x[:, :, [min(i, h - 1) for i in range(h + 1)]][:, :, :, [min(j, w - 1) for j in range(w + 1)]]
    gw = None if layer.guide_weight is None else layer.guide_weight.detach().double()
    y = ref_dpp(xp, layer.theta_alpha.detach().double(), layer.theta_lambda.detach().double(), gw, layer.reward,
                layer.norm, stride=1, eps=layer.eps)
    assert y.shape[-2:] == (h, w)
    if indices is not None:
        rows, cols = indices
        out = torch.zeros(*y.shape[:2], len(rows), len(cols), dtype=torch.float64)
        for i, r in enumerate(rows):
            for j, q in enumerate(cols):
                out[:, :, i, j] = y[:, :, r, q]
        return out
    oh, ow = -(-h // 2), -(-w // 2)
    out = torch.zeros(*y.shape[:2], oh, ow, dtype=torch.float64)
    for i in range(oh):
        for j in range(ow):
            cells = [(a, b) for a in (2 * i, 2 * i + 1) for b in (2 * j, 2 * j + 1) if a < h and b < w]
            out[:, :, i, j] = sum(y[:, :, a, b] for a, b in cells) / len(cells)
    return out


def ref_draw(length, grid):
    """The rows S3Pool keeps, as the layer documents its draw: n = max(1, min(grid, L // 2)) grids of sizes
    (L + k) // n; an even grid keeps half, odd grids alternately ceil and floor of half (the first rounds up); each grid
    keeps torch.randperm(size)[:keep] from the default generator, sorted; grids in order."""
    n = max(1, min(grid, length // 2))
    sizes = [(length + k) // n for k in range(n)]
    kept, start, odd = [], 0, 0
    for size in sizes:
        keep = size // 2
        if size % 2:
            keep += 1 if odd % 2 == 0 else 0
            odd += 1
        kept += sorted(start + int(v) for v in torch.randperm(size)[:keep])
        start += size
    return kept


def randomized(layer):
    """``layer`` with random, non-default theta (and Full guide filter)."""
    with torch.no_grad():
        layer.theta_alpha.copy_(torch.randn_like(layer.theta_alpha))
        layer.theta_lambda.copy_(0.3 + 0.5 * torch.randn_like(layer.theta_lambda))
        if layer.guide_weight is not None:
            layer.guide_weight.copy_(1 / 9 + 0.2 * torch.randn_like(layer.guide_weight))
    return layer


VARIANTS = [(g, r) for g in ('lite', 'full') for r in ('sym', 'asym')]


@pytest.mark.parametrize('norm', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('guide,reward', VARIANTS, ids=['-'.join(v) for v in VARIANTS])
def test_reference_formula_matches_dpp2d_at_stride_2(guide, reward, norm):
    layer = randomized(DPP2d(3, 2, 2, guide=guide, reward=reward, norm=norm)).double()
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    gw = None if layer.guide_weight is None else layer.guide_weight.detach()
    want = ref_dpp(x, layer.theta_alpha.detach(), layer.theta_lambda.detach(), gw, reward, norm, stride=2)
    torch.testing.assert_close(layer(x).detach(), want, rtol=1e-9, atol=1e-10)


SIZES = [(6, 8), (7, 5), (9, 9)]


@pytest.mark.parametrize('size', SIZES, ids=[f'{h}x{w}' for h, w in SIZES])
@pytest.mark.parametrize('guide,reward', VARIANTS, ids=['-'.join(v) for v in VARIANTS])
@pytest.mark.parametrize('impl', ['auto', 'torch'])
def test_matches_loop_reference_in_both_modes(impl, guide, reward, size):
    layer = randomized(S3DPP2d(3, guide=guide, reward=reward, impl=impl)).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        layer.eval()
        torch.testing.assert_close(layer(x), ref_s3dpp(layer, x), rtol=1e-9, atol=1e-10)
        layer.train()
        torch.manual_seed(11)
        got = layer(x)
        rows, cols = (t.tolist() for t in layer.last_indices)
        torch.manual_seed(11)  # the same draws, made as documented (rows, then columns)
        assert (ref_draw(size[0], 2), ref_draw(size[1], 2)) == (rows, cols)
        torch.testing.assert_close(got, ref_s3dpp(layer, x, (rows, cols)), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('norm', ['sum', 'none'])
def test_other_norms_and_eps_match_the_reference(norm):
    layer = randomized(S3DPP2d(2, guide='full', norm=norm, eps=1e-2)).double().eval()
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref_s3dpp(layer, x), rtol=1e-9, atol=1e-10)


def test_training_picks_rows_of_the_stride1_map():
    # training output = index_select of the DPP step's map; evaluation = its 2x2 average
    layer = randomized(S3DPP2d(2)).double()
    x = torch.randn(2, 2, 8, 7, dtype=torch.float64)
    with torch.no_grad():
        y = DPP2d(2, 2, 1).double()
        y.load_state_dict(layer.state_dict())
        full = y(torch.nn.functional.pad(x, (0, 1, 0, 1), mode='replicate'))
        out = layer(x)
        rows, cols = layer.last_indices
        assert torch.equal(out, full[:, :, rows][:, :, :, cols])


# ---------------------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize('guide,reward', [('lite', 'sym'), ('full', 'asym')])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_gradcheck(training, guide, reward):
    layer = randomized(S3DPP2d(2, guide=guide, reward=reward)).double().train(training)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        torch.manual_seed(5)  # training: the same rows and columns at every call
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_training_gradient_is_the_scatter_of_the_kept_rows():
    layer = S3DPP2d(1, init='avg')  # lambda ~ 0: close to a 2x2 average at stride 1
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    layer(x).sum().backward()
    rows, cols = layer.last_indices
    assert x.grad.abs().sum() > 0 and layer.theta_alpha.grad is not None
    # rows that neither a kept window reads (r) nor its lower neighbour reads (r + 1) get no gradient
    read = set(rows.tolist()) | {r + 1 for r in rows.tolist()}
    for r in range(8):
        if r not in read:
            assert x.grad[0, 0, r].abs().max() == 0


# ---------------------------------------------------------------------------------------------------------- randomness

def test_seeded_runs_repeat_and_seeds_differ():
    layer = randomized(S3DPP2d(3))
    x = torch.randn(2, 3, 16, 16)
    outs = {}
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.setdefault(seed, []).append((layer(x), [t.clone() for t in layer.last_indices]))
    (a, ia), (b, ib) = outs[1]
    assert torch.equal(a, b) and all(torch.equal(p, q) for p, q in zip(ia, ib))
    c, ic = outs[2][0]
    assert not torch.equal(a, c) and not all(torch.equal(p, q) for p, q in zip(ia, ic))
    # a new draw at every call
    draws = set()
    for _ in range(10):
        layer(x)
        draws.add(tuple(layer.last_indices[0].tolist()))
    assert len(draws) > 1
    # evaluation: deterministic, and it draws nothing
    layer.eval()
    state = torch.get_rng_state()
    e1 = layer(x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    assert torch.equal(layer(x), e1)


def test_generator_argument():
    x = torch.randn(1, 2, 12, 12)
    layers = [S3DPP2d(2, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    state = torch.get_rng_state()
    a, b = (layer(x) for layer in layers)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)  # the default generator is untouched
    assert torch.equal(layers[0].last_indices[0], layers[1].last_indices[0])


def test_same_rows_for_the_whole_batch_and_every_channel():
    layer = S3DPP2d(4, init='avg')
    x = torch.randn(1, 1, 8, 8).expand(3, 4, 8, 8).contiguous()
    out = layer(x)
    assert torch.equal(out, out[:1, :1].expand_as(out))


@pytest.mark.parametrize('grid', [1, 2, 3, 4])
def test_kept_rows_per_grid(grid):
    for length in range(1, 34):
        n = max(1, min(grid, length // 2))
        sizes = [(length + k) // n for k in range(n)]
        seen = set()
        for _ in range(40 if length <= 16 else 5):
            idx = s3pool_indices(length, grid)
            assert idx.dtype == torch.int64 and idx.device.type == 'cpu'
            kept = idx.tolist()
            assert kept == sorted(set(kept)), (length, kept)  # increasing, unique
            assert len(kept) == -(-length // 2) and 0 <= kept[0] and kept[-1] < length
            start, rounded_up = 0, 0
            for size in sizes:
                count = sum(start <= v < start + size for v in kept)
                assert count in (size // 2, -(-size // 2)), (length, grid, sizes, kept)
                rounded_up += size % 2 == 1 and count == -(-size // 2)
                start += size
            assert rounded_up == -(-sum(s % 2 for s in sizes) // 2)
            if length % (2 * grid) == 0:  # the authors' rule: g = L / grid rows per grid, g / 2 kept in each
                assert n == grid and all(
                    sum(k * length // grid <= v < (k + 1) * length // grid for v in kept) == length // grid // 2
                    for k in range(grid))
            seen.update(kept)
        if length <= 16 and length > 1:
            assert seen == set(range(length)), (length, grid)  # random: every row is kept sometimes


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_output_sizes(training):
    layer = S3DPP2d(2, guide='full').train(training)
    for h in (1, 2, 3, 5, 8, 9):
        for w in (1, 2, 3, 5, 8, 9):
            out = layer(torch.randn(2, 2, h, w))
            assert out.shape == (2, 2, -(-h // 2), -(-w // 2)), (h, w)
            assert torch.isfinite(out).all()
            ref = DPP2d(2, 2, 2, ceil_mode=True)(torch.randn(1, 2, h, w)) if min(h, w) >= 2 else None
            if ref is not None:
                assert out.shape[-2:] == ref.shape[-2:]


def test_convex_combination_of_the_neighbourhood():
    # every output lies between the min and max of the input (each stage averages with positive weights)
    layer = randomized(S3DPP2d(3, guide='lite', reward='asym'))
    x = torch.randn(2, 3, 9, 10)
    for training in (True, False):
        out = layer.train(training)(x)
        lo, hi = x.flatten(2).amin(-1)[..., None, None], x.flatten(2).amax(-1)[..., None, None]
        assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()


# ---------------------------------------------------------------------------------------------------------- API

def test_is_a_dpp2d_for_param_groups_and_dpp_layers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), S3DPP2d(4, guide='full'))
    layer = model[1]
    assert isinstance(layer, DPP2d)
    assert [n for n, _ in dpp_surgery.dpp_layers(model)] == ['1']
    assert [n for n, _ in dpp_surgery.dpp_parameters(model)] == ['1.theta_alpha', '1.theta_lambda']
    groups = dpp_surgery.param_groups(model, lr=0.1, dpp_lr_scale=10)
    dpp_group = [g for g in groups if g['lr'] == 1.0]
    assert len(dpp_group) == 1 and dpp_group[0]['weight_decay'] == 0
    assert {id(p) for p in dpp_group[0]['params']} == {id(layer.theta_alpha), id(layer.theta_lambda)}
    assert layer.no_weight_decay() == {'theta_alpha', 'theta_lambda'}
    # state_dict keys and shapes are DPP2d's (the Full guide filter: 3x3 as for DPP2d's 2x2 window)
    layer(torch.randn(1, 4, 6, 6))
    plain = DPP2d(4, guide='full')
    assert {k: v.shape for k, v in layer.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(layer.state_dict())
    layer.load_state_dict(plain.state_dict())


def test_repr_attributes_and_exports():
    assert dpp_surgery.S3DPP2d is S3DPP2d and dpp_surgery.layers.S3DPP2d is S3DPP2d
    assert 'S3DPP2d' in dpp_surgery.__all__ and 'S3DPP2d' in dpp_surgery.layers.__all__
    assert repr(S3DPP2d(8)) == 'S3DPP2d(8, grid=2, guide=lite, reward=sym, norm=mean)'
    assert repr(S3DPP2d(8, guide='full', reward='asym', norm='sum', eps=1e-2, grid=3, impl='torch')) == (
        'S3DPP2d(8, grid=3, guide=full, reward=asym, norm=sum, eps=0.01, impl=torch)')
    layer = S3DPP2d(8)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode) == ((2, 2), (2, 2), (0, 0), True)
    assert (layer.geometry.kernel, layer.geometry.stride) == ((2, 2), (1, 1))  # the DPP step's
    assert layer.last_indices is None


def test_bad_arguments():
    for grid in (0, -1, 1.5, True, '2'):
        with pytest.raises(ValueError, match='grid must be an int >= 1'):
            S3DPP2d(4, grid=grid)
    for channels in (0, -3):
        with pytest.raises(ValueError, match='channels must be a positive int'):
            S3DPP2d(channels)
    with pytest.raises(ValueError, match='generator'):
        S3DPP2d(4, generator=object())
    with pytest.raises(ValueError, match='guide'):
        S3DPP2d(4, guide='wide')
    with pytest.raises(ValueError, match="needs reward='asym'"):
        S3DPP2d(4, init='max')
    with pytest.raises(ValueError, match='built for 4 channels'):
        S3DPP2d(4)(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match='4-D input'):
        S3DPP2d(4)(torch.randn(4, 8, 8))


# ---------------------------------------------------------------------------------------------------------- export

def test_jit_trace_in_eval_mode():
    layer = randomized(S3DPP2d(3, guide='full')).eval()
    x = torch.randn(2, 3, 9, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        traced = torch.jit.trace(layer, x)
    # one warning per run of the module (trace and its check), saying what matters; no shape-check warnings
    tracer = {str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)}
    assert len(tracer) == 1 and 'S3DPP2d' in min(tracer) and '(9, 8)' in min(tracer)
    torch.testing.assert_close(traced(x), layer(x))


@pytest.mark.parametrize('how', ['jit.trace', 'export'])
def test_export_in_training_mode_is_refused(how):
    layer = S3DPP2d(3).train()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r'call model\.eval\(\)'), warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.trace's deprecation
        if how == 'jit.trace':
            torch.jit.trace(layer, x)
        else:
            torch.export.export(layer, (x,))
    assert layer.training


@pytest.mark.parametrize('mode', ['decomposed', 'custom'])
def test_onnx_export_matches_pytorch(tmp_path, mode):
    pytest.importorskip('onnxruntime')
    import onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), randomized(S3DPP2d(4, guide='full', reward='asym')))
    layer = model[1]
    path = str(tmp_path / f's3dpp_{mode}.onnx')
    dpp_surgery.export_onnx(model, path, mode=mode, example_input=torch.randn(1, 3, 12, 13))
    assert model.training and 'forward' not in layer.__dict__ and '_step_patch' not in layer.__dict__
    proto = onnx.load(path)
    ops = [(n.domain, n.op_type) for n in proto.graph.node]
    assert ('', 'AveragePool') in ops and ('', 'Pad') in ops
    if mode == 'custom':
        nodes = [n for n in proto.graph.node if n.op_type == 'DPP2d']
        assert len(nodes) == 1
        attrs = {a.name: list(a.ints) for a in nodes[0].attribute if a.name in ('kernel_shape', 'strides')}
        assert attrs == {'kernel_shape': [2, 2], 'strides': [1, 1]}
    else:
        assert all(d == '' for d, _ in ops)
    session = dpp_surgery.onnx_session(path)
    model.eval()
    for h, w in ((12, 13), (16, 16), (15, 20), (13, 12)):
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            want = model(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert got.shape == want.shape == (2, 4, -(-h // 2), -(-w // 2))
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4, (h, w)
