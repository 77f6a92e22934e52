"""ONNX export (decomposed mode) verified in real onnxruntime sessions."""
import warnings

import numpy as np
import onnx
import pytest
import timm
import torch

from dpp_surgery import convert, export_onnx, onnx_session
from dpp_surgery.export import ExportWarning, verify_onnx


def _converted(name='resnet18', size=64, **policy):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    convert(model, input_size=(3, size, size), **policy)
    return model


def test_decomposed_export_dynamic_and_verified(tmp_path):
    model = _converted(placement='post', max_pool={'guide': 'full', 'reward': 'asym'})
    path = export_onnx(model, str(tmp_path / 'r18.onnx'), example_input=torch.randn(1, 3, 64, 64), verify=True)
    graph = onnx.load(path).graph
    ops = {n.op_type for n in graph.node}
    assert {'Log', 'Exp', 'Slice'} <= ops and not ops & {'Gather', 'GatherElements', 'GatherND'}
    assert all(n.domain in ('', 'ai.onnx') for n in graph.node)  # standard operators only
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField('dim_value')  # dynamic batch
    report = verify_onnx(model, path, base_size=(64, 64))
    assert report['ok'] and report['spatial_dynamic']
    assert {tuple(r['size']) for r in report['rows']} == {(64, 64), (65, 65)}
    assert {r['batch'] for r in report['rows']} == {1, 8}
    assert {r['input'] for r in report['rows']} == {'random', 'photo'}
    assert max(r['max_rel_error'] for r in report['rows']) <= 1e-4
    sess = onnx_session(path, threads=2)
    x = torch.randn(3, 3, 97, 81)  # any size
    with torch.no_grad():
        ref = model(x).numpy()
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


def test_same_padding_models_export_with_fixed_spatial_size(tmp_path):
    model = _converted('tf_efficientnet_b0', 65)
    with pytest.warns(ExportWarning, match='fixed'):
        path = export_onnx(model, str(tmp_path / 'tf.onnx'), example_input=torch.randn(1, 3, 65, 65))
    report = verify_onnx(model, path, base_size=(65, 65))
    assert report['ok'] and not report['spatial_dynamic']


def test_export_errors(tmp_path):
    model = _converted()
    with pytest.raises(ValueError, match="unsupported export mode 'custom'; supported modes: decomposed"):
        export_onnx(model, str(tmp_path / 'x.onnx'), mode='custom')
    with pytest.raises(ValueError, match='unsupported opset 17; supported opsets: 18 to 23'):
        export_onnx(model, str(tmp_path / 'x.onnx'), opset=17)
    (tmp_path / 'exists.onnx').write_bytes(b'x')
    with pytest.raises(FileExistsError):
        export_onnx(model, str(tmp_path / 'exists.onnx'), example_input=torch.randn(1, 3, 64, 64), dynamic=False)


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_failing_module_is_named(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), _DataDependent())
    from dpp_surgery.export import ExportError
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ExportError, match=r"torch.export failed in module '1'"):
            export_onnx(model, str(tmp_path / 'x.onnx'), example_input=torch.randn(1, 3, 16, 16))
