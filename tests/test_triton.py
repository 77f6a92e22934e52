"""The Triton kernels (impl='triton') against the float64 loop reference and the PyTorch path's autograd.

Without a GPU they run on CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1); with one,
on the GPU. The default run takes a covering selection of variant x norm x geometry x layout x dtype; the full
product is marked slow.
"""
import itertools
import os
import subprocess
import sys
import warnings

import pytest
import torch

from dpp_surgery import DPP2d, dpp2d, kernel_status
from dpp_surgery.layers import functional
from reference import dpp2d_reference, window_bounds
from test_layer_reference import GEOMETRIES as BASE_GEOMETRIES

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'

pytestmark = pytest.mark.skipif(not kernel_status()['triton']['available'],
                                reason=f'Triton is not importable: {kernel_status()["triton"]["error"]}')

# the layer's geometries, plus the largest window the kernels take and windows with gaps between them
GEOMETRIES = dict(BASE_GEOMETRIES, **{
    '8x8s8': ((8, 8), (8, 8), 0, False),
    '2x2s3': ((2, 2), (3, 3), 0, False),
    '5x5s2p2_ceil': ((5, 5), (2, 2), 2, True),
})
VARIANTS = [(g, r, n) for g in ('lite', 'full') for r in ('sym', 'asym') for n in ('mean', 'none', 'sum')]
LAYOUTS = {'nchw': torch.contiguous_format, 'nhwc': torch.channels_last}
DTYPES = {'f32': torch.float32, 'f16': torch.float16, 'bf16': torch.bfloat16}
SIZES = [(9, 10), (10, 9), (11, 11)]
# (output, gradient) tolerance relative to the largest reference value, per dtype: the kernels compute in float32,
# and low-precision inputs/outputs are rounded to their dtype (the Full guide too, as the convolution runs in it)
TOLERANCE = {torch.float32: (2e-5, 2e-4), torch.float16: (4e-3, 3e-2), torch.bfloat16: (3e-2, 1.5e-1)}

ALL_CASES = list(itertools.product(VARIANTS, GEOMETRIES, LAYOUTS, DTYPES))


