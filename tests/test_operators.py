"""The other downsampling operators the surgery can place, for comparing DPP with what users would pick instead:
the variant's ``operator`` field (``dpp``, ``s3dpp``, ``blur``, ``avg``, ``max``) and ``operator=`` on the policy."""
import warnings

import numpy as np
import pytest
import timm
import torch
from torch import nn
from timm.layers import BlurPool2d

import dpp_surgery
from dpp_surgery import ConversionPolicy, DPP2d, DPPVariant, S3DPP2d
from dpp_surgery.surgery import ConversionError
from dpp_surgery.surgery.convert import make_operator

OTHERS = ('s3dpp', 'blur', 'avg', 'max')
# the layer each operator puts at a strided conv
LAYER = {'s3dpp': S3DPP2d, 'blur': BlurPool2d, 'avg': nn.AvgPool2d, 'max': nn.MaxPool2d}


def _model(name='resnet10t'):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5).eval()


def _placed(model, cls):
    """The layers of class ``cls`` that the surgery added (the children it names ``dpp``)."""
    return [n for n, m in model.named_modules() if type(m) is cls and n.rpartition('.')[2] == 'dpp']


def test_policy_sets_the_operator_of_every_kind_and_round_trips():
    policy = ConversionPolicy(operator='blur', strided_conv={'blur_filter': 5, 'blur_pad': 'constant'})
    assert {policy.variant(k).operator for k in policy.targets} == {'blur'}
    assert policy.strided_conv.blur_filter == 5 and policy.strided_conv.blur_pad == 'constant'
    assert 'operator=blur, filter=5, pad=constant' in policy.describe()
    assert ConversionPolicy.from_dict(policy.to_dict()) == policy
    # the default writes no operator (files of earlier versions hold none) and reads back as dpp
    assert 'operator' not in ConversionPolicy().to_dict() and 'operator' not in ConversionPolicy().strided_conv.to_dict()
    assert ConversionPolicy.from_dict({}).strided_conv.operator == 'dpp'
    mixed = ConversionPolicy(strided_conv={'operator': 'avg'})
    assert (mixed.strided_conv.operator, mixed.max_pool.operator) == ('avg', 'dpp')


@pytest.mark.parametrize('kwargs,match', [
    (dict(operator='blurpool'), r"unknown operator 'blurpool' \(did you mean 'blur'"),
    (dict(strided_conv={'operator': 'mean'}), 'valid operators: dpp, s3dpp, blur, avg, max'),
    (dict(strided_conv={'operator': 'blur', 'blur_filter': 9}), 'blur_filter must be an integer from 2 to 7'),
    (dict(strided_conv={'operator': 'blur', 'blur_pad': 'zeros'}), "unknown blur_pad 'zeros'; valid: reflect"),
])
def test_bad_operator_settings_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConversionPolicy(**kwargs)


def test_bad_operator_in_a_file_is_refused():
    with pytest.raises(ValueError, match=r"policy\.strided_conv\.operator must be one of"):
        ConversionPolicy.from_dict({'strided_conv': {'operator': 'os.system'}})
    with pytest.raises(ValueError, match=r"policy\.strided_conv\.blur_filter must be an integer from 2 to 7"):
        ConversionPolicy.from_dict({'strided_conv': {'operator': 'blur', 'blur_filter': 10 ** 9}})


@pytest.mark.parametrize('placement', ['block', 'post', 'pre'])
@pytest.mark.parametrize('operator', OTHERS)
def test_every_operator_at_every_placement_keeps_the_sizes(operator, placement):
    """At an odd input size every map of the converted model has the original's size (residual adds meet), and the
    operator's layer is what the surgery placed."""
    original, model = _model(), _model()
    dpp_surgery.convert(model, input_size=(3, 65, 65), targets=('strided_conv',), placement=placement,
                        operator=operator)
    placed = _placed(model, LAYER[operator])
    assert placed, f'no {LAYER[operator].__name__} placed'
    if operator != 's3dpp':
        assert dpp_surgery.dpp_layers(model) == []
    for size in (65, 64):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = original.forward_features(x).shape
            assert model.forward_features(x).shape == want
    model.train()
    model(torch.randn(2, 3, 65, 65)).sum().backward()  # trains too (S3DPP's random draw included)


