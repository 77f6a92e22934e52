"""Discovery beyond the graph: the module census, sites inside FX leaves, conv-like modules that are not Conv2d,
models whose forward does not trace, containers that must keep their children, features_only models."""
import copy
import warnings

import pytest
import timm
import torch
from torch import nn

import dpp_surgery
from dpp_surgery import DPP2d, TraceError, convert, dpp_layers, plan
from dpp_surgery.surgery import ReasonCode, census, trace

SIZE = (3, 64, 64)


def _make(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _run_and_grad(model, size=SIZE):
    model.train()
    out = model(torch.randn(2, *size))
    out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten(1) for o in out], 1)
    out.float().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f'no gradient for {missing[:5]}'
    model.eval()
    return out


def _census_listed(model, p):
    """Every census site of ``model`` is a site of plan ``p``."""
    names = {s.name for s in p.sites}
    absent = [n for n, _ in census(model) if n not in names]
    assert not absent, f'census sites missing from the plan: {absent}'


# ---------------------------------------------------------------------------------------------------------------
# sites inside FX leaf modules (timm registers NormFreeBlock as a leaf)

def test_census_lists_downsampling_modules_only():
    model = _make('resnet18')
    assert census(model) == [('conv1', 'strided_conv'), ('maxpool', 'max_pool'),
                             ('layer2.0.conv1', 'strided_conv'), ('layer2.0.downsample.0', 'strided_conv'),
                             ('layer3.0.conv1', 'strided_conv'), ('layer3.0.downsample.0', 'strided_conv'),
                             ('layer4.0.conv1', 'strided_conv'), ('layer4.0.downsample.0', 'strided_conv')]


@pytest.mark.parametrize('placement', ['block', 'post', 'pre'])
def test_sites_inside_fx_leaves_convert(placement):
    model = _make('nf_regnet_b0')
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        ref = model(x)
    p = plan(model, input_size=SIZE, placement=placement)
    _census_listed(model, p)
    inside = [s for s in p.sites if s.name.startswith('stages.') and s.kind in ('strided_conv', 'avg_pool')]
    assert len(inside) == 8, [s.name for s in inside]  # a strided conv and a shortcut pool in each stage
    assert all(s.action == 'replace' for s in inside), [(s.name, s.reason) for s in inside if s.action != 'replace']
    if placement == 'block':
        # the leaf block itself is the block: its input and output sizes are the strided conv's
        assert {s.block for s in inside} == {f'stages.{i}.0' for i in range(4)}
    convert(model, input_size=SIZE, placement=placement)
    assert type(model.stages[0][0]).__name__.startswith('NormFreeBlock')
    assert isinstance(model.stages[0][0], timm.models.nfnet.NormFreeBlock)
    with torch.no_grad():
        assert model(x).shape == ref.shape
    assert len(dpp_layers(model)) >= 4
    _run_and_grad(model)


def test_conv_like_module_that_is_not_a_conv2d():
    from timm.layers import CondConv2d

    model = _make('efficientnet_cc_b0_4e')
    cond = [n for n, m in model.named_modules() if isinstance(m, CondConv2d) and m.stride != (1, 1)]
    assert cond, 'the model has a strided CondConv2d'
    p = plan(model, input_size=SIZE, placement='post')
    sites = {s.name: s for s in p.sites}
    assert all(sites[n].kind == 'strided_conv' and sites[n].action == 'replace' for n in cond)
    convert(model, input_size=SIZE, placement='post')
    conv = model.get_submodule(cond[0])
    assert isinstance(conv, CondConv2d) and conv.stride == (1, 1) and isinstance(conv.dpp, DPP2d)
    _run_and_grad(model)


class _LPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.lp = nn.LPPool2d(2, 2)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return self.down(self.lp(self.stem(x)))


def test_other_pooling_types_are_listed_with_the_reason():
    model = _LPNet()
    p = plan(model, input_size=(3, 16, 16))
    _census_listed(model, p)
    lp = next(s for s in p.sites if s.name == 'lp')
    assert lp.kind == 'pool' and lp.action == 'skip' and not lp.policy_skip
    assert 'LPPool2d is a pooling type DPP does not replace' in lp.reason
    assert lp.reason_code == ReasonCode.UNSUPPORTED_POOL_TYPE


