"""ONNX export (decomposed and custom modes) verified in real onnxruntime sessions."""
import os
import warnings

import numpy as np
import onnx
import pytest
import timm
import torch

from dpp_surgery import convert, dpp_layers, export_onnx, onnx_session
from dpp_surgery.export import OTHER_RUNTIMES, ExportWarning, verify_onnx
from dpp_surgery.tools.photos import load_photos


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
    # windows unfolded by one-hot grouped convolutions, the weights by Log/Exp: no per-element gathers
    assert {'Log', 'Exp', 'Conv', 'ReduceMean'} <= ops and not ops & {'Gather', 'GatherElements', 'GatherND'}
    assert all(n.domain in ('', 'ai.onnx') for n in graph.node)  # standard operators only
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField('dim_value')  # dynamic batch
    report = verify_onnx(model, path, base_size=(64, 64), images=list(load_photos().values()))
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


class _TiedToItsSize(torch.nn.Module):
    """A position embedding of the input's own size (as levit's attention biases, efficientformer's and vitamin's):
    the model runs at that size only."""

    def __init__(self, size=32):
        super().__init__()
        from dpp_surgery import DPP2d
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pos = torch.nn.Parameter(torch.randn(1, 4, size, size))
        self.pool = DPP2d(4)

    def forward(self, x):
        return self.pool(self.conv(x) + self.pos)


def test_models_tied_to_their_size_export_at_it(tmp_path):
    """torch.export accepts dynamic sizes for such a model, but the file would fail (or be wrong) at any other size:
    it is exported at the example's size with the ExportWarning, and verified there."""
    from dpp_surgery.export.onnx import _runs_at_other_sizes
    model = _TiedToItsSize().eval()
    assert not _runs_at_other_sizes(model, torch.randn(1, 3, 32, 32))
    assert _runs_at_other_sizes(_converted().eval(), torch.randn(1, 3, 64, 64))
    with pytest.warns(ExportWarning, match='fixed'):
        path = export_onnx(model, str(tmp_path / 'tied.onnx'), example_input=torch.randn(1, 3, 32, 32), min_size=8)
    report = verify_onnx(model, path, base_size=(32, 32))
    assert report['ok'] and not report['spatial_dynamic']
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField('dim_value') and [d.dim_value for d in dims[2:]] == [32, 32]


class _FusedAttention(torch.nn.Module):
    """timm's convention: ``fused_attn`` chooses F.scaled_dot_product_attention over matmul/softmax."""

    def __init__(self):
        super().__init__()
        from dpp_surgery import DPP2d
        self.fused_attn = True
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.pool = DPP2d(4)

    def forward(self, x):
        x = self.conv(x)
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        if self.fused_attn:
            t = torch.nn.functional.scaled_dot_product_attention(t, t, t)
        else:
            t = (t @ t.transpose(1, 2) / c ** 0.5).softmax(-1) @ t
        return self.pool(t.transpose(1, 2).reshape(n, c, h, w))


def test_fused_attention_that_fails_export_is_written_out(tmp_path, monkeypatch):
    """Where the ONNX exporter fails on timm's fused attention (nest, maxxvit), the export is retried with the same
    attention as matmul/softmax; the modules get their setting back, and a failure either way is the first one."""
    import dpp_surgery.export.onnx as exp
    model = _FusedAttention().eval()
    real = exp._to_onnx
    seen = []

    def fussy(program, *args, **kwargs):
        fused = any(n.target == torch.ops.aten.scaled_dot_product_attention.default
                    or 'scaled_dot_product' in str(n.target) for n in program.graph.nodes)
        seen.append(fused)
        if fused:
            raise exp.ExportError('ONNX conversion failed: AssertionError: only 4D query, key, and value are supported')
        return real(program, *args, **kwargs)

    monkeypatch.setattr(exp, '_to_onnx', fussy)
    path = export_onnx(model, str(tmp_path / 'attn.onnx'), example_input=torch.randn(1, 3, 8, 8), min_size=4)
    assert seen == [True, False] and model.fused_attn is True
    assert verify_onnx(model, path, base_size=(8, 8))['ok']
    monkeypatch.setattr(exp, '_to_onnx', lambda *a, **k: (_ for _ in ()).throw(exp.ExportError('always')))
    with pytest.raises(exp.ExportError, match='always'):
        export_onnx(model, str(tmp_path / 'never.onnx'), example_input=torch.randn(1, 3, 8, 8), min_size=4)
    assert model.fused_attn is True