def _covering_cases():
    """Every variant, geometry, layout and dtype, each pair of norm and dtype and each of guide x dtype (the Full
    guide in float32 too), in a few cases: variant i % 12 and geometry i % 11 (coprime periods), layout
    (i // 2) % 2, dtype (i // 4 + i // 12) % 3."""
    geometries, layouts, dtypes = list(GEOMETRIES), list(LAYOUTS), list(DTYPES)
    return [(VARIANTS[i % 12], geometries[i % 11], layouts[(i // 2) % 2], dtypes[(i // 4 + i // 12) % 3])
            for i in range(24)]


def _case_id(case):
    (g, r, n), geometry, layout, dtype = case
    return f'{g}-{r}-{n}-{geometry}-{layout}-{dtype}'


def _parameters(c, kernel, guide, dtype=torch.float32):
    ta = 0.5 * torch.randn(c, dtype=dtype)
    tl = 0.5 * torch.randn(c, dtype=dtype)
    gw = None
    if guide == 'full':
        kg = tuple(k + 1 if k % 2 == 0 else k for k in kernel)
        gw = 1.0 / (kg[0] * kg[1]) + 0.1 * torch.randn(c, 1, *kg, dtype=dtype)
    return ta, tl, gw


def _run(x, ta, tl, gw, geometry, reward, norm, impl, grad_out):
    """Output and gradients (x, theta_alpha, theta_lambda[, guide_weight]) of dpp2d for one output gradient."""
    kernel, stride, padding, ceil_mode = GEOMETRIES[geometry]
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, ta, tl) + ((gw,) if gw is not None else ())]
    out = dpp2d(leaves[0], leaves[1], leaves[2], kernel, stride, padding, ceil_mode,
                guide_weight=leaves[3] if gw is not None else None, reward=reward, norm=norm, impl=impl)
    out.backward(grad_out.to(out.dtype))
    return out, [t.grad for t in leaves]


def _check_case(case, index=0):
    (guide, reward, norm), geometry, layout, dtype_name = case
    dtype, fmt = DTYPES[dtype_name], LAYOUTS[layout]
    kernel, stride, padding, ceil_mode = GEOMETRIES[geometry]
    h, w = SIZES[index % len(SIZES)]
    c = 3
    ta, tl, gw = _parameters(c, kernel, guide)
    x = torch.randn(2, c, h, w).to(dtype)  # the reference sees the same rounded input
    ref = dpp2d_reference(x.double(), ta, tl, kernel, stride, padding, ceil_mode, gw, reward, norm)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    ref_out, ref_grads = _run(x.double(), ta.double(), tl.double(), None if gw is None else gw.double(), geometry,
                              reward, norm, 'torch', grad_out)
    torch.testing.assert_close(ref_out, ref, rtol=1e-9, atol=1e-9)  # (the two references agree)

    xd = x.to(DEVICE).contiguous(memory_format=fmt)
    on = [t.to(DEVICE) if t is not None else None for t in (ta, tl, gw)]
    out, grads = _run(xd, *on, geometry, reward, norm, 'triton', grad_out.to(DEVICE))
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=fmt)
    assert grads[0].dtype == dtype and grads[0].is_contiguous(memory_format=fmt)
    out_tol, grad_tol = TOLERANCE[dtype]
    scale = ref.abs().max().item()
    err = (out.double().cpu() - ref).abs().max().item()
    assert err <= out_tol * scale, f'output error {err:.3g} > {out_tol} x {scale:.3g}'
    names = ['input', 'theta_alpha', 'theta_lambda', 'guide_weight']
    for name, got, want in zip(names, grads, ref_grads):
        assert got.shape == want.shape
        assert torch.isfinite(got).all(), name
        scale = want.abs().max().item()
        err = (got.double().cpu() - want).abs().max().item()
        assert err <= grad_tol * max(scale, 1e-3), f'{name} gradient error {err:.3g} > {grad_tol} x {scale:.3g}'


@pytest.mark.parametrize('case', _covering_cases(), ids=_case_id)
def test_matches_references(case):
    _check_case(case, _covering_cases().index(case))


@pytest.mark.slow
@pytest.mark.parametrize('case', ALL_CASES, ids=_case_id)
def test_matches_references_full_sweep(case):
    _check_case(case, ALL_CASES.index(case))


def test_covering_cases_cover_every_factor():
    cases = _covering_cases()
    assert {c[0] for c in cases} == set(VARIANTS)
    assert {c[1] for c in cases} == set(GEOMETRIES)
    assert {c[2] for c in cases} == set(LAYOUTS)
    assert {c[3] for c in cases} == set(DTYPES)
    assert {(c[0][2], c[3]) for c in cases} == set(itertools.product(('mean', 'none', 'sum'), DTYPES))
    assert {(c[0][0], c[3]) for c in cases} == set(itertools.product(('lite', 'full'), DTYPES))
    assert {(c[0][0], c[2]) for c in cases if c[3] == 'f32'} == set(itertools.product(('lite', 'full'), LAYOUTS))


GRADCHECK = [
    # (guide, reward, norm), kernel, stride, padding, ceil_mode, size
    (('full', 'sym', 'mean'), (3, 3), (2, 2), 1, False, (5, 5)),  # overlapping windows: the gather kernel
    (('lite', 'asym', 'sum'), (2, 2), (2, 2), 0, True, (5, 4)),  # non-overlapping, a window over the edge
]
GRADCHECK_SLOW = [
    (('lite', 'sym', 'none'), (3, 3), (2, 2), 'same', False, (5, 6)),
    (('full', 'asym', 'none'), (2, 2), (2, 2), 0, False, (4, 4)),
    (('full', 'sym', 'sum'), (3, 2), (2, 1), (1, 0), False, (5, 4)),
    (('lite', 'asym', 'mean'), (3, 3), (1, 1), 1, False, (4, 4)),
]


