"""DPP from scratch through timm's anti-aliasing slot: ``timm.create_model(name, aa_layer=DPP2d)`` and the
:func:`dpp_surgery.dpp_aa_layer` factory for variants.

Every family is checked against the original model (and timm's own anti-aliased one, ``aa_layer=BlurPool2d``): the
same feature-map sizes at odd and even inputs, forward and backward, the number of DPP layers and the variant in each.
"""
import copy
import functools
import io
import subprocess
import sys

import pytest
import timm
import torch
from timm.layers import BlurPool2d

import dpp_surgery
from dpp_surgery import DPP2d, dpp_aa_layer


pytestmark = pytest.mark.usefixtures('one_thread')


def _feature_sizes(model, x):
    return [tuple(f.shape[-2:]) for f in model.forward_intermediates(x, intermediates_only=True)]


def _dpp_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, DPP2d)]


# ---------------------------------------------------------------------------------------------------------------
# the layer, called the way timm's aa slot calls it

@pytest.mark.parametrize('call', [dict(channels=4, stride=2), dict(stride=2)], ids=['keywords', 'positional'])
def test_aa_signature_gives_the_strided_conv_size(call):
    layer = DPP2d(**call) if 'channels' in call else DPP2d(4, **call)  # ResNet/EfficientNet; DenseNet's (C, stride=)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode) == ((2, 2), (2, 2), (0, 0), True)
    conv = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
    shortcut = torch.nn.Conv2d(4, 4, 1, stride=2)
    for size in range(1, 20):
        x = torch.randn(1, 4, size, size + 1)
        assert layer(x).shape == conv(x).shape == shortcut(x).shape, size


def test_aa_signature_at_stride_1_passes_the_input_through():
    """The first block of a dilated ResNet stage asks for stride 1: a 1x1 window, output = input."""
    layer = DPP2d(channels=3, stride=1, guide='full', reward='asym')
    assert layer.kernel_size == (1, 1)
    x = torch.randn(2, 3, 7, 6)
    torch.testing.assert_close(layer(x), x)


def test_the_other_defaults_are_unchanged():
    """Only a stride without a kernel is the aa form: DPP2d(C) and explicit geometries keep floor (surgery's)."""
    assert DPP2d(4)(torch.randn(1, 4, 57, 57)).shape[-2:] == (28, 28)
    assert not DPP2d(4).ceil_mode and not DPP2d(4, 2, 2).ceil_mode and not DPP2d(4, kernel_size=2, stride=2).ceil_mode
    assert DPP2d(4, 3, 2, 1)(torch.randn(1, 4, 8, 8)).shape[-2:] == (4, 4)
    assert DPP2d(4, stride=2, ceil_mode=False)(torch.randn(1, 4, 7, 7)).shape[-2:] == (3, 3)


# ---------------------------------------------------------------------------------------------------------------
# the factory

def test_factory_bakes_the_variant_in():
    cls = dpp_aa_layer(guide='full', reward='asym', norm='sum', init='max')
    assert issubclass(cls, DPP2d) and cls is dpp_aa_layer(guide='full', reward='asym', norm='sum', init='max')
    assert cls is not dpp_aa_layer(guide='full', reward='asym', norm='sum')
    layer = cls(channels=8, stride=2)
    assert (layer.guide, layer.reward, layer.norm, layer.init, layer.ceil_mode) == ('full', 'asym', 'sum', 'max', True)
    assert repr(layer) == 'DPP2d(8, kernel_size=2, stride=2, ceil_mode=True, guide=full, reward=asym, norm=sum)'
    assert cls(8, stride=2, reward='asym', norm='mean').norm == 'mean'  # a keyword at build time overrides
    odd = dpp_aa_layer(kernel_size=3)(4, stride=2)
    assert (odd.kernel_size, odd.padding, odd.ceil_mode) == ((3, 3), (1, 1), False)
    for size in range(1, 12):
        assert odd(torch.randn(1, 4, size, size)).shape[-1] == (size + 1) // 2
    assert dpp_aa_layer(init=[2.0, 0.5])(4, stride=2).init == (2.0, 0.5)
    assert dpp_aa_layer(init=(2.0, 0.5)) is dpp_aa_layer(init=[2, 0.5])


@pytest.mark.parametrize('kwargs, message', [
    (dict(guide='huge'), 'guide must be one of'),
    (dict(init='max'), "init='max' needs reward='asym'"),
    (dict(init=(1.0, -1.0)), 'init must be a preset name or a pair'),
    (dict(kernel_size=2), 'kernel_size must be None .* or an odd positive int'),
    (dict(kernel_size=True), 'kernel_size must be None'),
])
def test_factory_checks_its_options_before_timm_builds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpp_aa_layer(**kwargs)


