"""DPP2d as a module: dtypes, layouts, torch.compile, state_dict, repr, init presets, parameter groups, errors."""
import io

import pytest
import torch
import torch.nn.functional as F

from dpp_surgery import DPP2d, INIT_PRESETS, dpp2d, kernel_status, param_groups
from dpp_surgery.layers import NonFiniteParameterError
from groups import check_param_groups


def test_kernel_builds_here():
    status = kernel_status()
    assert status['loaded'], status['error']


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('guide', ['lite', 'full'])
def test_autocast_low_precision_close_to_float32(dtype, guide):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), DPP2d(8, 3, 2, 1, guide=guide))
    x = torch.randn(2, 3, 17, 16)
    ref = model(x)
    with torch.autocast('cpu', dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_low_precision_input_keeps_dtype(dtype):
    x = torch.randn(2, 4, 8, 8)
    layer = DPP2d(4)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), layer(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_cpu_low_precision_runs_the_kernel_on_a_float32_copy(dtype, layout):
    """Autocast's float16/bfloat16 activations take the fused kernel (on a float32 copy), not the PyTorch path: the
    same values and gradients as the PyTorch path computes from the same low-precision input, in its dtype."""
    from dpp_surgery.layers import functional
    torch.manual_seed(0)
    layers = {impl: DPP2d(16, 3, 2, 1, guide='full', reward='asym', impl=impl) for impl in ('kernel', 'torch')}
    layers['torch'].load_state_dict(layers['kernel'].state_dict())
    x = torch.randn(2, 16, 13, 12).to(dtype).contiguous(memory_format=layout)
    assert functional._choose(x, layers['kernel'].geometry.resolve(13, 12), 'auto') == 'kernel'
    outs, grads = {}, {}
    for impl, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        outs[impl] = layer(xi)
        grads[impl] = torch.autograd.grad(outs[impl].float().sum(), [xi, *layer.parameters()])
    assert outs['kernel'].dtype == dtype and grads['kernel'][0].dtype == dtype
    torch.testing.assert_close(outs['kernel'], outs['torch'])  # (float32 arithmetic in both, then rounded)
    for a, b in zip(grads['kernel'], grads['torch']):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_cpu_autocast_runs_the_kernel(monkeypatch):
    """Under CPU bfloat16 autocast (what amp='auto' picks on a CPU with native bfloat16) DPP2d calls the kernel."""
    from dpp_surgery.layers import functional
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), DPP2d(8))
    chosen = []
    real = functional._choose

    def spy(x, r, impl):
        chosen.append((x.dtype, real(x, r, impl)))
        return chosen[-1][1]

    monkeypatch.setattr(functional, '_choose', spy)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(torch.randn(2, 3, 16, 16))
    assert chosen == [(torch.bfloat16, 'kernel')]


@pytest.mark.parametrize('impl', ['kernel', 'torch'])
def test_channels_last_equals_contiguous(impl):
    layer = DPP2d(16, 3, 2, 1, guide='full', reward='asym', impl=impl)
    x = torch.randn(2, 16, 13, 12)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    xn = x.clone().requires_grad_(True)
    out_c, out_n = layer(xc), layer(xn)
    torch.testing.assert_close(out_c, out_n, rtol=1e-6, atol=1e-6)
    if impl == 'kernel':
        assert out_c.is_contiguous(memory_format=torch.channels_last)
    out_c.sum().backward()
    out_n.sum().backward()
    torch.testing.assert_close(xc.grad, xn.grad, rtol=1e-5, atol=1e-6)


def test_non_contiguous_input():
    x = torch.randn(2, 8, 10, 12).transpose(2, 3)
    layer = DPP2d(8)
    torch.testing.assert_close(layer(x), layer(x.contiguous()))


def test_torch_compile_model_with_dpp():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), DPP2d(8, guide='full'),
                                torch.nn.Conv2d(8, 4, 1), DPP2d(4, 3, 2, 1, reward='asym'))
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    compiled = torch.compile(model)
    out = compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref.sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def _compiled_ops(layer, x):
    """The output and gradients of ``layer`` under torch.compile, and the call targets of the graph Dynamo traced."""
    torch._dynamo.reset()
    targets = []

    def backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes if node.op == 'call_function')
        return gm.forward

    x = x.clone().requires_grad_(True)
    out = torch.compile(layer, backend=backend, fullgraph=True)(x)
    grads = torch.autograd.grad(out.sum(), [x, layer.theta_alpha, layer.theta_lambda])
    torch._dynamo.reset()
    return out, grads, targets


