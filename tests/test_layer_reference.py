"""DPP2d against the float64 loop reference, every variant x normalisation x geometry, both implementations."""
import math

import pytest
import torch

from dpp_surgery import DPP2d, dpp2d
from conftest import kernel_available
from reference import dpp2d_reference

# name: (kernel, stride, padding, ceil_mode)
GEOMETRIES = {
    '2x2s2': ((2, 2), (2, 2), 0, False),
    '3x3s2p1': ((3, 3), (2, 2), 1, False),
    '3x3s2_ceil': ((3, 3), (2, 2), 0, True),
    '2x2s2_ceil': ((2, 2), (2, 2), 0, True),
    '3x3s2_same': ((3, 3), (2, 2), 'same', False),
    '2x2s2_same': ((2, 2), (2, 2), 'same', False),
    '3x3s1p1': ((3, 3), (1, 1), 1, False),
    '3x2s2x1p1x0': ((3, 2), (2, 1), (1, 0), False),
}
SIZES = [(8, 8), (7, 9)]
VARIANTS = [(g, r, n) for g in ('lite', 'full') for r in ('sym', 'asym') for n in ('mean', 'none', 'sum')]


def _make(channels, kernel, stride, padding, ceil_mode, guide, reward, norm):
    layer = DPP2d(channels, kernel, stride, padding, ceil_mode, guide=guide, reward=reward, norm=norm)
    with torch.no_grad():
        layer.theta_alpha.normal_(0, 0.5)
        layer.theta_lambda.normal_(0, 0.5)
        if layer.guide_weight is not None:
            layer.guide_weight.add_(0.1 * torch.randn_like(layer.guide_weight))
    return layer


def _rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize('guide,reward,norm', VARIANTS, ids=['-'.join(v) for v in VARIANTS])
@pytest.mark.parametrize('geometry', list(GEOMETRIES), ids=list(GEOMETRIES))
def test_matches_loop_reference(geometry, guide, reward, norm):
    kernel, stride, padding, ceil_mode = GEOMETRIES[geometry]
    for h, w in SIZES:
        layer = _make(3, kernel, stride, padding, ceil_mode, guide, reward, norm)
        x = torch.randn(2, 3, h, w)
        ref = dpp2d_reference(x, layer.theta_alpha, layer.theta_lambda, kernel, stride, padding, ceil_mode,
                              layer.guide_weight, reward, norm)
        for impl in ('kernel', 'torch'):
            layer.impl = impl
            for fmt in (torch.contiguous_format, torch.channels_last):
                out = layer(x.contiguous(memory_format=fmt))
                assert out.shape == ref.shape
                assert out.dtype == torch.float32
                err = _rel_err(out, ref)
                assert err <= 1e-5, f'{impl} {fmt} size {(h, w)}: max relative error {err:.3g}'


@pytest.mark.parametrize('geometry', list(GEOMETRIES), ids=list(GEOMETRIES))
def test_kernel_equals_torch_path_with_gradients(geometry):
    """The fused kernel and the PyTorch path agree to float64 precision, outputs and all gradients."""
    kernel, stride, padding, ceil_mode = GEOMETRIES[geometry]
    for guide, reward, norm in VARIANTS:
        layer = _make(4, kernel, stride, padding, ceil_mode, guide, reward, norm).double()
        x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
        results = []
        for impl in ('kernel', 'torch'):
            layer.impl = impl
            layer.zero_grad()
            xi = x.clone().requires_grad_(True)
            out = layer(xi)
            (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
            grads = [xi.grad] + [p.grad for p in layer.parameters()]
            results.append((out, grads))
        (o1, g1), (o2, g2) = results
        torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-12)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)



def _omp_threshold() -> int:
    """The work size (N * C * H * W) above which the fused kernel runs on several OpenMP threads, read from its source."""
    import re
    from dpp_surgery.native.kernel import SOURCES
    found = set(re.findall(r'if \(work > (\d+)\)', SOURCES[0].read_text()))
    assert len(found) == 1, f'expected one OpenMP threshold in {SOURCES[0]}, found {sorted(found)}'
    return int(found.pop())