def test_operators_at_pool_sites():
    model = _model()
    dpp_surgery.convert(model, input_size=(3, 64, 64), targets=('max_pool',), operator='blur')
    stem_pool = model.maxpool
    # antialiased-cnns' MaxBlurPool: the max at stride 1, then the blur downsamples
    assert isinstance(stem_pool, nn.Sequential) and isinstance(stem_pool[0], nn.MaxPool2d)
    assert stem_pool[0].stride == 1 and isinstance(stem_pool[1], BlurPool2d)
    model = _model()
    dpp_surgery.convert(model, input_size=(3, 64, 64), targets=('max_pool',), operator='avg')
    assert type(model.maxpool) is nn.AvgPool2d and model.maxpool.kernel_size == (3, 3)
    x = torch.randn(1, 3, 63, 63)
    assert model.forward_features(x).shape == _model().forward_features(x).shape


@pytest.mark.parametrize('filt,pad', [(2, 'reflect'), (3, 'reflect'), (4, 'constant'), (5, 'constant'), (7, 'reflect')])
def test_blur_gives_the_strided_outputs_size(filt, pad):
    variant = DPPVariant(operator='blur', blur_filter=filt, blur_pad=pad)
    layer = make_operator(variant, 4, dict(kernel_size=2, stride=2, padding=0, ceil_mode=True))
    assert type(layer) is BlurPool2d and layer.pad_mode == pad
    for h in (7, 8, 9, 16, 17):
        assert layer(torch.randn(1, 4, h, h)).shape[-2:] == ((h + 1) // 2,) * 2


@pytest.mark.parametrize('kernel,stride,padding,ceil', [(3, 2, 1, False), (3, 2, 0, True), (2, 2, 0, True),
                                                        (3, 2, 0, False), (2, 2, 0, False)])
def test_max_blur_gives_the_max_pools_size(kernel, stride, padding, ceil):
    pool = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil)
    layer = make_operator(DPPVariant(operator='blur'), 3, dict(kernel_size=kernel, stride=stride, padding=padding,
                                                              ceil_mode=ceil), is_max_pool=True)
    for h in range(4, 18):
        x = torch.randn(1, 3, h, h)
        out = layer(x)
        assert out.shape == pool(x).shape, h
        assert torch.isfinite(out).all()


@pytest.mark.parametrize('kernel,stride,padding,ceil', [(2, 2, 0, False), (3, 2, 1, False), (3, 2, 0, True),
                                                        (2, 2, 0, True), (3, 3, 0, False)])
@pytest.mark.parametrize('filt', [2, 3, 5])
def test_blur_gives_the_avg_pools_size(kernel, stride, padding, ceil, filt):
    """At an average-pool site the blur gives the pool's size, floor mode included (a 2x2 pool of a 3x3 map is 1x1)."""
    pool = nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil)
    geometry = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil)
    variant = DPPVariant(operator='blur', blur_filter=filt, blur_pad='constant')
    if filt + 2 * padding - kernel + (stride - 1 if ceil else 0) < 0:  # a filter too small for the window's size
        with pytest.raises(ConversionError, match='use a larger blur_filter'):
            make_operator(variant, 2, geometry)
        return
    layer = make_operator(variant, 2, geometry)
    for h in range(max(kernel, filt), 18):
        x = torch.randn(1, 2, h, h)
        assert layer(x).shape == pool(x).shape, h


def test_blur_is_a_low_pass_that_keeps_a_constant():
    layer = make_operator(DPPVariant(operator='blur'), 3, dict(kernel_size=2, stride=2, ceil_mode=True))
    x = torch.full((1, 3, 9, 9), 2.5)
    torch.testing.assert_close(layer(x), torch.full((1, 3, 5, 5), 2.5))


def test_operator_limits_are_conversion_errors():
    with pytest.raises(ConversionError, match="'s3dpp' downsamples by 2 only"):
        make_operator(DPPVariant(operator='s3dpp'), 4, dict(kernel_size=3, stride=3))
    with pytest.raises(ConversionError, match="dynamic 'same' padding"):
        make_operator(DPPVariant(operator='avg'), 4, dict(kernel_size=3, stride=2, padding='same'))
    with pytest.raises(ConversionError, match="a global pool takes operator 'dpp' only"):
        dpp_surgery.convert(_model(), input_size=(3, 64, 64), skip_global=False, operator='blur')


def test_plan_shows_the_operator_and_its_flops():
    model = _model()
    dpp_plan = dpp_surgery.plan(model, input_size=(3, 64, 64), placement='pre')
    avg_plan = dpp_surgery.plan(model, input_size=(3, 64, 64), placement='pre', operator='avg')
    assert 'operator=avg' in str(avg_plan) and 'operator=' not in str(dpp_plan)
    # a plain pool costs less than DPP at the same sites
    assert avg_plan.flops()[1] < dpp_plan.flops()[1]


