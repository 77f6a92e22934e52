"""GlobalDPP2d: DPP over the whole map (convert(..., skip_global=False)), its values and its ONNX export.

A global layer once kept DPP2d's default 2x2 geometry and was exported as a 2x2 ``DPP2d`` node: the file was silently
wrong at every size whose last map is not 2x2 (resnet18 at 96 px: relative error 0.026)."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import timm
import torch

import dpp_surgery
from dpp_surgery import DPP2d, GlobalDPP2d, dpp2d


def test_global_layer_pools_the_whole_map_at_any_size():
    torch.manual_seed(0)
    layer = GlobalDPP2d(6, reward='asym', norm='sum', init=(0.5, 2.0))
    assert repr(layer) == 'GlobalDPP2d(6, global, guide=lite, reward=asym, norm=sum)'
    for h, w in ((7, 9), (2, 2), (1, 5)):
        x = torch.randn(3, 6, h, w)
        want = dpp2d(x, layer.theta_alpha, layer.theta_lambda, (h, w), 1, 0, reward='asym', norm='sum')
        got = layer(x)
        assert got.shape == (3, 6, 1, 1) and torch.equal(got, want)
        # a convex combination of the whole map, per channel
        assert (got.flatten(1) <= x.flatten(2).amax(-1) + 1e-6).all()
        assert (got.flatten(1) >= x.flatten(2).amin(-1) - 1e-6).all()
    assert isinstance(layer, DPP2d) and len(dpp_surgery.dpp_parameters(torch.nn.Sequential(layer))) == 2


def test_earlier_name_still_unpickles():
    import importlib
    convert_module = importlib.import_module('dpp_surgery.surgery.convert')
    layer = pickle.loads(pickle.dumps(GlobalDPP2d(4)))
    assert type(layer) is GlobalDPP2d and convert_module._GlobalDPP2d is GlobalDPP2d


def _converted(size: int):
    torch.manual_seed(0)
    model = timm.create_model('resnet18', pretrained=False, num_classes=10).eval()
    dpp_surgery.convert(model, input_size=(3, size, size), skip_global=False)
    assert type(model.global_pool.pool) is GlobalDPP2d
    return model


@pytest.mark.parametrize('reward', ['sym', 'asym'])
@pytest.mark.parametrize('norm', ['mean', 'none', 'sum'])
def test_export_form_computes_the_layer(reward, norm):
    """The form export records (reductions over the map, nothing tied to its size) against the layer's own path."""
    from dpp_surgery.layers.functional import global_dpp2d
    torch.manual_seed(0)
    layer = GlobalDPP2d(6, reward=reward, norm=norm)
    with torch.no_grad():
        layer.theta_alpha.normal_(0, 0.5)
        layer.theta_lambda.normal_(0, 0.5)
    for shape in ((2, 6, 7, 9), (1, 6, 1, 1), (3, 6, 4, 4)):
        x = torch.randn(*shape, dtype=torch.float64)
        want = layer.double()(x)
        got = global_dpp2d(x, layer.theta_alpha, layer.theta_lambda, reward=reward, norm=norm, eps=layer.eps)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('mode', ['custom', pytest.param('decomposed', marks=pytest.mark.slow)])
def test_global_layer_exports_with_dynamic_sizes(tmp_path, mode):
    """Exported at 64 px (where the last map is 2x2, which once hid a fixed 2x2 window), the file runs at 64, 96 and
    97 px within 1e-4 of PyTorch, and no ExportWarning says it was pinned to one size."""
    import onnx

    from dpp_surgery.export import ExportWarning
    model = _converted(64)
    path = str(tmp_path / f'{mode}.onnx')
    with warnings.catch_warnings():
        warnings.simplefilter('error', ExportWarning)
        dpp_surgery.export_onnx(model, path, mode=mode, example_input=torch.randn(1, 3, 64, 64))
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == 'DPP2d']
    # the global layer is never a fixed-window node: only the 4 windowed layers are (custom mode)
    assert len(nodes) == (4 if mode == 'custom' else 0)
    session = dpp_surgery.onnx_session(path)
    for size in (64, 96, 97):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), size


CASES = [pytest.param(mode, size, marks=() if (mode, size) == ('custom', 96) else pytest.mark.slow)
         for mode in ('custom', 'decomposed') for size in (64, 96, 97)]


@pytest.mark.parametrize('mode,size', CASES)
def test_global_layer_exports_correctly(tmp_path, mode, size):
    import onnx

    from dpp_surgery.export.onnx import verify_onnx
    model = _converted(size)
    path = str(tmp_path / f'{mode}.onnx')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the fixed-size ExportWarning is checked below
        dpp_surgery.export_onnx(model, path, mode=mode, example_input=torch.randn(1, 3, size, size))
    report = verify_onnx(model, path, base_size=(size, size), batches=(2,))
    assert report['ok'], report['worst']
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == 'DPP2d']
    # the global layer is never a fixed-window node: only the 4 windowed layers are (custom mode)
    assert len(nodes) == (4 if mode == 'custom' else 0)
    session = dpp_surgery.onnx_session(path)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = model(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_every_layer_class_is_a_timm_fx_leaf():
    """Registered where each is defined, so timm's FX feature extraction keeps every DPP layer one node."""
    from timm.layers import is_notrace_module

    from dpp_surgery import DPP2d, S3DPP2d, dpp_aa_layer
    for cls in (DPP2d, GlobalDPP2d, S3DPP2d, dpp_aa_layer(guide='full')):
        assert is_notrace_module(cls), cls