@pytest.mark.slow
@pytest.mark.parametrize('name,size', [('levit_128s', 224), ('nest_tiny', 224), ('maxvit_pico_rw_256', 256)])
def test_timm_models_that_needed_a_fix_export(tmp_path, name, size):
    """Real models: levit (size-tied attention biases), nest (5-D fused attention), maxxvit (a view of the fused
    attention's output): converted, exported decomposed at their size, matching PyTorch."""
    model = _converted(name, size)
    with warnings.catch_warnings(record=True) as caught:  # (torch.export warns about levit's bias cache too)
        warnings.simplefilter('always')
        path = export_onnx(model, str(tmp_path / f'{name}.onnx'), example_input=torch.randn(1, 3, size, size))
    assert any(issubclass(w.category, ExportWarning) and 'fixed' in str(w.message) for w in caught)
    report = verify_onnx(model, path, base_size=(size, size), batches=(1,))
    assert report['ok'], report['worst']


def test_export_errors(tmp_path):
    model = _converted()
    with pytest.raises(ValueError, match="unsupported export mode 'fused'; supported modes: decomposed, custom"):
        export_onnx(model, str(tmp_path / 'x.onnx'), mode='fused')
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



@pytest.fixture(scope='module')
def custom_export(tmp_path_factory):
    """resnet18 converted with Full/asym DPP for its max pool and the default elsewhere, parameters perturbed,
    exported in custom mode with verification."""
    model = _converted(max_pool={'guide': 'full', 'reward': 'asym'})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in dpp_layers(model):
            layer.theta_alpha.copy_(torch.randn(layer.theta_alpha.shape, generator=gen))
            layer.theta_lambda.copy_(torch.randn(layer.theta_lambda.shape, generator=gen) * 0.5)
    path = str(tmp_path_factory.mktemp('custom') / 'r18_custom.onnx')
    export_onnx(model, path, mode='custom', example_input=torch.randn(1, 3, 64, 64), verify=True)
    return model, path


def test_custom_export_one_node_per_layer_with_functions(custom_export):
    from dpp_surgery.export import DPP_DOMAIN, DPP_OP, dpp_nodes
    model, path = custom_export
    proto = onnx.load(path)
    nodes = dpp_nodes(proto)
    layers = dpp_layers(model)
    assert len(nodes) == len(layers) > 1
    # geometry and variant as attributes; parameters as inputs
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes}
    full = [n for n in nodes if len(n.input) == 4]
    assert len(full) == 1  # the max pool's Full guide filter is the 4th input
    assert {'kernel_shape', 'strides', 'pads', 'auto_pad', 'ceil_mode', 'reward', 'norm', 'eps'} <= set(
        next(iter(attrs.values())))
    fa = {a.name: onnx.helper.get_attribute_value(a) for a in full[0].attribute}
    assert fa['kernel_shape'] == [3, 3] and fa['strides'] == [2, 2] and fa['reward'] == b'asym'
    # each configuration's decomposition is a model-local function overload, in standard operators only
    functions = {(f.domain, f.name, f.overload): f for f in proto.functions}
    for n in nodes:
        f = functions[(DPP_DOMAIN, DPP_OP, n.overload)]
        ops = {b.op_type for b in f.node}
        assert all(b.domain in ('', 'ai.onnx') for b in f.node)
        a = attrs[n.name]
        # square windows that tile the input: SpaceToDepth; other ones: strided slices stacked by Concat. Either:
        # reductions over the window axis, the window maximum (function bodies take the parameters as inputs, so they
        # keep the max-shift form) and the powers as Exp(Log)
        if a['kernel_shape'] == a['strides'] and a['kernel_shape'][0] == a['kernel_shape'][1]:
            assert 'SpaceToDepth' in ops, (a, sorted(ops))
        else:
            assert {'Slice', 'Concat'} <= ops and 'SpaceToDepth' not in ops, (a, sorted(ops))
        assert {'ReduceMean', 'ReduceMax', 'Log', 'Exp'} <= ops, (a, sorted(ops))
    assert proto.ir_version >= 10
    # everything else is standard
    assert all(n.domain in ('', 'ai.onnx', DPP_DOMAIN) for n in proto.graph.node)