def test_factory_layers_pickle_and_copy():
    model = timm.create_model('resnet18', aa_layer=dpp_aa_layer(guide='full', reward='asym'), num_classes=3).eval()
    with torch.no_grad():
        for _, layer in dpp_surgery.dpp_layers(model):
            layer.theta_lambda.normal_()
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert type(other.layer2[0].aa) is type(model.layer2[0].aa)
        with torch.no_grad():
            assert torch.equal(other(x), expected)
    fresh = timm.create_model('resnet18', aa_layer=dpp_aa_layer(guide='full', reward='asym'), num_classes=3).eval()
    fresh.load_state_dict(model.state_dict())  # strict: the same keys
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_saved_model_loads_in_a_new_process(tmp_path):
    """timm keeps aa_layer (the class) in the model's _model_args: torch.save stores it as the factory call, so a
    process that never called dpp_aa_layer loads the model."""
    model = timm.create_model('efficientnet_lite0', aa_layer=dpp_aa_layer(reward='asym', init=(0.5, 2.0))).eval()
    path = str(tmp_path / 'model.pt')
    torch.save(model, path)
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        torch.save((x, model(x)), str(tmp_path / 'io.pt'))
    code = ('import torch\n'
            f'model = torch.load({path!r}, weights_only=False).eval()\n'
            f'x, expected = torch.load({str(tmp_path / "io.pt")!r})\n'
            'layers = [m for m in model.modules() if type(m).__name__ == "DPP2d"]\n'
            'assert [(m.reward, m.init) for m in layers] == [("asym", (0.5, 2.0))] * 4, layers\n'
            'with torch.no_grad():\n'
            '    assert torch.equal(model(x), expected)\n')
    subprocess.run([sys.executable, '-c', code], check=True, timeout=300)


# ---------------------------------------------------------------------------------------------------------------
# timm's families

# name, kwargs, the DPP layers timm builds
FAMILIES = [
    ('resnet18', {}, ['maxpool.1', 'layer2.0.aa', 'layer3.0.aa', 'layer4.0.aa']),
    ('resnet50d', {}, ['maxpool.1', 'layer2.0.aa', 'layer3.0.aa', 'layer4.0.aa']),
    ('efficientnet_lite0', {}, ['blocks.1.0.aa', 'blocks.2.0.aa', 'blocks.3.0.aa', 'blocks.5.0.aa']),
    ('mobilenetv3_small_100', {}, ['blocks.0.0.aa', 'blocks.1.0.aa', 'blocks.2.0.aa', 'blocks.4.0.aa']),
    ('densenet121', dict(aa_stem_only=False), ['features.pool0.1', 'features.transition1.pool',
                                               'features.transition2.pool', 'features.transition3.pool']),
]
VARIANT = dict(guide='full', reward='asym', init='max')


def _check_family(name, kwargs, expected, sizes, aa_layer, variant):
    model = timm.create_model(name, aa_layer=aa_layer, num_classes=5, **kwargs)
    assert _dpp_names(model) == expected
    for _, layer in dpp_surgery.dpp_layers(model):
        assert (layer.guide, layer.reward, layer.init) == (variant['guide'], variant['reward'], variant['init'])
    original = timm.create_model(name, num_classes=5, **kwargs)
    blur = timm.create_model(name, aa_layer=BlurPool2d, num_classes=5, **kwargs)  # timm's own anti-aliasing
    for size in sizes:
        x = torch.randn(2, 3, size, size)
        sizes_dpp = _feature_sizes(model, x)
        assert sizes_dpp == _feature_sizes(blur, x), size
        if not name.startswith('densenet'):  # DenseNet's own transitions are 2x2 average pools that round down
            assert sizes_dpp == _feature_sizes(original, x), size
        x.requires_grad_(True)
        out = model(x)
        assert out.shape == (2, 5) and torch.isfinite(out).all()
        out.square().mean().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        for layer_name, layer in dpp_surgery.dpp_layers(model):
            for p in layer.parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), layer_name
        model.zero_grad()


