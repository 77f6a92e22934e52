"""Property tests: finite outputs and gradients, output within the window's range, limiting cases."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpp_surgery import DPP2d, dpp2d
from reference import window_bounds

# (kernel, stride, padding, ceil_mode); 'same' is timm's dynamic padding
GEOMS = [((2, 2), None, 0, False), ((3, 3), (2, 2), 1, False), ((3, 3), (2, 2), 0, True),
         ((3, 3), (2, 2), 'same', False), ((2, 2), (2, 2), 'same', False), ((3, 2), (1, 2), 'same', False),
         ((3, 2), (2, 1), (1, 0), True)]
MAX_SIZE = 7


def min_size(k, s, p, ceil_mode):
    """The smallest input side with an output position, from torch's pooling output size (dilation 1):
    floor((size + 2p - k) / s) + 1 >= 1, or with ceil_mode ceil(...) + 1 >= 1 (the last window may hang over the far
    edge). timm's 'same' padding has ceil(size / s) >= 1 outputs for any size."""
    if p == 'same':
        return 1
    return max(1, k - 2 * p - (s - 1 if ceil_mode else 0))


@st.composite
def inputs(draw, geom):
    """Small 4-D arrays, of a size with at least one window for ``geom``, mixing magnitudes 1e-6..1e4, both signs,
    exact zeros and constant blocks."""
    kernel, stride, padding, ceil_mode = geom
    stride = stride or kernel
    pads = (padding, padding) if padding == 'same' or isinstance(padding, int) else padding
    h, w = (draw(st.integers(min_size(k, s, p, ceil_mode), MAX_SIZE)) for k, s, p in zip(kernel, stride, pads))
    c = draw(st.integers(1, 3))
    shape = (1, c, h, w)
    mode = draw(st.sampled_from(['mixed', 'constant', 'zeros', 'single_scale']))
    if mode == 'zeros':
        return np.zeros(shape, np.float32)
    if mode == 'constant':
        return np.full(shape, draw(st.sampled_from([1e-6, -3.0, 7e3, 1e4])), np.float32)
    if mode == 'single_scale':
        scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e2, 1e4]))
        vals = draw(st.lists(st.floats(-1, 1, width=32), min_size=h * w * c, max_size=h * w * c))
        return (np.array(vals, np.float32) * scale).reshape(shape)
    mags = draw(st.lists(st.floats(-6, 4), min_size=h * w * c, max_size=h * w * c))
    signs = draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=h * w * c, max_size=h * w * c))
    return (np.array(signs) * 10.0 ** np.array(mags)).astype(np.float32).reshape(shape)


@st.composite
def geometry_and_input(draw):
    geom = draw(st.sampled_from(GEOMS))
    return geom, draw(inputs(geom))


def test_min_size_is_the_smallest_valid_input():
    """The strategy's sizes are exactly the valid ones: one less than min_size is the layer's error case."""
    for kernel, stride, padding, ceil_mode in GEOMS:
        stride_ = stride or kernel
        pads = (padding, padding) if padding == 'same' or isinstance(padding, int) else padding
        h, w = (min_size(k, s, p, ceil_mode) for k, s, p in zip(kernel, stride_, pads))
        layer = DPP2d(1, kernel, stride, padding, ceil_mode)
        assert layer(torch.ones(1, 1, h, w)).numel() >= 1
        for bad in ((h - 1, w), (h, w - 1)):
            if min(bad) >= 1:
                with pytest.raises(ValueError, match='larger than the padded input'):
                    layer(torch.ones(1, 1, *bad))


@pytest.mark.parametrize('impl', ['kernel', 'torch'])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # 7 geometries
@given(case=geometry_and_input(), guide=st.sampled_from(['lite', 'full']),
       reward=st.sampled_from(['sym', 'asym']), norm=st.sampled_from(['mean', 'none', 'sum']),
       theta=st.tuples(st.floats(-3, 3), st.floats(-3, 3)))