def test_custom_export_verified_with_kernel_and_function(custom_export):
    model, path = custom_export
    report = verify_onnx(model, path, base_size=(64, 64), images=list(load_photos().values()))
    assert report['ok'] and report['spatial_dynamic']
    assert set(report['runtimes']) == {'kernel', 'function'}
    for runtime in ('kernel', 'function'):
        rows = [r for r in report['rows'] if r['runtime'] == runtime]
        assert {tuple(r['size']) for r in rows} == {(64, 64), (65, 65)} and {r['batch'] for r in rows} == {1, 8}
        assert max(r['max_rel_error'] for r in rows) <= 1e-4
    x = torch.randn(2, 3, 99, 70)
    with torch.no_grad():
        ref = model(x).numpy()
    for native in (True, False):
        sess = onnx_session(path, threads=2, native=native)
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


def _profiled_ops(path, native, tmp_path):
    import json
    sess = onnx_session(path, threads=1, native=native, profile=True)
    sess.run(None, {sess.get_inputs()[0].name: np.random.randn(1, 3, 64, 64).astype(np.float32)})
    profile = sess.end_profiling()
    with open(profile) as f:
        events = json.load(f)
    os.unlink(profile)
    return {e['args'].get('op_name') for e in events if e.get('cat') == 'Node'}