@pytest.mark.skipif(not kernel_available(), reason='the fused CPU kernel is not built')
@pytest.mark.parametrize('layout,guide,reward', [('nchw', 'full', 'asym'), ('channels_last', 'lite', 'sym')])
def test_kernel_threaded_backward_matches_torch_path(layout, guide, reward):
    """Above the kernel's OpenMP threshold (the smallest square input over it, with at least two work items: planes in
    NCHW, images in NHWC) on two threads: the float32 kernel's output, input gradient and theta (and guide) gradients
    against the PyTorch path in float64, to float32 precision."""
    torch.set_num_threads(2)  # (the autouse fixture restores the count)
    n, c = (2, 2) if layout == 'nchw' else (2, 16)  # (channels_last runs the NHWC path from 16 channels)
    side = math.isqrt(_omp_threshold() // (n * c)) + 1
    assert n * c * side * side > _omp_threshold()
    layer = _make(c, (3, 3), (2, 2), 1, False, guide, reward, 'mean')
    x = torch.randn(n, c, side, side + 1)
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    grad = None
    results = {}
    for impl, dtype in (('kernel', torch.float32), ('torch', torch.float64)):
        layer.impl = impl
        layer.zero_grad()
        layer.to(dtype)
        xi = x.to(dtype).detach().requires_grad_(True)
        out = layer(xi)
        if grad is None:
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(grad.to(dtype))
        results[impl] = [out, xi.grad] + [p.grad for p in layer.parameters()]
    names = ['output', 'input gradient'] + [name for name, _ in layer.named_parameters()]
    for name, a, b in zip(names, results['kernel'], results['torch']):
        err = _rel_err(a, b)
        assert err <= 1e-4, f'{layout} {guide}-{reward} {tuple(x.shape)}: {name} max relative error {err:.3g}'


def test_functional_matches_module():
    layer = _make(5, (3, 3), (2, 2), 1, False, 'full', 'asym', 'sum')
    x = torch.randn(2, 5, 11, 10)
    out = dpp2d(x, layer.theta_alpha, layer.theta_lambda, 3, 2, 1, guide_weight=layer.guide_weight, reward='asym',
                norm='sum')
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)


def test_paper_full_guide_is_3x3_stride2_pad1_depthwise():
    layer = DPP2d(6, guide='full')
    assert layer.guide_weight.shape == (6, 1, 3, 3)
    x = torch.randn(2, 6, 10, 10)
    from dpp_surgery import full_guide
    g = full_guide(x, layer.guide_weight, layer.geometry, layer.geometry.resolve(10, 10))
    expected = torch.nn.functional.conv2d(x, layer.guide_weight, stride=2, padding=1, groups=6)
    torch.testing.assert_close(g, expected)


# windows that tile the input, with and without padding, 'same' or ceil_mode: the export form (pooling)
TILING = {
    '2x2s2': ((2, 2), (2, 2), 0, False),
    '2x2s2_ceil': ((2, 2), (2, 2), 0, True),
    '2x2s2_same': ((2, 2), (2, 2), 'same', False),
    '3x2s3x2p1x0': ((3, 2), (3, 2), (1, 0), False),
}


def _pooled_and_stacked(layer, x):
    """The pooled form (what export writes for tiling windows) and the stacked form (eager), from the same inputs."""
    from dpp_surgery.layers import functional
    g = layer.geometry
    r = g.resolve(x.shape[-2], x.shape[-1])
    alpha = torch.exp(layer.theta_alpha.clamp(max=10.0))
    lam = torch.exp(layer.theta_lambda)
    guide = None if layer.guide_weight is None else functional.full_guide(x, layer.guide_weight, g, r)
    args = (guide, alpha, lam, r, layer.reward == 'asym', layer.norm, layer.eps)
    return functional._pooled(x, *args), functional._stacked(x, *args)


@pytest.mark.parametrize('geometry', list(TILING), ids=list(TILING))
def test_pooled_form_matches_references_with_gradients(geometry):
    """The pooled form against the float64 loop reference, and its gradients against the stacked form's."""
    kernel, stride, padding, ceil_mode = TILING[geometry]
    for guide, reward, norm in VARIANTS:
        for h, w in SIZES:
            layer = _make(3, kernel, stride, padding, ceil_mode, guide, reward, norm).double()
            x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
            pooled, stacked = _pooled_and_stacked(layer, x)
            ref = dpp2d_reference(x.detach(), layer.theta_alpha, layer.theta_lambda, kernel, stride, padding,
                                  ceil_mode, layer.guide_weight, reward, norm)
            torch.testing.assert_close(pooled, ref, rtol=1e-10, atol=1e-12)
            probe = torch.linspace(-1, 1, ref.numel(), dtype=torch.float64).view_as(ref)
            leaves = [x] + list(layer.parameters())
            g1 = torch.autograd.grad((pooled * probe).sum(), leaves, retain_graph=True)
            g2 = torch.autograd.grad((stacked * probe).sum(), leaves)
            for a, b in zip(g1, g2):
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_pooled_form_keeps_huge_lambda_finite():
    """lambda = e^8 (about 3000) on a ceil_mode window: the padding's clamped base keeps every value finite."""
    layer = _make(2, (2, 2), (2, 2), 0, True, 'lite', 'sym', 'mean')
    with torch.no_grad():
        layer.theta_lambda.fill_(8.0)
    x = (torch.randn(1, 2, 7, 7) * 1e3).requires_grad_(True)
    pooled, stacked = _pooled_and_stacked(layer, x)
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled, stacked, rtol=1e-3, atol=1e-4 * x.abs().max().item())  # (float32)
    pooled.sum().backward()
    assert torch.isfinite(x.grad).all()