def test_finite_and_within_window(impl, case, guide, reward, norm, theta):
    """Every example is checked (its size has a window by construction): the output has the shape of the reference's
    windows ('same' padding and ceil_mode included), it is finite, and it lies within the min and max of each
    window's valid positions; the gradients are finite."""
    (kernel, stride, padding, ceil_mode), arr = case
    c = arr.shape[1]
    layer = DPP2d(c, kernel, stride, padding, ceil_mode, guide=guide, reward=reward, norm=norm, impl=impl)
    with torch.no_grad():
        layer.theta_alpha.fill_(theta[0])
        layer.theta_lambda.fill_(theta[1])
    x = torch.from_numpy(arr).requires_grad_(True)
    out = layer(x)
    lo, hi = window_bounds(x.detach().double(), kernel, stride, padding, ceil_mode)
    assert out.shape == lo.shape
    assert torch.isfinite(out).all()
    tol = 1e-6 * torch.maximum(lo.abs(), hi.abs()) + 1e-30
    assert (out.double() >= lo - tol).all() and (out.double() <= hi + tol).all()
    out.sum().backward()
    for g in [x.grad] + [p.grad for p in layer.parameters()]:
        assert torch.isfinite(g).all()


@pytest.mark.parametrize('impl', ['kernel', 'torch'])
@pytest.mark.parametrize('norm', ['mean', 'none', 'sum'])
def test_lambda_to_zero_is_average_pooling(impl, norm):
    x = torch.randn(2, 4, 9, 8)
    for reward in ('sym', 'asym'):
        out = dpp2d(x, torch.zeros(4), torch.full((4,), -30.0), 3, 2, 1, reward=reward, norm=norm, impl=impl)
        ref = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('impl', ['kernel', 'torch'])