def _assert_matches_model(sess, model, shape=(2, 3, 64, 64), seed=3, rtol=1e-4):
    """The session's output on a random input (not zeros: a constant input hides most of what a wrong function
    computes) matches the PyTorch model's to ``rtol`` of its largest value."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x).numpy()
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert out.shape == ref.shape
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert np.isfinite(out).all() and err <= rtol, f'the session differs from PyTorch: max rel error {err:.3g}'


def test_native_kernel_runs_the_nodes_and_falls_back(custom_export, tmp_path, monkeypatch):
    from dpp_surgery.native import ort_kernel
    model, path = custom_export
    assert 'DPP2d' in _profiled_ops(path, True, tmp_path)  # the kernel ran the DPP2d nodes
    inlined = _profiled_ops(path, False, tmp_path)
    assert 'DPP2d' not in inlined and {'Log', 'Exp'} <= inlined  # the function was inlined
    # no kernel: a clear error when it is required, one warning and the function otherwise
    monkeypatch.setenv('DPP_SURGERY_NO_ORT_KERNEL', '1')
    ort_kernel._reset()
    try:
        with pytest.raises(RuntimeError, match='native onnxruntime DPP2d kernel is unavailable: disabled by'):
            onnx_session(path, native=True)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', ort_kernel.OrtKernelWarning)
            sess = onnx_session(path)
        _assert_matches_model(sess, model)  # the functions the file carries compute the model
    finally:
        monkeypatch.delenv('DPP_SURGERY_NO_ORT_KERNEL')
        ort_kernel._reset()


def _native_and_function_sessions(path):
    """Two sessions for one custom-mode file: the native kernel's and the ONNX functions' (skips if the kernel
    cannot be built here)."""
    from dpp_surgery.native import ort_kernel
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ort_kernel.OrtKernelWarning)
        status = ort_kernel.ort_kernel_status()
    if not status['loaded']:
        pytest.skip(f'the native onnxruntime DPP2d kernel cannot be built here: {status["error"]}')
    return onnx_session(path, threads=2, native=True), onnx_session(path, threads=2, native=False)


def _assert_same_outputs(native, function, x):
    name = native.get_inputs()[0].name
    outs = native.run(None, {name: x}), function.run(None, {name: x})
    assert len(outs[0]) == len(outs[1]) >= 1
    for a, b in zip(*outs):
        assert a.shape == b.shape
        # float32 the two ways: the fused kernel and the decomposition agree to a few roundings of the outputs
        err = np.abs(a - b).max() / np.abs(b).max()
        assert np.isfinite(a).all() and err <= 2e-6, (x.shape, a.shape, err)


class _DPPBranches(torch.nn.Module):
    """A conv and the DPP geometries and variants resnet18's file lacks: timm's 'same' padding (split unevenly at
    some sizes) with a Full guide and norm='none', and a non-square ceil_mode window with stride 1 across and
    norm='sum'. Side by side, each its own output (so that torch.export keeps the spatial sizes dynamic)."""

    def __init__(self):
        super().__init__()
        from dpp_surgery import DPP2d
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.pools = torch.nn.ModuleList([DPP2d(6, 3, 2, 'same', guide='full', norm='none'),
                                          DPP2d(6, (3, 2), (2, 1), 0, ceil_mode=True, reward='asym', norm='sum')])

    def forward(self, x):
        y = self.conv(x)
        return tuple(pool(y) for pool in self.pools)


def test_native_kernel_matches_function_in_onnxruntime(custom_export, tmp_path):
    """The same custom-mode file run by the native kernel and by its ONNX functions gives the same outputs, compared
    with each other (not only each with PyTorch): resnet18's DPP layers (3x3 Full/asym with padding, 2x2 ceil_mode)
    and the rest of the geometries and variants, at even and odd sizes (they change the windows that hang over the
    edge and how 'same' padding is split)."""
    _, path = custom_export
    native, function = _native_and_function_sessions(path)
    assert 'DPP2d' in _profiled_ops(path, True, tmp_path)  # the kernel runs the nodes, the function does not
    assert 'DPP2d' not in _profiled_ops(path, False, tmp_path)
    gen = np.random.default_rng(0)
    for shape in [(2, 3, 64, 64), (1, 3, 65, 65), (1, 3, 67, 96)]:
        _assert_same_outputs(native, function, gen.standard_normal(shape, dtype=np.float32))

    net = _DPPBranches().eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for pool in net.pools:
            pool.theta_alpha.copy_(torch.randn(pool.theta_alpha.shape, generator=g))
            pool.theta_lambda.copy_(torch.randn(pool.theta_lambda.shape, generator=g) * 0.5)
            if pool.guide_weight is not None:
                pool.guide_weight.add_(0.1 * torch.randn(pool.guide_weight.shape, generator=g))
    path = export_onnx(net, str(tmp_path / 'branches.onnx'), mode='custom', example_input=torch.randn(1, 3, 32, 32),
                       min_size=8)
    from dpp_surgery.export import dpp_nodes
    assert len(dpp_nodes(onnx.load(path))) == len(net.pools)
    native, function = _native_and_function_sessions(path)
    for shape in [(2, 3, 32, 32), (1, 3, 33, 33), (3, 3, 31, 48), (1, 3, 9, 20)]:
        _assert_same_outputs(native, function, gen.standard_normal(shape, dtype=np.float32) * 10)


def test_kernel_build_failure_warns_and_falls_back(custom_export, tmp_path, monkeypatch):
    from dpp_surgery.native import ort_kernel
    model, path = custom_export
    monkeypatch.setenv('ORT_INCLUDE_DIR', str(tmp_path))  # no headers there
    ort_kernel._reset()
    try:
        with pytest.warns(ort_kernel.OrtKernelWarning, match=r'ORT_INCLUDE_DIR=.* has no onnxruntime_c_api.h'):
            sess = onnx_session(path)
        _assert_matches_model(sess, model, shape=(1, 3, 65, 71))
    finally:
        monkeypatch.delenv('ORT_INCLUDE_DIR')
        ort_kernel._reset()


def _perturb_initializer(path, out_path, shape):
    """A copy of the ONNX file at ``path`` with one weight element of the initializer of ``shape`` changed."""
    from onnx import numpy_helper
    m = onnx.load(path)
    init = next(i for i in m.graph.initializer if tuple(i.dims) == tuple(shape))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.5 * np.abs(arr).max() + 0.1
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(m, out_path)
    return out_path


def test_verify_onnx_reports_a_file_that_differs_from_the_model(tmp_path, monkeypatch):
    """verify_onnx's ``ok`` can be False: a file with one weight changed is reported, with the worst row named,
    and ``export_onnx(verify=True)`` raises ExportError on it (here its writer changes the weight)."""
    from dpp_surgery import DPP2d
    from dpp_surgery.export import ExportError
    import dpp_surgery.export.onnx as exp
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), DPP2d(8, 2), torch.nn.Conv2d(8, 4, 1)).eval()
    path = export_onnx(net, str(tmp_path / 'net.onnx'), example_input=torch.randn(1, 3, 16, 16), min_size=8)
    good = verify_onnx(net, path, base_size=(16, 16))
    assert good['ok'] and good['worst']['max_rel_error'] <= 1e-5
    bad = verify_onnx(net, _perturb_initializer(path, str(tmp_path / 'bad.onnx'), (8, 3, 3, 3)), base_size=(16, 16))
    assert not bad['ok'] and not any(r['ok'] for r in bad['rows'])
    worst = bad['worst']
    assert worst is max(bad['rows'], key=lambda r: r['max_rel_error']) and worst['max_rel_error'] > 1e-2
    assert worst['runtime'] == 'onnxruntime' and worst['input'] == 'random'

    real_write = exp._write

    def write_then_change_a_weight(exported, out, overwrite):
        real_write(exported, out, overwrite)
        _perturb_initializer(out, out, (8, 3, 3, 3))

    monkeypatch.setattr(exp, '_write', write_then_change_a_weight)
    target = str(tmp_path / 'verified.onnx')
    with pytest.raises(ExportError, match=r'verified\.onnx: onnxruntime differs from PyTorch: .*max_rel_error'):
        export_onnx(net, target, example_input=torch.randn(1, 3, 16, 16), min_size=8, verify=True)


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='no ONNX file at'):
        onnx_session(str(tmp_path / 'missing.onnx'))


def test_coverage_export_columns():
    from dpp_surgery.tools.coverage import check_family, export_check, summarize
    result = check_family('resnet', size=64, extra_checks=[export_check])
    assert result.status == 'ok'
    for mode in ('decomposed', 'custom'):
        assert result.extra[f'onnx_{mode}'] == 'yes'
        err, verdict = result.extra[f'parity_{mode}'].split()
        assert verdict == 'ok' and float(err) <= 1e-4
    text = summarize([result])
    assert 'ONNX custom: 1 of 1 converted models export, 1 match PyTorch within 1e-4' in text


# (the alarm may land in a weakref callback, where Python reports the exception as unraisable and goes on; the limit
# then fires again and fails the export at its end, which is what this test checks)
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_coverage_export_time_limit():
    """An export that runs past the coverage benchmark's limit is recorded as failed with the reason, and the
    alarm is gone afterwards."""
    import signal
    from dpp_surgery.tools.coverage import export_check
    model = timm.create_model('test_resnet')
    convert(model, input_size=(3, 64, 64))
    handler = signal.getsignal(signal.SIGALRM)
    outer = signal.getitimer(signal.ITIMER_REAL)[0]  # pytest-timeout's own alarm, if it uses one
    out = export_check('test_resnet', model, (3, 64, 64), timeout=0.05)
    for mode in ('decomposed', 'custom'):
        assert out[f'onnx_{mode}'].startswith('no: ExportTimeout: export and check took longer than 0.05 s')
        assert out[f'parity_{mode}'] == ''
    # the outer alarm and its handler are back, with the time it had left
    assert signal.getsignal(signal.SIGALRM) is handler
    remaining = signal.getitimer(signal.ITIMER_REAL)[0]
    assert (remaining == 0.0) if not outer else (0 < remaining <= outer)


_GEOMETRY_CYCLE = [(2, 2, 0, False), (2, 2, 1, True), (2, 2, 'same', False), (3, 2, 1, False),
                   ((3, 2), (2, 1), 0, True), (3, 2, 'same', False)]
_VARIANTS = [(g, r, n) for g in ('lite', 'full') for r in ('sym', 'asym') for n in ('mean', 'none', 'sum')]


class _EveryVariant(torch.nn.Module):
    """Every variant and norm, each in two geometries (tiling windows with and without padding or ceil_mode,
    overlapping ones), side by side."""

    def __init__(self):
        super().__init__()
        from dpp_surgery import DPP2d
        cycle = _GEOMETRY_CYCLE
        self.pools = torch.nn.ModuleList([
            DPP2d(3, k, s, p, ceil_mode=c, guide=g, reward=r, norm=n)
            for i, (g, r, n) in enumerate(_VARIANTS) for k, s, p, c in (cycle[i % 6], cycle[(i + 3) % 6])])

    def forward(self, x):
        return tuple(pool(x) for pool in self.pools)


@pytest.fixture(scope='module')
def every_variant(tmp_path_factory):
    """Every variant, norm and geometry (24 DPP layers, seeded), exported decomposed with dynamic sizes."""
    torch.manual_seed(0)
    net = _EveryVariant().eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # parameters away from the init
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    folder = tmp_path_factory.mktemp('every')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        path = export_onnx(net, str(folder / 'every.onnx'), mode='decomposed', example_input=torch.randn(1, 3, 16, 16),
                           min_size=8)
    return net, path


def _assert_every_variant_matches(net, run, shape):
    x = torch.randn(*shape)
    outs = run(x.numpy())
    with torch.no_grad():
        refs = net(x)
    assert len(outs) == len(refs) == 24
    for i, (out, ref) in enumerate(zip(outs, refs)):
        np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-5, err_msg=f'layer {i} at {shape}')


@pytest.mark.parametrize('dynamic', [True, pytest.param(False, marks=pytest.mark.slow)], ids=['dynamic', 'fixed'])
def test_decomposed_operators_are_the_listed_ones(tmp_path, every_variant, dynamic):
    """The decomposition's operators are DECOMPOSED_OPS (the README's list): a new one, or one no longer used, fails
    here. Decomposed files carry no functions, and every layer's output matches PyTorch in onnxruntime."""
    from dpp_surgery.export import DECOMPOSED_OPS
    net, path = every_variant
    if not dynamic:
        torch.manual_seed(0)
        net = _EveryVariant().eval()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            path = export_onnx(net, str(tmp_path / 'every.onnx'), mode='decomposed',
                               example_input=torch.randn(1, 3, 16, 16), min_size=8, dynamic=False)
    proto = onnx.load(path)
    ops = {n.op_type for n in proto.graph.node}
    assert all(n.domain in ('', 'ai.onnx') for n in proto.graph.node) and not proto.functions
    if dynamic:
        assert ops == DECOMPOSED_OPS, (sorted(ops - DECOMPOSED_OPS), sorted(DECOMPOSED_OPS - ops))
    else:
        assert ops <= DECOMPOSED_OPS, sorted(ops - DECOMPOSED_OPS)
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    for shape in [(2, 3, 16, 16), (1, 3, 17, 13)] if dynamic else [(1, 3, 16, 16)]:
        _assert_every_variant_matches(net, lambda x: session.run(None, {name: x}), shape)