def test_blur_pools_and_dilated_strided_convs_convert():
    """timm's anti-aliased downsampling (BlurPool2d) becomes DPP of the same window, stride and padding; a dilated
    strided conv keeps its dilation and runs at stride 1 (skresnet's selective kernels)."""
    from timm.layers import BlurPool2d

    for name in ('resnetblur18', 'skresnet18'):
        model = _make(name)
        x = torch.randn(2, *SIZE)
        with torch.no_grad():
            ref = model(x)
        p = plan(model, input_size=SIZE)
        _census_listed(model, p)
        downsampling = {n for n, _ in census(model)}
        left = [(s.name, s.reason) for s in p.sites if s.name in downsampling and s.action == 'skip'
                and not s.policy_skip]
        assert not left, f'{name}: {left}'
        convert(model, input_size=SIZE)
        with torch.no_grad():
            assert model(x).shape == ref.shape
        blur = [n for n, m in model.named_modules() if isinstance(m, BlurPool2d) and m.stride not in (1, (1, 1))]
        assert not blur, f'{name}: blur pools still downsampling: {blur}'
        _run_and_grad(model)


def test_policy_skips_are_told_apart_from_limitations():
    p = plan(_make('resnet18'), input_size=SIZE, exclude=['layer3.*'])
    by_name = {s.name: s for s in p.sites}
    assert by_name['conv1'].policy_skip and 'stem' in by_name['conv1'].reason
    assert by_name['layer3.0.conv1'].policy_skip and 'excluded' in by_name['layer3.0.conv1'].reason
    assert not by_name['layer2.0.conv1'].policy_skip and by_name['layer2.0.conv1'].action == 'replace'


# ---------------------------------------------------------------------------------------------------------------
# forwards that do not trace

class _Branchy(nn.Module):
    """A block whose forward fx cannot trace (data-dependent control flow), with a pool inside."""

    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        if x.sum() > 0:
            return self.pool(x)
        return self.pool(-x)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.branchy = _Branchy()
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.down(self.branchy(self.conv(x)))
        return self.head(x.mean((2, 3)))


class _RootBranchy(_Toy):
    def forward(self, x):  # the model's own forward does not trace
        x = self.conv(x)
        if x.mean() > 100:
            x = x * 2
        return self.head(self.down(self.branchy(x)).mean((2, 3)))


def test_trace_error_names_the_module_and_the_fix():
    with pytest.raises(TraceError, match=r"module 'branchy' \(_Branchy\).*register_notrace_module\(_Branchy\).*"
                                         r"leaf_modules=\[_Branchy\]") as info:
        trace(_Toy())
    assert info.value.module_name == 'branchy' and info.value.module_type is _Branchy


def test_a_submodule_that_does_not_trace_becomes_a_leaf():
    torch.manual_seed(0)
    model = _Toy().eval()
    p = plan(model, input_size=(3, 16, 16))
    assert 'branchy (_Branchy) as FX leaves' in p.note
    sites = {s.name: s for s in p.sites}
    assert sites['branchy.pool'].action == 'replace' and sites['branchy.pool'].placement == 'pool'
    assert sites['down.0'].action == 'replace'  # a conv ran before it: not the stem
    convert(model, input_size=(3, 16, 16), skip_stem=False)
    assert isinstance(model.branchy.pool, DPP2d) and model.branchy.pool.channels == 8
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)


def test_a_forward_that_does_not_trace_is_planned_from_the_census():
    torch.manual_seed(0)
    model = _RootBranchy().eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    p = plan(model, input_size=(3, 16, 16), skip_stem=False)
    assert "the model's forward does not trace" in p.note
    _census_listed(model, p)
    sites = {s.name: s for s in p.sites}
    assert sites['down.0'].action == 'replace' and sites['down.0'].placement == 'block'
    assert sites['down.0'].block == 'down'  # the Sequential has the conv's input and output sizes
    convert(model, input_size=(3, 16, 16), skip_stem=False)
    assert model(x).shape == ref.shape


# ---------------------------------------------------------------------------------------------------------------
# containers keep their children