def test_alpha_to_infinity_is_average_pooling(impl):
    """The deviation from average pooling shrinks like 1/alpha; at the clamp (theta_alpha = 10) it is < 1e-4."""
    x = torch.randn(2, 4, 8, 8)
    ref = F.avg_pool2d(x, 2)
    errs = []
    for ta in (0.0, 4.0, 10.0):
        out = dpp2d(x, torch.full((4,), ta), torch.zeros(4), impl=impl)
        errs.append(((out - ref).abs().max() / x.abs().max()).item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-4
    # theta_alpha beyond the clamp changes nothing
    torch.testing.assert_close(dpp2d(x, torch.full((4,), 50.0), torch.zeros(4), impl=impl),
                               dpp2d(x, torch.full((4,), 10.0), torch.zeros(4), impl=impl))


@pytest.mark.parametrize('impl', ['kernel', 'torch'])
def test_asym_small_alpha_large_lambda_approaches_max_pooling(impl):
    x = torch.randn(2, 4, 8, 8)
    ref = F.max_pool2d(x, 2)
    errs = []
    for tl in (0.0, 2.0, 4.0):
        out = dpp2d(x, torch.full((4,), -10.0), torch.full((4,), tl), reward='asym', impl=impl)
        errs.append((out - ref).abs().max().item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-2


@pytest.mark.parametrize('impl', ['kernel', 'torch'])
def test_huge_lambda_stays_finite(impl):
    """The common weight scale is factored out, so even lambda = e^6 does not overflow."""
    x = (torch.randn(1, 2, 6, 6) * 1e3).requires_grad_(True)
    for norm in ('mean', 'none', 'sum'):
        out = dpp2d(x, torch.zeros(2), torch.full((2,), 6.0), norm=norm, impl=impl)
        assert torch.isfinite(out).all()
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize('pool,kw', [(torch.nn.MaxPool2d, dict(kernel_size=3, stride=2, padding=1)),
                                     (torch.nn.MaxPool2d, dict(kernel_size=2, stride=2)),
                                     (torch.nn.AvgPool2d, dict(kernel_size=3, stride=2, ceil_mode=True)),
                                     (torch.nn.AvgPool2d, dict(kernel_size=2, stride=2, ceil_mode=True))])
@pytest.mark.parametrize('size', [7, 8, 9, 15, 16])
def test_output_shape_matches_torch_pooling(pool, kw, size):
    x = torch.randn(1, 3, size, size + 1)
    layer = DPP2d(3, kw['kernel_size'], kw['stride'], kw.get('padding', 0), kw.get('ceil_mode', False))
    assert layer(x).shape == pool(**kw)(x).shape


@pytest.mark.parametrize('size', [5, 6, 7, 8, 9])
def test_same_padding_shape_matches_timm(size):
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
    x = torch.randn(1, 3, size, size + 2)
    for k, s in ((3, 2), (2, 2), (3, 1)):
        layer = DPP2d(3, k, s, padding='same')
        assert layer(x).shape == MaxPool2dSame(k, s)(x).shape == AvgPool2dSame(k, s)(x).shape


def _tf_same(size: int, k: int, s: int):
    """TensorFlow's 'SAME' rule, written out here (not taken from the implementation): out = ceil(size / s),
    pad_total = max((out - 1) * s + k - size, 0), pad_before = pad_total // 2, pad_after = the rest."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2, total - total // 2


# (kernel, stride) pairs: odd and even windows, stride 1, a window smaller than its stride, a rectangular one
SAME_GEOMS = [((3, 3), (2, 2)), ((2, 2), (2, 2)), ((3, 3), (1, 1)), ((1, 1), (2, 2)), ((4, 4), (3, 3)),
              ((3, 2), (1, 2))]


@pytest.mark.parametrize('kernel,stride', SAME_GEOMS)
@pytest.mark.parametrize('size', [5, 6, 7, 8, 9])
def test_same_padding_follows_tensorflow_rule_and_timm(kernel, stride, size):
    """'same' padding against TensorFlow's rule derived independently (:func:`_tf_same`), timm's own
    MaxPool2dSame/AvgPool2dSame output shapes, and, with DPP set to average pooling, AvgPool2dSame's values: DPP
    averages the valid positions only, which is AvgPool2dSame(x) / AvgPool2dSame(ones) (timm pads with zeros
    and counts them), and AvgPool2dSame(x) itself wherever the window holds no padding."""
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    from dpp_surgery import PoolGeometry
    h, w = size, size + 2
    (oh, top, bottom), (ow, left, right) = (_tf_same(n, k, s) for n, k, s in zip((h, w), kernel, stride))
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    ones = torch.ones(1, 1, h, w, dtype=torch.float64)
    timm_avg, timm_max = AvgPool2dSame(kernel, stride), MaxPool2dSame(kernel, stride)
    assert timm_max(x).shape[-2:] == timm_avg(x).shape[-2:] == (oh, ow)  # the rule is timm's

    r = PoolGeometry.create(kernel, stride, 'same').resolve(h, w)
    assert r.out_size == (oh, ow)
    # a negative 'after' (k < s) crops positions that no window reaches; they pad nothing
    assert (r.pad_top, max(r.pad_bottom, 0), r.pad_left, max(r.pad_right, 0)) == (top, bottom, left, right)

    # average pooling by value: huge alpha (every weight alpha + ~1) and lambda -> 0 (every weight ~2)
    expected = timm_avg(x) / timm_avg(ones)
    for init in ((20000.0, 1e-8), (1.0, 1e-12)):
        layer = DPP2d(3, kernel, stride, padding='same', init=init).double()
        with torch.no_grad():
            out = layer(x)
        assert out.shape[-2:] == (oh, ow)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # windows that hold no padding: timm's own average, unscaled
    inner = timm_avg(ones)[0, 0] == 1
    torch.testing.assert_close(out[..., inner], timm_avg(x)[..., inner], rtol=1e-6, atol=1e-6)
    # and the same from the TensorFlow pads alone
    pads = (left, right, top, bottom)
    num = F.avg_pool2d(F.pad(x, pads), kernel, stride)
    den = F.avg_pool2d(F.pad(ones, pads), kernel, stride)
    torch.testing.assert_close(out, num / den, rtol=1e-6, atol=1e-6)
    # init='avg' (lambda = 0.0025: every weight within ~1% of the others) is close to it
    with torch.no_grad():
        near = DPP2d(3, kernel, stride, padding='same', init='avg').double()(x)
    torch.testing.assert_close(near, expected, rtol=0, atol=0.05)