@pytest.mark.parametrize('operator', ['blur', 's3dpp'])
def test_checkpoint_records_and_rebuilds_the_operator(tmp_path, operator):
    model = _model()
    dpp_surgery.convert(model, input_size=(3, 64, 64), placement='pre', operator=operator)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = dpp_surgery.save(model, str(tmp_path / 'm.safetensors'))
    loaded = dpp_surgery.load(path).eval()
    assert [type(m) for _, m in model.named_modules()] == [type(m) for _, m in loaded.named_modules()]
    (policy, _), = dpp_surgery.conversion_history(loaded)
    assert policy.strided_conv.operator == operator
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_blur_model_exports_with_standard_operators(tmp_path):
    import onnx

    model = _model()
    dpp_surgery.convert(model, input_size=(3, 64, 64), placement='pre', operator='blur')
    path = str(tmp_path / 'blur.onnx')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dpp_surgery.export_onnx(model, path, mode='custom', example_input=torch.randn(1, 3, 64, 64))
    assert not [n for n in onnx.load(path).graph.node if n.op_type == 'DPP2d']
    session = dpp_surgery.onnx_session(path)
    for size in (64, 65):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_cli_plan_takes_the_operator(capsys):
    from dpp_surgery import cli

    assert cli.main(['plan', 'resnet10t', '--input-size', '3', '64', '64', '--operator', 'max']) == 0
    assert 'operator=max' in capsys.readouterr().out


def test_dpp_stays_the_default():
    model = _model()
    dpp_surgery.convert(model, input_size=(3, 64, 64))
    assert dpp_surgery.dpp_layers(model) and all(type(m) is DPP2d for _, m in dpp_surgery.dpp_layers(model))


# ---------------------------------------------------------------------------------------------------------------
# the sweeps, with BlurPool2d in DPP's places (slow)

@pytest.mark.slow
def test_timm_models_with_blur():
    """Every model of timm's model checks (tests/test_timm_models.py) converts with ``operator='blur'`` at every
    site the default policy converts, keeps its output shape, and trains (finite loss and gradients)."""
    from test_timm_models import MODELS, _size_candidates

    failed = []
    for name in MODELS:
        size = _size_candidates(name)[0]
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(2, *size)
        with torch.no_grad():
            want = model(x).shape
        try:
            try:
                dpp_surgery.convert(model, input_size=size, operator='blur')
            except ConversionError as e:  # reflect padding needs maps larger than its pad: the known limit
                if 'Padding size should be less than' not in str(e):
                    raise
                dpp_surgery.convert(model, input_size=size, operator='blur', max_pool={'operator': 'blur',
                                    'blur_pad': 'constant', 'reward': 'asym'}, avg_pool={'operator': 'blur',
                                    'blur_pad': 'constant'}, strided_conv={'operator': 'blur', 'blur_pad': 'constant'})
            assert _placed(model, BlurPool2d) or any(
                isinstance(m, nn.Sequential) and any(isinstance(c, BlurPool2d) for c in m) for m in model.modules())
            with torch.no_grad():
                assert model(x).shape == want
            model.train()
            loss = model(x).float().square().mean()
            loss.backward()
            assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                                if p.grad is not None)
        except Exception as e:  # noqa: BLE001 - collected, reported together
            failed.append(f'{name}: {type(e).__name__}: {str(e)[:200]}')
    assert not failed, '\n'.join(failed)


@pytest.mark.slow
def test_coverage_sweep_with_blur():
    """``bench coverage --operator blur``: every family the committed DPP sweep (results/coverage.csv) converts
    converts with BlurPool2d too, unless the conversion names an operator limit ('same' padding, unequal strides)."""
    import csv
    import os

    from dpp_surgery.tools.coverage import check_model

    root = os.path.join(os.path.dirname(__file__), '..')
    with open(os.path.join(root, 'results', 'coverage.csv'), newline='') as f:
        dpp_ok = {}  # family -> its first model the DPP sweep converted
        for r in csv.DictReader(f):
            if r['status'] == 'ok':
                dpp_ok.setdefault(r['family'], r['model'])
    results = [check_model(model, family, operator='blur') for family, model in sorted(dpp_ok.items())]
    bad = [f'{r.family} {r.model}: {r.reason}' for r in results
           if r.status != 'ok' and "operator 'blur'" not in r.reason]
    assert not bad, '\n'.join(bad)


def test_a_model_converted_with_another_operator_is_not_converted_again():
    model = _model()
    dpp_surgery.convert(model, input_size=(3, 64, 64), targets=('strided_conv',), operator='avg')
    with pytest.raises(ConversionError, match="converted with operator 'avg'"):
        dpp_surgery.convert(model, input_size=(3, 64, 64), targets=('max_pool',))