@pytest.mark.parametrize('runtime', OTHER_RUNTIMES)
def test_decomposed_file_runs_in_other_runtimes(every_variant, runtime, other_runtime):
    """Standard operators run as written outside onnxruntime: every variant, norm and geometry of the decomposed
    file in OpenVINO and tract, at even and odd sizes, matches PyTorch."""
    net, path = every_variant
    for shape in [(2, 3, 16, 16), (1, 3, 17, 13)]:
        _assert_every_variant_matches(net, lambda x: other_runtime(path, runtime, x), shape)


@pytest.fixture(scope='module')
def decomposed_resnet(tmp_path_factory):
    """resnet18 converted with the default policy (DPP for its max pool and strided convolutions), decomposed."""
    model = _converted()
    path = str(tmp_path_factory.mktemp('r18') / 'r18.onnx')
    export_onnx(model, path, example_input=torch.randn(1, 3, 64, 64))
    return model, path


@pytest.mark.parametrize('runtime', OTHER_RUNTIMES)
def test_converted_model_runs_in_other_runtimes(decomposed_resnet, runtime, other_runtime):
    """A converted timm model's decomposed file in OpenVINO and tract: the model's own operators and the DPP layers
    together, at the export size and at odd sizes, within 1e-4 of PyTorch."""
    model, path = decomposed_resnet
    for shape in [(1, 3, 64, 64), (2, 3, 65, 71)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x).numpy()
        out = other_runtime(path, runtime, x.numpy())[0]
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4, (runtime, shape)