def _gradcheck(variant, kernel, stride, padding, ceil_mode, size):
    guide, reward, norm = variant
    c = 1
    x = torch.randn(1, c, *size, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ta, tl, gw = (t.to(DEVICE).requires_grad_(True) if t is not None else None
                  for t in _parameters(c, kernel, guide, torch.float64))
    inputs = [x, ta, tl] + ([gw] if gw is not None else [])

    def fn(x, ta, tl, *rest):
        return dpp2d(x, ta, tl, kernel, stride, padding, ceil_mode, guide_weight=rest[0] if rest else None,
                     reward=reward, norm=norm, impl='triton')

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize('case', GRADCHECK, ids=lambda c: '-'.join(c[0]))
def test_gradcheck_float64(case):
    _gradcheck(*case)


@pytest.mark.slow
@pytest.mark.parametrize('case', GRADCHECK_SLOW, ids=lambda c: '-'.join(c[0]))
def test_gradcheck_float64_more(case):
    _gradcheck(*case)


EXTREMES = {
    'huge': lambda shape: 1e4 * torch.randn(shape),
    'tiny': lambda shape: 1e-6 * torch.randn(shape),
    'mixed': lambda shape: torch.randn(shape) * 10.0 ** torch.randint(-6, 5, shape).float(),
    'constant': lambda shape: torch.full(shape, 7e3),
    'zeros': lambda shape: torch.zeros(shape),
}


def _check_extremes(kind, dtype, variants):
    """Huge lambda (theta_lambda 4: lambda 55), tiny alpha and extreme activations: every weight stays finite (the
    max-shift), the output stays in each window's [min, max] and the gradients are finite."""
    dtype = DTYPES[dtype]
    kernel, stride, padding, ceil_mode = GEOMETRIES['3x3s2_ceil']
    x = EXTREMES[kind]((2, 4, 9, 8)).clamp(-6e4, 6e4).to(dtype)  # (within float16's range)
    ta = torch.tensor([-20.0, 0.0, 5.0, 10.0])
    tl = torch.tensor([4.0, -4.0, 2.0, 0.0])
    lo, hi = window_bounds(x.double(), kernel, stride, padding, ceil_mode)
    # float32 outputs may pass a bound by rounding; low-precision ones are rounded onto a representable bound
    slack = 1e-6 * torch.maximum(lo.abs(), hi.abs()) if dtype == torch.float32 else 0.0
    for guide, reward, norm in variants:
        gw = _parameters(4, kernel, guide)[2]
        xd = x.to(DEVICE).requires_grad_(True)
        out = dpp2d(xd, ta.to(DEVICE), tl.to(DEVICE), kernel, stride, padding, ceil_mode,
                    guide_weight=None if gw is None else gw.to(DEVICE), reward=reward, norm=norm, impl='triton')
        assert torch.isfinite(out).all(), (guide, reward, norm)
        o = out.detach().double().cpu()
        assert (o >= lo - slack).all() and (o <= hi + slack).all(), (guide, reward, norm)
        out.float().sum().backward()
        assert torch.isfinite(xd.grad).all(), (guide, reward, norm)


@pytest.mark.parametrize('dtype', list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize('kind', list(EXTREMES))
def test_extreme_inputs_finite_and_within_window(kind, dtype):
    """Each guide x reward with one norm, the norm turning with the case (the full product is slow)."""
    norm = ('mean', 'none', 'sum')[(list(EXTREMES).index(kind) + list(DTYPES).index(dtype)) % 3]
    _check_extremes(kind, dtype, [v for v in VARIANTS if v[2] == norm])


@pytest.mark.slow
@pytest.mark.parametrize('dtype', list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize('kind', list(EXTREMES))
def test_extreme_inputs_every_variant(kind, dtype):
    _check_extremes(kind, dtype, VARIANTS)


def _layer_grads(layer, x):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    out = layer(x)
    out.backward(torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out))
    return [out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]


def _assert_matches_torch_path(layer, x):
    """The Triton layer's output and gradients equal the PyTorch path's on ``x``."""
    got = _layer_grads(layer, x)
    layer.impl = 'torch'
    want = _layer_grads(layer, x)
    layer.impl = 'triton'
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_backward_is_deterministic_and_tiling_does_not_matter(monkeypatch):
    """The same call twice gives bitwise equal gradients (no atomics); many small tiles (many partial alpha/lambda
    sums) give the same values as the default tiles."""
    from dpp_surgery.native import triton_dpp
    layer = DPP2d(5, 3, 2, 1, guide='full', impl='triton').to(DEVICE)
    for fmt in LAYOUTS.values():
        x = torch.randn(2, 5, 11, 10, device=DEVICE).contiguous(memory_format=fmt)
        first, second = _layer_grads(layer, x), _layer_grads(layer, x)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        monkeypatch.setattr(triton_dpp, 'TILE_LANES', 16)
        tiled = _layer_grads(layer, x)
        monkeypatch.setattr(triton_dpp, 'TILE_LANES', None)
        for a, b in zip(first, tiled):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('geometry', [(2, 2, 0), (3, 2, 1)], ids=['2x2', '3x3s2p1'])
@pytest.mark.parametrize('guide', ['lite', 'full'])
def test_channel_and_position_tiles_match_the_torch_path(monkeypatch, guide, geometry):
    """Small tiles: channels_last spread over several channel tiles (the last one partial) and positions over
    several tiles (the last one partial), NCHW over many position tiles; float32 values and gradients equal the
    PyTorch path's."""
    from dpp_surgery.native import triton_dpp
    monkeypatch.setattr(triton_dpp, 'TILE_LANES', 8)
    monkeypatch.setattr(triton_dpp, 'TILE_CHANNELS', 2)
    layer = DPP2d(5, *geometry, guide=guide, reward='asym', impl='triton').to(DEVICE)
    for fmt in LAYOUTS.values():
        x = torch.randn(2, 5, 7, 9, device=DEVICE).contiguous(memory_format=fmt)
        bp, bc, _ = triton_dpp._blocks(x, 'forward', geometry[0] ** 2)
        assert (bp, bc) == ((4, 2) if fmt == torch.channels_last else (8, 1))
        _assert_matches_torch_path(layer, x)


def test_views_run_without_copies_and_match_the_torch_path():
    """Channel slices and strided views (neither NCHW- nor channels_last-contiguous) give the PyTorch path's
    values and gradients."""
    layer = DPP2d(3, 2, 2, guide='lite', impl='triton').to(DEVICE)
    base = torch.randn(2, 6, 12, 18, device=DEVICE)
    for view in (base[:, 1:4], base[:, ::2, :, ::2], base.permute(0, 1, 3, 2)[:, :3]):
        assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
        _assert_matches_torch_path(layer, view)


def test_no_float32_copy_of_low_precision_activations():
    """bfloat16 in, bfloat16 out and bfloat16 input gradient, under autocast too (the kernels load and store the
    activation's own dtype)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), DPP2d(8, 2, guide='full', impl='triton'))
    model = model.to(DEVICE)
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    seen = {}
    model[1].register_forward_pre_hook(lambda m, args: seen.update(dtype=args[0].dtype))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = model(x)
    assert seen['dtype'] == torch.bfloat16 and out.dtype == torch.bfloat16
    ref = model.float()(x)
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_refusals_name_the_reason():
    x = torch.randn(1, 2, 16, 16, device=DEVICE)
    ta, tl = torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE)
    with pytest.raises(RuntimeError, match=r'impl="triton" cannot run here: the window has 65 positions and the '
                                           r'kernels take at most 64\. Use impl="auto"'):
        dpp2d(x, ta, tl, (5, 13), impl='triton')
    # auto falls back (to the PyTorch path on CUDA, to the PyTorch path for the CPU kernel's limit too)
    ref = dpp2d(x, ta, tl, (5, 13), impl='torch')
    torch.testing.assert_close(dpp2d(x, ta, tl, (5, 13)), ref)
    layer = DPP2d(2, impl='triton').to(DEVICE)
    with warnings.catch_warnings(), pytest.raises(
            RuntimeError, match='torch.export, ONNX export and torch.jit.trace record DPP as standard'):
        warnings.simplefilter('ignore', FutureWarning)  # (torch.jit.trace's own deprecation notice)
        torch.jit.trace(layer, x, check_trace=False)


def test_cpu_tensors_need_the_interpreter():
    """Without TRITON_INTERPRET, impl='triton' on a CPU tensor says how to enable it; impl='auto' on CPU runs the
    CPU kernel and does not even import the Triton kernels."""
    code = ('import sys, torch, dpp_surgery\n'
            'x = torch.randn(1, 2, 8, 8)\n'
            'dpp_surgery.DPP2d(2)(x)\n'
            'print("kernels imported:", "dpp_surgery.native.triton_dpp" in sys.modules)\n'
            'try:\n'
            '    dpp_surgery.DPP2d(2, impl="triton")(x)\n'
            'except RuntimeError as e:\n'
            '    print(e)\n')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'kernels imported: False' in out.stdout
    assert "CPU tensors run the Triton kernels only through Triton's interpreter: set TRITON_INTERPRET=1" in out.stdout


def test_auto_on_cpu_keeps_the_cpu_kernel():
    x = torch.randn(1, 2, 8, 8)
    r = DPP2d(2).geometry.resolve(8, 8)
    assert functional._choose(x, r, 'auto') == ('kernel' if kernel_status()['loaded'] else 'torch')
    if kernel_status()['triton']['interpreter']:
        assert functional._choose(x, r, 'triton') == 'triton'
    else:  # (a CUDA machine: conftest turns the interpreter on only without a GPU)
        with pytest.raises(RuntimeError, match='only through Triton\'s interpreter'):
            functional._choose(x, r, 'triton')
    # (CPU bfloat16, autocast's: the CPU kernel on a float32 copy, not the Triton kernels)
    assert functional._choose(x.to(torch.bfloat16), r, 'auto') == functional._choose(x, r, 'auto')


def test_kernel_status_reports_triton():
    status = kernel_status()['triton']
    assert status['available'] and status['error'] is None
    import triton
    assert status['version'] == triton.__version__
    assert status['interpreter'] == (os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'))


class _FakeEvent:
    def __init__(self):
        self.done = False

    def query(self):
        return self.done


class _RecordingCheck(functional._DeferredCheck):
    """The deferred check's bookkeeping on a CPU tensor: the count is taken at once, the event completes when the
    test says so."""
    __slots__ = ('events',)

    def __init__(self):
        super().__init__()
        self.events = []

    def _start(self, t):
        self.count = (~torch.isfinite(t)).sum()
        self.events.append(_FakeEvent())
        return self.events[-1]


def test_deferred_parameter_check_reports_late_never_waits_and_clears():
    p = torch.nn.Parameter(torch.zeros(4))
    check = _RecordingCheck()
    check(p, 'theta_alpha')
    assert len(check.events) == 1
    check(p, 'theta_alpha')  # unchanged and finite: nothing new is queued
    assert len(check.events) == 1
    check.events[0].done = True
    check(p, 'theta_alpha')
    with torch.no_grad():
        p[1] = float('nan')
        p[2] = float('inf')
    check(p, 'theta_alpha')  # changed: a new count is queued, nobody waits for it
    assert len(check.events) == 2
    check(p, 'theta_alpha')  # not arrived yet: no error yet, no second count queued
    assert len(check.events) == 2
    check.events[1].done = True
    for _ in range(2):  # the error persists until the parameter changes
        with pytest.raises(ValueError, match=r'theta_alpha has 2 non-finite value\(s\) \(NaN or inf\) \(found after '
                                             r'an earlier call on the GPU'):
            check(p, 'theta_alpha')
    with torch.no_grad():
        p.zero_()  # reloaded: checked again, and the error goes once the new count arrives clean
    check(p, 'theta_alpha')
    assert len(check.events) == 3
    check.events[2].done = True
    check(p, 'theta_alpha')