def test_a_sequential_block_keeps_its_length_and_indexing():
    torch.manual_seed(0)
    model = _RootBranchy().eval()
    before = [type(m) for m in model.down]
    convert(model, input_size=(3, 16, 16), skip_stem=False)
    assert len(model.down) == 3 and all(isinstance(m, cls) for m, cls in zip(model.down, before))
    # DPP follows the Sequential's last child, which returns the Sequential's output
    assert isinstance(model.down[2].dpp, DPP2d) and model.down[2].dpp.channels == 8
    assert isinstance(model.down[2], nn.ReLU)
    assert 'down.2.dpp.theta_alpha' in model.state_dict()
    assert model.down(torch.randn(1, 8, 16, 16)).shape == (1, 8, 8, 8)


def test_hooks_follow_a_replaced_pool():
    model = _make('resnet18')
    seen = []
    model.maxpool.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    convert(model, input_size=SIZE)
    assert isinstance(model.maxpool, DPP2d)
    model(torch.randn(1, *SIZE))
    assert seen[-1] == (1, 64, 16, 16)


# ---------------------------------------------------------------------------------------------------------------
# features_only models

def _outputs(model, x):
    out = model(x)
    return list(out.values()) if isinstance(out, dict) else list(out)


@pytest.mark.parametrize('name,feature_cls', [('resnet18', 'list'), ('resnet18', 'dict'), ('resnet18', 'hook'),
                                              ('resnet18', 'getter'), ('nf_regnet_b0', None),
                                              ('efficientnet_lite0', None)])