def test_runtime_session_errors(decomposed_resnet, custom_export, tmp_path, monkeypatch):
    from dpp_surgery.export import RuntimeUnavailableError, runtime_session
    from dpp_surgery.export import runtimes
    _, path = decomposed_resnet
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'; supported runtimes: onnxruntime, openvino, "
                                         'tract'):
        runtime_session(path, 'tensorrt', (1, 3, 64, 64))
    with pytest.raises(ValueError, match=r'input_shape must be four positive integers \(N, C, H, W\), but got '
                                         r'\[1, 3, 64\]'):
        runtime_session(path, 'openvino', (1, 3, 64))
    with pytest.raises(ValueError, match='threads must be >= 1, but got 0'):
        runtime_session(path, 'tract', (1, 3, 64, 64), threads=0)
    with pytest.raises(FileNotFoundError, match='no ONNX file at .*missing.onnx; write one with'):
        runtime_session(str(tmp_path / 'missing.onnx'), 'openvino', (1, 3, 64, 64))
    with pytest.raises(ValueError, match="holds dpp_surgery.DPP2d nodes .* only onnxruntime runs; export with "
                                         "mode='decomposed' for openvino"):
        runtime_session(custom_export[1], 'openvino', (1, 3, 64, 64))
    monkeypatch.setitem(runtimes._PACKAGE, 'tract', 'dpp_surgery_no_such_package')
    with pytest.raises(RuntimeUnavailableError, match=r"tract is not installed .*: pip install "
                                                      r"'dpp_surgery\[runtimes\]' \(or pip install "
                                                      r'dpp_surgery_no_such_package\)'):
        runtime_session(path, 'tract', (1, 3, 64, 64))