@pytest.mark.parametrize('args, kwargs, pooled', [
    ((2,), {}, True),
    ((2, 2, 0, True), {'reward': 'asym', 'norm': 'sum'}, True),  # ceil_mode: the masked pooled form
    ((2,), {'guide': 'full'}, False),  # (the Full guide's pooled form compiles slower: stacked)
    ((3, 2, 1), {}, False),  # overlapping windows: only the stacked form exists
], ids=['lite', 'lite-ceil-asym-sum', 'full', '3x3s2'])
def test_torch_compile_runs_pooled_form_for_tiling_lite_windows(args, kwargs, pooled):
    """Under torch.compile, the PyTorch path computes tiling Lite windows by pooling (the faster compiled form) and
    everything else over the stacked windows, with the eager stacked form's values and gradients."""
    torch.manual_seed(0)
    layer = DPP2d(3, *args, impl='torch', **kwargs)
    with torch.no_grad():
        layer.theta_alpha.uniform_(-1, 1)
        layer.theta_lambda.uniform_(-1, 1)
    x = torch.randn(2, 3, 9, 10)
    out, grads, targets = _compiled_ops(layer, x)
    assert (F.avg_pool2d in targets) == pooled, targets
    xe = x.clone().requires_grad_(True)
    ref = layer(xe)
    ref_grads = torch.autograd.grad(ref.sum(), [xe, layer.theta_alpha, layer.theta_lambda])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings('ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning')  # opcheck's own
def test_torch_library_opcheck():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    alpha = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    lam = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    torch.library.opcheck(torch.ops.dpp_surgery.dpp2d.default, (x, None, alpha, lam, [2, 2, 2, 2, 0, 0, 3, 3],
                                                               False, 1, 1e-3))


def test_state_dict_round_trip():
    layer = DPP2d(6, 3, 2, 1, guide='full', reward='asym', norm='sum')
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = DPP2d(6, 3, 2, 1, guide='full', reward='asym', norm='sum')
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
    assert set(layer.state_dict()) == {'theta_alpha', 'theta_lambda', 'guide_weight'}
    assert set(DPP2d(3).state_dict()) == {'theta_alpha', 'theta_lambda'}


def test_parameters_shapes_and_init_presets():
    layer = DPP2d(7)
    assert layer.theta_alpha.shape == layer.theta_lambda.shape == (7,)
    torch.testing.assert_close(layer.alpha, torch.ones(7))
    torch.testing.assert_close(layer.lam, torch.ones(7))
    for name, (ta, tl) in INIT_PRESETS.items():
        layer = DPP2d(3, init=name, reward='asym')
        assert torch.all(layer.theta_alpha == ta) and torch.all(layer.theta_lambda == tl)
    layer = DPP2d(3, init=(0.5, 2.0))
    torch.testing.assert_close(layer.alpha, torch.full((3,), 0.5))
    torch.testing.assert_close(layer.lam, torch.full((3,), 2.0))


def test_init_presets_are_close_to_their_pooling():
    x = torch.randn(4, 8, 16, 16)
    scale = x.abs().max()
    avg_err = (DPP2d(8, init='avg')(x) - F.avg_pool2d(x, 2)).abs().max() / scale
    max_err = (DPP2d(8, init='max', reward='asym')(x) - F.max_pool2d(x, 2)).abs().max() / scale
    paper_avg = (DPP2d(8)(x) - F.avg_pool2d(x, 2)).abs().max() / scale
    assert avg_err < 0.01 < paper_avg
    assert max_err < 0.05


def test_repr_shows_variant_norm_and_geometry():
    assert repr(DPP2d(64)) == 'DPP2d(64, kernel_size=2, stride=2, guide=lite, reward=sym, norm=mean)'
    text = repr(DPP2d(32, 3, 2, 1, ceil_mode=True, guide='full', reward='asym', norm='sum'))
    assert text == 'DPP2d(32, kernel_size=3, stride=2, padding=1, ceil_mode=True, guide=full, reward=asym, norm=sum)'
    assert "padding='same'" in repr(DPP2d(8, 3, 2, 'same'))
    assert 'kernel_size=3x2' in repr(DPP2d(8, (3, 2), (2, 1)))