def test_features_only_models_convert(name, feature_cls):
    kwargs = dict(features_only=True, **({'feature_cls': feature_cls} if feature_cls else {}))
    model = _make(name, **kwargs)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        ref = [tuple(o.shape) for o in _outputs(model, x)]
    info = copy.deepcopy(model.feature_info.info)
    cls = type(model)
    convert(model, input_size=SIZE)
    assert type(model) is cls and model.feature_info.info == info
    assert dpp_layers(model), 'something converted'
    with torch.no_grad():
        got = [tuple(o.shape) for o in _outputs(model, x)]
    assert got == ref
    assert [s[1] for s in got] == model.feature_info.channels()
    assert [SIZE[1] // s[2] for s in got] == model.feature_info.reduction()


def test_zoo_models_take_features_only_and_out_indices():
    full = timm.create_model('resnet18_dpp').eval()
    features = timm.create_model('resnet18_dpp', features_only=True, out_indices=(1, 3)).eval()
    assert type(features).__name__ == 'FeatureListNet'
    assert features.feature_info.channels() == [64, 256] and features.feature_info.reduction() == [4, 16]
    assert features.pretrained_cfg['architecture'] == 'resnet18_dpp'
    assert [tuple(o.shape) for o in features(torch.randn(1, *SIZE))] == [(1, 64, 16, 16), (1, 256, 4, 4)]
    assert len(dpp_layers(features)) == 3  # layer4 (and its DPP) is not part of the extractor
    getter = timm.create_model('resnet18_dpp', features_only=True, feature_cls='getter', out_indices=(2, 4))
    assert [tuple(o.shape) for o in getter(torch.randn(1, *SIZE))] == [(1, 128, 8, 8), (1, 512, 2, 2)]
    assert len(dpp_layers(getter)) == len(dpp_layers(full))


def test_zoo_features_carry_the_pretrained_converted_weights():
    # efficientnet builds a features class of its own: converted as the recipe says, weights copied by name
    full = timm.create_model('efficientnet_lite0_dpp', pretrained=True).eval()
    features = timm.create_model('efficientnet_lite0_dpp', pretrained=True, features_only=True, out_indices=(2, 4))
    features.eval()
    assert type(features).__name__ == 'EfficientNetFeatures'
    state = full.state_dict()
    for key, value in features.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        _, inter = full.forward_intermediates(x, indices=(2, 4))
        for a, b in zip(features(x), inter):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize('feature_cls', [None, 'dict', 'hook', 'getter', 'fx'])
def test_zoo_features_are_timms_own_wrapper_around_the_converted_model(feature_cls):
    """Where timm wraps the architecture's model (resnet: every feature_cls), the extractor is timm's wrapper class
    itself (no subclass), built around the converted model: with the same seed, its features are the full converted
    model's intermediates; and timm's public feature classes are left as they were."""
    import timm.models

    classes = {name: getattr(timm.models, name) for name in ('FeatureListNet', 'FeatureDictNet', 'FeatureHookNet',
                                                             'FeatureGraphNet')}
    kwargs = {} if feature_cls is None else {'feature_cls': feature_cls}
    torch.manual_seed(0)
    full = timm.create_model('resnet18_dpp').eval()
    torch.manual_seed(0)
    features = timm.create_model('resnet18_dpp', features_only=True, out_indices=(1, 3), **kwargs).eval()
    plain = timm.create_model('resnet18', features_only=True, out_indices=(1, 3), **kwargs)
    assert type(features) is type(plain)
    assert {name: getattr(timm.models, name) for name in classes} == classes
    # (the hook wrapper keeps the whole model, layer4 and its DPP included)
    assert len(dpp_layers(features)) == (4 if feature_cls == 'hook' else 3)
    assert 'num_classes' not in features.pretrained_cfg
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        _, inter = full.forward_intermediates(x, indices=(1, 3))
        got = features(x)
    got = list(got.values()) if isinstance(got, dict) else list(got)
    assert len(got) == 2
    for a, b in zip(got, inter):
        torch.testing.assert_close(a, b)


def test_functional_pool_in_an_iterating_container_is_left_alone():
    class Stack(nn.ModuleDict):
        def forward(self, x):
            for m in self.values():
                x = m(x)
            return torch.nn.functional.max_pool2d(x, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.stack = Stack({'a': nn.Conv2d(4, 4, 3, padding=1), 'b': nn.ReLU()})

        def forward(self, x):
            return self.stack(self.stem(x))

    model = Net()
    p = plan(model, input_size=(3, 16, 16))
    site = next(s for s in p.sites if s.functional)
    assert site.action == 'skip' and 'a container whose forward runs over its children' in site.reason
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', dpp_surgery.NoEffectWarning)
        convert(model, input_size=(3, 16, 16))
    assert list(model.stack.keys()) == ['a', 'b']


# ---------------------------------------------------------------------------------------------------------------
# the coverage benchmark's per-site recall

def test_site_recall_counts_every_census_site_once():
    from dpp_surgery.tools.coverage import site_recall

    model = _LPNet()
    p = plan(model, input_size=(3, 16, 16))
    counts = site_recall(model, p)
    total = len(census(model))
    assert total == 2 and counts['census'] == total
    assert counts['census_converted'] + counts['census_policy'] + counts['census_limited'] == total
    assert counts['census_limited'] == 1 and 'LPPool2d' in counts['limited_reasons']
    assert counts['census_missed'] == 0
    # a plan that leaves a census site out counts it as missed
    dropped = census(model)[-1][0]
    p.sites = [s for s in p.sites if s.name != dropped]
    assert site_recall(model, p)['census_missed'] == 1


def test_coverage_picks_one_model_per_architecture_line():
    from dpp_surgery.tools.coverage import _line, pick_model, pick_models

    assert pick_models('nfnet', 2) == [pick_model('nfnet'), 'nf_regnet_b0']
    assert _line('nf_regnet_b0') == 'nf_regnet' and _line('seresnet50') == 'seresnet'
    assert _line('mobilenetv3_small_050') == 'mobilenetv3' and _line('tinynet_e') == 'tinynet'
    two = pick_models('resnet', 2)
    assert len(two) == 2 and len({_line(n) for n in two}) == 2
    assert pick_models('hrnet', 5) == ['hrnet_w18_small']  # one line only
    assert pick_model('densenet') == 'densenet121'  # '26' is not a size fragment of densenet264d


def test_saving_a_features_extractor_is_refused_with_the_fix(tmp_path):
    from dpp_surgery import CheckpointError, save

    for model in (_make('resnet18', features_only=True), _make('efficientnet_lite0', features_only=True)):
        convert(model, input_size=SIZE)
        path = tmp_path / 'features.safetensors'
        with pytest.raises(CheckpointError, match='features_only extractor.*save the converted model it was built'):
            save(model, str(path))
        assert not path.exists()