@pytest.mark.parametrize('name, kwargs, expected', FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_with_dpp2d(name, kwargs, expected):
    default = dict(guide='lite', reward='sym', init='paper')
    sizes = (33, 64, 97, 100) if name == 'resnet18' else (33, 64)  # resnet18 at 100 px: the original bug
    _check_family(name, kwargs, expected, sizes, DPP2d, default)


@pytest.mark.parametrize('name, kwargs, expected', FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_with_a_factory_variant(name, kwargs, expected):
    _check_family(name, kwargs, expected, (33,), dpp_aa_layer(**VARIANT), VARIANT)


SWEEP = FAMILIES + [
    ('efficientnet_b0', {}, ['blocks.1.0.aa', 'blocks.2.0.aa', 'blocks.3.0.aa', 'blocks.5.0.aa']),
    ('mobilenetv3_large_100', {}, ['blocks.1.0.aa', 'blocks.2.0.aa', 'blocks.3.0.aa', 'blocks.5.0.aa']),
    ('densenet121', {}, ['features.pool0.1']),  # timm's default: the stem only
]


@pytest.mark.slow
@pytest.mark.parametrize('name, kwargs, expected', SWEEP, ids=[f'{f[0]}{"-" if f[1] else ""}{"-".join(f[1])}'
                                                              for f in SWEEP])
def test_family_sweep(name, kwargs, expected):
    _check_family(name, kwargs, expected, (97, 100, 224), dpp_aa_layer(**VARIANT), VARIANT)


def test_dilated_resnet_keeps_the_original_sizes():
    """output_stride=16: layer4's first block asks its aa layer for stride 1 (a 1x1 window)."""
    model = timm.create_model('resnet18', aa_layer=DPP2d, output_stride=16)
    assert model.layer4[0].aa.stride == (1, 1)
    original = timm.create_model('resnet18', output_stride=16)
    for size in (33, 64):
        x = torch.randn(1, 3, size, size)
        assert _feature_sizes(model, x) == _feature_sizes(original, x)


def test_timm_channel_bug_in_small_mobilenets_hits_blurpool_too():
    """timm's DepthwiseSeparableConv builds its aa layer with the block's output channels but runs it on the input's;
    at widths where they differ (mobilenetv3_small_050) every per-channel aa layer fails, timm's BlurPool2d too."""
    x = torch.randn(1, 3, 33, 33)
    blur = timm.create_model('mobilenetv3_small_050', aa_layer=BlurPool2d)
    dpp = timm.create_model('mobilenetv3_small_050', aa_layer=DPP2d)
    try:
        blur(x)
    except RuntimeError:
        with pytest.raises(ValueError, match='DPP2d was built for 8 channels, but the input has 16'):
            dpp(x)
    else:  # a timm that passes the right channel count
        assert dpp(x).shape == (1, 1000)


def test_a_partial_fails_in_resnet_and_works_elsewhere():
    """ResNet's constructor calls issubclass on its aa_layer (timm's code, before any of ours runs); the builders of the
    other families take a partial. dpp_aa_layer is the class for every family."""
    partial = functools.partial(DPP2d, guide='full', reward='asym')
    with pytest.raises(TypeError, match='issubclass'):
        timm.create_model('resnet18', aa_layer=partial)
    model = timm.create_model('efficientnet_lite0', aa_layer=partial)
    assert [m.guide for _, m in dpp_surgery.dpp_layers(model)] == ['full'] * 4
    assert all(m.ceil_mode for _, m in dpp_surgery.dpp_layers(model))


# ---------------------------------------------------------------------------------------------------------------
# what the slot does not do: pretrained weights

def test_pretrained_weights_do_not_load_through_the_slot(tmp_path):
    """The original checkpoint has no DPP parameters: timm's strict pretrained load fails and names them; a
    non-strict load takes every original tensor and leaves the DPP layers at their init. The model's own state_dict
    loads back strictly (timm's checkpoint_path=)."""
    from safetensors.torch import save_file
    original = timm.create_model('resnet18')
    path = str(tmp_path / 'resnet18.safetensors')
    save_file(original.state_dict(), path)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "maxpool.1.theta_alpha"'):
        timm.create_model('resnet18', aa_layer=DPP2d, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    model = timm.create_model('resnet18', aa_layer=DPP2d)
    result = model.load_state_dict(original.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(f'{n}.{p}' for n in _dpp_names(model)
                                                 for p in ('theta_alpha', 'theta_lambda'))
    assert torch.equal(model.layer2[0].conv1.weight, original.layer2[0].conv1.weight)
    own = str(tmp_path / 'aa.safetensors')
    save_file(model.state_dict(), own)
    again = timm.create_model('resnet18', aa_layer=DPP2d, checkpoint_path=own)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_dpp_surgery_save_refuses_slot_layers(tmp_path):
    """dpp_surgery.save rebuilds from a name and conversions, which cannot give the slot's layers: it refuses in one
    line that says what to do, and writes nothing; a converted model that also has slot layers is refused too."""
    model = timm.create_model('resnet18', aa_layer=DPP2d)
    path = tmp_path / 'aa.safetensors'
    with pytest.raises(dpp_surgery.CheckpointError, match=r'4 DPP layers \(maxpool\.1, layer2\.0\.aa, layer3\.0\.aa, '
                       r'\.\.\.\) were not placed by dpp_surgery\.convert.*Save the state_dict instead'):
        dpp_surgery.save(model, str(path))
    assert not path.exists()
    both = dpp_surgery.convert(timm.create_model('resnet18', aa_layer=DPP2d), input_size=(3, 32, 32))
    with pytest.raises(dpp_surgery.CheckpointError, match=r'3 DPP layers \(layer2\.0\.aa, layer3\.0\.aa, '
                       r'layer4\.0\.aa\) were not placed'):
        dpp_surgery.save(both, str(path))
    assert not path.exists()