def test_param_groups_keep_dpp_free_of_weight_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), DPP2d(8, guide='full'),
                                torch.nn.Conv2d(8, 4, 1), DPP2d(4, 3, 2, 1, reward='asym'))
    groups = param_groups(model, weight_decay=0.05, dpp_lr_scale=0.5, lr=0.1)
    # every parameter in exactly one group; theta_alpha and theta_lambda of both layers in the DPP group only,
    # without weight decay and at lr 0.05; the Full guide filter decayed like a conv weight
    check_param_groups(model, groups, weight_decay=0.05, dpp_lr_scale=0.5, lr=0.1)
    decayed = {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
    assert decayed == {id(model[0].weight), id(model[2].guide_weight), id(model[3].weight)}
    opt = torch.optim.SGD(groups, lr=0.1)
    assert len(opt.param_groups) == 3


def test_timm_optimizer_factory_skips_dpp_weight_decay():
    """timm's optimizer factory keeps the groups as they are, and timm's schedulers apply the DPP lr_scale of groups
    built without lr (which warns that plain torch optimizers would ignore it)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from dpp_surgery import LrScaleWarning
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), DPP2d(8), DPP2d(8, 3, 1, guide='full'))
    with pytest.warns(LrScaleWarning, match='Pass lr=BASE_LR'):
        groups = param_groups(model, weight_decay=1e-4, dpp_lr_scale=4.0)
    opt = create_optimizer_v2(groups, 'sgd', lr=0.1, momentum=0.9)
    check_param_groups(model, opt.param_groups, weight_decay=1e-4, dpp_lr_scale=4.0, lr_scale=True)
    sched, _ = create_scheduler_v2(opt, sched='step', num_epochs=2, decay_epochs=1, decay_rate=0.5)
    check_param_groups(model, opt.param_groups, weight_decay=1e-4, dpp_lr_scale=4.0, lr=0.1, lr_scale=True)
    sched.step(1)
    check_param_groups(model, opt.param_groups, weight_decay=1e-4, dpp_lr_scale=4.0, lr=0.05, lr_scale=True)


# --- errors -----------------------------------------------------------------------------------------------

def test_error_not_4d():
    with pytest.raises(ValueError, match=r'4-D input.*unsqueeze'):
        DPP2d(3)(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match='4-D input'):
        DPP2d(3)(torch.randn(1, 1, 3, 8, 8))


def test_error_channel_mismatch():
    with pytest.raises(ValueError, match=r'built for 3 channels, but the input has 5'):
        DPP2d(3)(torch.randn(1, 5, 8, 8))


def test_error_window_larger_than_padded_input():
    with pytest.raises(ValueError, match='larger than the padded input'):
        DPP2d(2, 3, 2)(torch.randn(1, 2, 2, 8))
    with pytest.raises(ValueError, match='larger than the padded input'):
        DPP2d(2, 5, 2, 1)(torch.randn(1, 2, 8, 2))


@pytest.mark.parametrize('name', ['theta_alpha', 'theta_lambda', 'guide_weight'])
@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_error_non_finite_parameters(name, bad):
    layer = DPP2d(3, guide='full')
    with torch.no_grad():
        getattr(layer, name).view(-1)[0] = bad
    with pytest.raises(ValueError, match=rf'{name} has 1 non-finite'):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(NonFiniteParameterError):  # its own type, for callers that go on
        layer(torch.randn(1, 3, 8, 8))


def test_error_integer_input():
    with pytest.raises(TypeError, match='floating-point'):
        DPP2d(3)(torch.ones(1, 3, 8, 8, dtype=torch.int64))


@pytest.mark.parametrize('kwargs,match', [
    (dict(guide='fast'), "guide must be one of 'lite', 'full'"),
    (dict(reward='both'), "reward must be one of 'sym', 'asym'"),
    (dict(norm='max'), "norm must be one of 'mean', 'none', 'sum'"),
    (dict(init='uniform'), "init must be one of 'paper', 'avg', 'max'"),
    (dict(init='max'), "init='max' needs reward='asym'"),
    (dict(init=(0.0, 1.0)), 'pair \\(alpha, lambda\\) of positive numbers'),
    (dict(kernel_size=0), 'kernel_size must be >= 1'),
    (dict(stride=0), 'stride must be >= 1'),
    (dict(kernel_size=2, padding=2), 'padding must be at most half the kernel size'),
    (dict(padding='valid'), "padding must be an int, a pair of ints or 'same'"),
    (dict(eps=0.0), 'eps must be > 0'),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPP2d(4, **kwargs)


def test_constructor_type_errors():
    with pytest.raises(TypeError, match='kernel_size must be an int or a pair'):
        DPP2d(4, kernel_size=(2, 2, 2))
    with pytest.raises(ValueError, match='channels must be a positive int'):
        DPP2d(0)
    with pytest.raises(ValueError, match="impl must be one of.*'triton'"):
        DPP2d(4, impl='cuda')  # at construction, not at the first call


def test_functional_errors():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match='theta_lambda must have shape'):
        dpp2d(x, torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r'guide_weight must have shape \(3, 1, 3, 3\)'):
        dpp2d(x, torch.zeros(3), torch.zeros(3), guide_weight=torch.zeros(3, 1, 2, 2))
    with pytest.raises(ValueError, match="impl must be one of"):
        dpp2d(x, torch.zeros(3), torch.zeros(3), impl='cuda')
