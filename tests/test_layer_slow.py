"""Slow sweeps (``make test-slow``): large shapes and many more property examples."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpp_surgery import DPP2d
from test_layer_properties import geometry_and_input
from test_layer_reference import GEOMETRIES, VARIANTS

pytestmark = pytest.mark.slow


@pytest.mark.parametrize('geometry', list(GEOMETRIES), ids=list(GEOMETRIES))
def test_kernel_matches_torch_path_at_network_sizes(geometry):
    kernel, stride, padding, ceil_mode = GEOMETRIES[geometry]
    x = torch.randn(4, 64, 57, 55)
    for guide, reward, norm in VARIANTS:
        layer = DPP2d(64, kernel, stride, padding, ceil_mode, guide=guide, reward=reward, norm=norm)
        with torch.no_grad():
            layer.theta_alpha.normal_(0, 1)
            layer.theta_lambda.normal_(0, 1)
        layer.impl = 'torch'
        ref = layer.double()(x.double())
        layer.float()
        for fmt in (torch.contiguous_format, torch.channels_last):
            layer.impl = 'kernel'
            out = layer(x.contiguous(memory_format=fmt))
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            assert err <= 1e-5, (guide, reward, norm, fmt, err)


@pytest.mark.parametrize('impl', ['kernel', 'torch'])
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=geometry_and_input(), guide=st.sampled_from(['lite', 'full']),
       reward=st.sampled_from(['sym', 'asym']), norm=st.sampled_from(['mean', 'none', 'sum']),
       theta=st.tuples(st.floats(-5, 5), st.floats(-5, 4)))
def test_finite_and_within_window_many(impl, case, guide, reward, norm, theta):
    from test_layer_properties import test_finite_and_within_window
    test_finite_and_within_window.hypothesis.inner_test(impl, case, guide, reward, norm, theta)
