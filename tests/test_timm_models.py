"""timm's own model checks, applied to converted models.

timm's ``tests/test_models.py`` (pytorch-image-models) checks every model for: forward (shape, no NaN, unchanged by
grad checkpointing), backward (every parameter gets a gradient), the default cfg (``forward_features`` /
``forward_head``, ``reset_classifier``, ``classifier`` and ``first_conv`` naming weights in the state dict),
``features_only`` models (channels and reductions of ``feature_info`` match the outputs), ``forward_intermediates``
and FX feature extraction (``create_feature_extractor`` with timm's leaf modules and autowrap functions gives the
eager output). Here the same checks run on models that :func:`dpp_surgery.convert` rewrote with the default policy,
and the converted model is also compared with the unconverted one: same shapes everywhere.

Default run: :data:`MODELS`, one or two small models of 35 timm families, all of which the default policy converts
(a model of that list that converts nothing fails). ``make test-slow`` adds :data:`SLOW_MODELS` and one small model
of every timm family (:func:`dpp_surgery.tools.coverage.pick_model`); there, a family whose plan has no site to convert
is skipped with the reason, and so is a check that timm itself fails on the unconverted model.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import List, Optional, Tuple

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import dpp_surgery
from dpp_surgery import NoEffectWarning, dpp_layers
from dpp_surgery.tools.coverage import pick_model

BATCH = 2
NUM_CLASSES = 42  # as timm's backward test
SMALL = 64  # input size, unless the model fixes its own (pretrained_cfg['fixed_input_size'])
MIN_SIZE = {'inception_v3': 96, 'inception_v4': 96}  # their stems and reduction blocks need more than 64 px

# small models of the families the default run covers; the default policy converts every one of them
MODELS = [
    'resnet18',                    # resnet: max pool + strided convs
    'resnetv2_18',                 # resnetv2: pre-activation
    'efficientnet_lite0',          # efficientnet
    'mixnet_s',                    # efficientnet: MixedConv2d (a container of convs)
    'mobilenetv3_small_050',       # mobilenetv3
    'mobilenetv4_conv_small_035',  # mobilenetv3 module: MobileNetV4
    'ghostnet_050',                # ghostnet
    'regnetx_002',                 # regnet
    'rexnet_100',                  # rexnet
    'dla46_c',                     # dla
    'dpn48b',                      # dpn
    'densenet121',                 # densenet: avg pool transitions
    'cs3darknet_s',                # cspnet
    'gernet_s',                    # byobnet
    'mobilevit_xxs',               # mobilevit
    'efficientvit_b0',             # efficientvit_mit
    'efficientvit_m0',             # efficientvit_msra (fixed 224 input)
    'fastvit_t8',                  # fastvit
    'repvit_m0_9',                 # repvit
    'repghostnet_050',             # repghost
    'nf_regnet_b0',                # nfnet
    'xception41',                  # xception_aligned
    'inception_v3',                # inception_v3: functional pools
    'selecsls42b',                 # selecsls
    'skresnet18',                  # sknet
    'legacy_seresnet18',           # senet
    'resnest14d',                  # resnest
    'ese_vovnet19b_slim_dw',       # vovnet
    'tresnet_m',                   # tresnet: space-to-depth stem, anti-aliased downsampling
    'hgnetv2_b0',                  # hgnet
    'levit_128s',                  # levit (fixed 224 input)
    'tiny_vit_5m_224',             # tiny_vit
    'starnet_s050',                # starnet
    'hrnet_w18_small',             # hrnet: multi-resolution fusion
    'mambaout_femto',              # mambaout: NHWC features
    'lambda_resnet26t',            # byoanet: lambda layers
    'legacy_xception',             # xception
]
# larger variants and the slowest small models: convert too, but together too slow for the default run on two cores
SLOW_MODELS = [
    # the slowest of the default list, moved here to keep `make test` inside the CI budget
    'vgg11',                       # vgg: ConvMlp head
    'res2net50_14w_8s',            # res2net
    'inception_v4',                # inception_v4
    'efficientformerv2_s0',        # efficientformer_v2
    'vgg11_bn',                    # vgg with BatchNorm (130M parameters: the ConvMlp head); ~11 s alone
    'densenet169',                 # densenet
    'dla34',                       # dla
    'cspdarknet53',                # cspnet: CSPDarkNet
    'xception65',                  # xception_aligned
    'res2net50_26w_4s',            # res2net
]

# feature wrappers named explicitly (the models of MODELS use their default one, mostly FeatureListNet)
FEATURE_CLS_CASES = [
    ('resnet18', 'getter'),               # FeatureGetterNet: features from forward_intermediates
    ('mobilenetv3_small_050', 'getter'),
    ('resnet18', 'hook'),                 # FeatureHookNet: forward hooks on the named modules
    ('resnet18', 'dict'),                 # FeatureDictNet: an ordered dict of features
]

FX_TRACER_KWARGS = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                        param_shapes_constant=True)
# torchvision's note when one mode's nodes are a subsequence of the other's; timm's models raise it as well
FX_NOTE = 'ignore:NOTE. The nodes obtained by tracing the model in:UserWarning'


def _every_family() -> list:
    params = []
    for family in timm.list_modules():
        name = pick_model(family)
        params.append(pytest.param((name, True), id=f'{family}-{name}', marks=pytest.mark.slow))
    return params


CASE_PARAMS = ([pytest.param((n, False), id=n) for n in MODELS]
               + [pytest.param((n, False), id=n, marks=pytest.mark.slow) for n in SLOW_MODELS]
               + _every_family())


def _size_candidates(name: str) -> List[Tuple[int, int, int]]:
    """Input sizes to try, smallest first: 64 px (or MIN_SIZE), else the model's own; only its own if fixed."""
    own = tuple(timm.get_pretrained_cfg_value(name, 'input_size') or (3, 224, 224))
    if timm.get_pretrained_cfg_value(name, 'fixed_input_size'):
        return [own]
    side = MIN_SIZE.get(name, SMALL)
    small = (own[0], side, side)
    return [small] if small == own else [small, own]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f'{type(e).__name__}: {text.splitlines()[0] if text else ""}'


def _input(input_size, batch: int = BATCH, seed: int = 1) -> torch.Tensor:
    # own generator: the same input whichever test built the model first
    return torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def _convert(name: str, model: torch.nn.Module, input_size, sweep: bool) -> None:
    """Convert ``model`` in place with the default policy; nothing to convert skips (sweep) or fails (MODELS)."""
    p = dpp_surgery.plan(model, input_size=input_size)
    if not p.to_replace:
        reasons = '; '.join(sorted({f'{s.kind}: {s.reason}' for s in p.sites})) or 'no downsampling site'
        message = f'{name}: the plan at {input_size} has nothing to convert ({len(p.sites)} sites: {reasons})'
        if sweep:
            pytest.skip(message)
        raise AssertionError(message)
    with warnings.catch_warnings():
        warnings.simplefilter('error', NoEffectWarning)
        dpp_surgery.convert(model, input_size=input_size)
    assert dpp_layers(model), f'{name}: convert left no DPP2d layer though the plan replaces {len(p.to_replace)} sites'


class Case:
    """One model: the unconverted original (eval) and its converted copy, built once for all tests of the model."""

    def __init__(self, name: Optional[str], sweep: bool):
        self.name, self.sweep = name, sweep
        self._built = None
        self._failed: Optional[BaseException] = None  # a failed (or skipped) build fails (skips) every test alike

    def _build(self):
        if self._failed is not None:
            raise self._failed
        try:
            self._try_build()
        except (Exception, pytest.skip.Exception) as e:
            self._failed = e
            raise

    def _try_build(self):
        name = self.name
        if name is None:
            pytest.skip('the family registers no model')
        model = self.reference('create_model', lambda: _create(name, num_classes=NUM_CLASSES).eval())
        # MODELS run at their chosen size; the sweep falls back to the model's own where the small one fails (to run
        # or to plan)
        sizes = _size_candidates(name) if self.sweep else _size_candidates(name)[:1]
        for i, size in enumerate(sizes):
            last = i == len(sizes) - 1
            try:
                with torch.no_grad():
                    model(_input(size))
                if not last:
                    dpp_surgery.plan(model, input_size=size)
            except Exception as e:  # noqa: BLE001
                if not last:
                    continue
                if self.sweep:
                    pytest.skip(f'{name}: the unconverted model fails at {size}: {_first_line(e)}')
                raise
            break
        converted = copy.deepcopy(model)
        _convert(name, converted, size, self.sweep)
        self._built = (model, converted.eval(), size)

    @property
    def input_size(self) -> Tuple[int, int, int]:
        if self._built is None:
            self._build()
        return self._built[2]

    def original(self) -> torch.nn.Module:
        """The unconverted model (eval); a copy, to change as a test likes."""
        if self._built is None:
            self._build()
        return copy.deepcopy(self._built[0])

    def converted(self) -> torch.nn.Module:
        """The converted model (eval); a copy, to change as a test likes."""
        if self._built is None:
            self._build()
        return copy.deepcopy(self._built[1])

    def reference(self, what: str, fn):
        """``fn()`` on the unconverted model; in the family sweep a check timm itself fails there is skipped."""
        if not self.sweep:
            return fn()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            pytest.skip(f'{self.name}: {what} fails on the unconverted model too: {_first_line(e)}')


@pytest.fixture(scope='module', params=CASE_PARAMS)
def case(request):
    """Module scope: pytest runs all tests of one model together, and builds and converts it once."""
    name, sweep = request.param
    return Case(name, sweep)


def _shapes(tensors) -> List[tuple]:
    return [tuple(t.shape) for t in tensors]


def _shape_of(value):
    """Shape of a tensor, or the shapes of a (nested) list / tuple / dict of them (some models return lists)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, dict):
        return {k: _shape_of(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shape_of(v) for v in value]
    return type(value).__name__


def _as_list(features) -> List[torch.Tensor]:
    return list(features.values()) if isinstance(features, dict) else list(features)


# ---------------------------------------------------------------------------------------------------------------
# timm's test_model_forward


def test_forward(case):
    name, x = case.name, _input(case.input_size)
    with torch.no_grad():
        ref = case.original()(x)
    model = case.converted()
    with torch.no_grad():
        out = model(x)
    assert tuple(out.shape) == tuple(ref.shape), f'{name}: converted output {tuple(out.shape)} != unconverted ' \
                                                 f'{tuple(ref.shape)}'
    if model.num_classes:
        assert tuple(out.shape) == (BATCH, NUM_CLASSES), f'{name}: output {tuple(out.shape)} != ' \
                                                         f'{(BATCH, NUM_CLASSES)}'
    assert torch.isfinite(out).all(), f'{name}: converted output has NaN/inf'


# ---------------------------------------------------------------------------------------------------------------
# timm's test_model_backward


def test_backward(case):
    name, x = case.name, _input(case.input_size)
    model = case.converted().train()
    params = dict(model.named_parameters())
    dpp_names = {f'{n}.{p}' for n, _ in dpp_layers(model) for p in ('theta_alpha', 'theta_lambda')}
    assert dpp_names and dpp_names <= set(params), \
        f'{name}: DPP parameters missing from named_parameters(): {sorted(dpp_names - set(params))[:10]}'
    out = model(x)
    if isinstance(out, tuple):
        out = torch.cat(out)
    out.mean().backward()
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f'{name}: {len(missing)} of {len(params)} parameters get no gradient: {missing[:20]}'
    num_params = sum(p.numel() for p in params.values())
    num_grad = sum(p.grad.numel() for p in params.values() if p.grad is not None)
    assert num_grad == num_params, f'{name}: gradients hold {num_grad} elements, the parameters {num_params}'
    if model.num_classes:
        assert out.shape[-1] == NUM_CLASSES, f'{name}: train-mode output {tuple(out.shape)}, not {NUM_CLASSES} classes'
    assert not torch.isnan(out).any(), f'{name}: train-mode output has NaN'
    nan_grads = [n for n, p in params.items() if torch.isnan(p.grad).any()]
    assert not nan_grads, f'{name}: NaN in the gradients of {nan_grads[:20]}'


# ---------------------------------------------------------------------------------------------------------------
# grad checkpointing (timm's forward test, made a training check)

# models of MODELS whose checkpointed segments hold DPP layers, one per checkpointing code path: ResNet's
# checkpoint_seq over the stages, EfficientNet/MobileNetV3's over the blocks, ByobNet/MobileViT's, EfficientViT's and
# StarNet's over the stages (the default run checks these; the others of MODELS cost the same and add little)
GRAD_CKPT_MODELS = ('resnet18', 'mobilenetv3_small_050', 'mobilevit_xxs', 'efficientvit_b0', 'starnet_s050')


def _train_step(model: torch.nn.Module, x: torch.Tensor, checkpointing: bool):
    """One training forward + backward; the output, every parameter's gradient and the forward calls per module."""
    from torch.utils.checkpoint import set_checkpoint_early_stop
    model.set_grad_checkpointing(checkpointing)
    calls = {}
    for n, m in model.named_modules():
        m.register_forward_hook(lambda mod, args, out, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    torch.manual_seed(3)  # the same dropout / drop-path draws in both runs (checkpointing replays the RNG state)
    # without early stop, a recomputed segment runs whole (with it, PyTorch stops once the tensors that backward
    # needs are back, which can leave out the DPP layer that ends a block)
    with set_checkpoint_early_stop(False):
        out = model(x)
        if isinstance(out, tuple):
            out = torch.cat(out)
        out.pow(2).mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}, calls


def test_grad_checkpointing(case):
    """Train mode, forward + backward with ``set_grad_checkpointing(True)`` and with it off: same output and the
    same gradient for every parameter (DPP's theta included), and the checkpointed run recomputed its segments in
    backward: DPP layers' forwards ran twice."""
    name = case.name
    if name not in GRAD_CKPT_MODELS:
        pytest.skip(f'{name}: grad checkpointing is checked on {", ".join(GRAD_CKPT_MODELS)}')
    x = _input(case.input_size)
    out0, grads0, calls0 = _train_step(case.converted().train(), x, False)
    out1, grads1, calls1 = _train_step(case.converted().train(), x, True)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f'{name}: output with grad checkpointing differs: {m}')
    assert grads1.keys() == grads0.keys()
    dpp_names = [n for n, _ in dpp_layers(case.converted())]
    thetas = {f'{n}.{p}' for n in dpp_names for p in ('theta_alpha', 'theta_lambda')}
    assert thetas <= grads0.keys()
    for n, g0 in grads0.items():
        g1 = grads1[n]
        assert g0 is not None and g1 is not None, f'{name}: {n} gets no gradient (checkpointing {g0 is not None})'
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=n: f'{name}: gradient of {n} with grad checkpointing differs: {m}')
    assert all(calls0[n] == 1 for n in dpp_names), f'{name}: DPP forwards without checkpointing: {calls0}'
    recomputed = [n for n in dpp_names if calls1[n] == 2]
    assert recomputed, (f'{name}: with grad checkpointing no DPP layer ran again in backward: nothing was '
                        f'recomputed ({ {n: calls1[n] for n in dpp_names} })')


# ---------------------------------------------------------------------------------------------------------------
# timm's test_model_default_cfgs


def _names(value) -> tuple:
    return (value,) if isinstance(value, str) else tuple(value)


def test_default_cfg_and_head(case):
    name, x = case.name, _input(case.input_size)
    original, model = case.original(), case.converted()
    for attr in ('num_classes', 'num_features', 'head_hidden_size'):
        assert getattr(model, attr) == getattr(original, attr), \
            f'{name}: {attr} {getattr(model, attr)} after conversion, {getattr(original, attr)} before'
    assert model.num_features > 0 and model.head_hidden_size > 0, f'{name}: num_features/head_hidden_size not > 0'

    # the cfg names the classifier and the first conv(s) of the converted model (as timm's test: their weights are
    # in the state dict)
    state_dict, modules = model.state_dict(), dict(model.named_modules())
    for cfg_name in ('default_cfg', 'pretrained_cfg'):
        cfg = getattr(model, cfg_name)
        assert cfg == getattr(original, cfg_name), f'{name}: {cfg_name} changed by the conversion'
        if cfg.get('num_classes', None):
            for c in _names(cfg['classifier']):
                assert c + '.weight' in state_dict, \
                    f'{name}: {cfg_name} classifier {c!r} has no weight in the converted state_dict'
                assert c in modules, f'{name}: {cfg_name} classifier {c!r} is not a module of the converted model'
        first_conv = _names(cfg['first_conv'])
        assert first_conv, f'{name}: {cfg_name} names no first_conv'
        for fc in first_conv:
            assert fc + '.weight' in state_dict, \
                f'{name}: {cfg_name} first_conv {fc!r} has no weight in the converted state_dict'
            assert fc in modules, f'{name}: {cfg_name} first_conv {fc!r} is not a module of the converted model'

    # forward_features (unpooled) then forward_head gives forward; pre_logits has head_hidden_size features
    with torch.no_grad():
        ref_features = original.forward_features(x)
        out = model(x)
        features = model.forward_features(x)
        head = model.forward_head(features)
        pre_logits = model.forward_head(features, pre_logits=True)
    assert _shape_of(features) == _shape_of(ref_features), \
        f'{name}: forward_features {_shape_of(features)} after conversion, {_shape_of(ref_features)} before'
    torch.testing.assert_close(head, out, msg=lambda m: f'{name}: forward_head(forward_features(x)) != model(x): {m}')
    if not isinstance(features, torch.Tensor):
        return  # as timm's test: a model whose features are a list (efficientvim) is not checked further
    assert pre_logits.shape[1] == model.head_hidden_size, \
        f'{name}: pre_logits has {pre_logits.shape[1]} features, head_hidden_size is {model.head_hidden_size}'

    # without the classifier the output is pooled: (N, head_hidden_size), as pre_logits (num_features for all but
    # timm's "early pool" models, whose head has a conv/linear after the pool)
    model.reset_classifier(0)
    assert model.num_classes == 0, f'{name}: num_classes {model.num_classes} after reset_classifier(0)'
    with torch.no_grad():
        pooled = model(x)
    assert tuple(pooled.shape) == (BATCH, model.head_hidden_size), \
        f'{name}: output {tuple(pooled.shape)} after reset_classifier(0), not {(BATCH, model.head_hidden_size)}'
    assert pooled.shape == pre_logits.shape, \
        f'{name}: output {tuple(pooled.shape)} after reset_classifier(0) != pre_logits {tuple(pre_logits.shape)}'

    # without the global pool as well: the unpooled map, as the unconverted model's (where timm's gives one)
    try:
        original.reset_classifier(0, '')
        with torch.no_grad():
            ref_map = original(x)
    except Exception:  # noqa: BLE001 - the model has no poolless head (timm's EARLY_POOL / non-standard models)
        ref_map = None
    if ref_map is not None and ref_map.ndim == 4:
        model.reset_classifier(0, '')
        with torch.no_grad():
            unpooled = model(x)
        assert unpooled.shape == ref_map.shape, \
            f'{name}: output {tuple(unpooled.shape)} after reset_classifier(0, "") != unconverted ' \
            f'{tuple(ref_map.shape)}'


# ---------------------------------------------------------------------------------------------------------------
# timm's test_model_forward_features (features_only)


def _check_features(name: str, input_size, feature_cls: Optional[str] = None, sweep: bool = False,
                    reference=None) -> None:
    what = name + (f' (feature_cls={feature_cls!r})' if feature_cls else '')
    kwargs = dict(features_only=True)
    if feature_cls:
        kwargs['feature_cls'] = feature_cls
    x = _input(input_size)

    def build_and_run():
        m = _create(name, **kwargs).eval()
        with torch.no_grad():
            return m, m(x)

    original, ref = (reference or (lambda what, fn: fn()))('features_only', build_and_run)
    ref_is_dict, ref = isinstance(ref, dict), _as_list(ref)
    feature_info = copy.deepcopy(original.feature_info)
    model = copy.deepcopy(original)
    _convert(what, model, input_size, sweep)
    assert hasattr(model, 'feature_info'), f'{what}: the converted features model has no feature_info'
    channels, reduction = model.feature_info.channels(), model.feature_info.reduction()
    assert channels == feature_info.channels() and reduction == feature_info.reduction(), \
        f'{what}: feature_info changed by the conversion: channels {feature_info.channels()} -> {channels}, ' \
        f'reduction {feature_info.reduction()} -> {reduction}'
    assert len(channels) >= 3, f'{what}: only {len(channels)} feature levels'
    with torch.no_grad():
        out = model(x)
    if ref_is_dict:
        assert isinstance(out, dict), f'{what}: the converted model returns {type(out).__name__}, not a dict'
    out = _as_list(out)
    assert len(out) == len(ref), f'{what}: {len(out)} features after conversion, {len(ref)} before'
    assert _shapes(out) == _shapes(ref), \
        f'{what}: feature shapes {_shapes(out)} after conversion, {_shapes(ref)} before'
    assert len(out) == len(channels), f'{what}: {len(out)} features, feature_info lists {len(channels)}'
    # as timm's test: the layout is the model's output_fmt (NCHW but for a few, e.g. mambaout's NHWC)
    output_fmt = getattr(model, 'output_fmt', 'NCHW')
    c_dim, (h_dim, w_dim) = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
    h, w = input_size[-2:]
    for i, (c, r, o) in enumerate(zip(channels, reduction, out)):
        assert o.ndim == 4 and o.shape[0] == BATCH and o.shape[c_dim] == c, \
            f'{what}: feature {i} has shape {tuple(o.shape)}, feature_info says {c} channels ({output_fmt})'
        assert o.shape[h_dim] <= math.ceil(h / r) + 1 and o.shape[w_dim] <= math.ceil(w / r) + 1, \
            f'{what}: feature {i} is {(o.shape[h_dim], o.shape[w_dim])} for input {(h, w)} at reduction {r}'
        assert not torch.isnan(o).any(), f'{what}: feature {i} has NaN'


def test_features_only(case):
    _check_features(case.name, case.input_size, sweep=case.sweep, reference=case.reference)


@pytest.mark.parametrize('name,feature_cls', FEATURE_CLS_CASES, ids=[f'{n}-{c}' for n, c in FEATURE_CLS_CASES])
def test_features_only_feature_cls(name, feature_cls):
    _check_features(name, _size_candidates(name)[0], feature_cls)


# ---------------------------------------------------------------------------------------------------------------
# timm's test_model_forward_intermediates


def test_forward_intermediates(case):
    name, x = case.name, _input(case.input_size)
    original = case.original()
    if not hasattr(original, 'forward_intermediates'):
        pytest.skip(f'{name}: {type(original).__name__} has no forward_intermediates')
    with torch.no_grad():
        ref_final, ref_inter = case.reference(
            'forward_intermediates', lambda: original.forward_intermediates(x, output_fmt='NCHW'))
    model = case.converted()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt='NCHW')
        only = model.forward_intermediates(x, output_fmt='NCHW', intermediates_only=True)
        features = model.forward_features(x)
    assert _shape_of(final) == _shape_of(ref_final), \
        f'{name}: forward_intermediates final {_shape_of(final)} after conversion, {_shape_of(ref_final)} before'
    assert _shapes(inter) == _shapes(ref_inter), \
        f'{name}: intermediates {_shapes(inter)} after conversion, {_shapes(ref_inter)} before'
    assert isinstance(only, (list, tuple)) and _shapes(only) == _shapes(ref_inter), \
        f'{name}: intermediates_only=True gives {_shapes(only) if isinstance(only, (list, tuple)) else type(only)}, ' \
        f'not {_shapes(ref_inter)}'
    for i, (a, b) in enumerate(zip(only, inter)):
        torch.testing.assert_close(a, b, msg=lambda m: f'{name}: intermediates_only=True intermediate {i} differs: {m}')
    torch.testing.assert_close(final, features,
                               msg=lambda m: f'{name}: forward_intermediates final != forward_features: {m}')
    # as timm's test: the intermediates match the model's feature_info
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    channels = info.channels()
    assert len(inter) == len(channels), f'{name}: {len(inter)} intermediates, feature_info lists {len(channels)}'
    for i, (c, o) in enumerate(zip(channels, inter)):
        assert o.shape[1] == c, f'{name}: intermediate {i} has {o.shape[1]} channels, feature_info says {c}'
        assert not torch.isnan(o).any(), f'{name}: intermediate {i} has NaN'


# ---------------------------------------------------------------------------------------------------------------
# timm's test_model_forward_fx


@pytest.mark.filterwarnings(FX_NOTE)
def test_forward_fx(case):
    name, x = case.name, _input(case.input_size)

    def extractor(m):
        # as timm's test: the last node of each mode's graph (the output)
        train_nodes, eval_nodes = get_graph_node_names(m, tracer_kwargs=FX_TRACER_KWARGS)
        return create_feature_extractor(m, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                        tracer_kwargs=FX_TRACER_KWARGS).eval()

    if case.sweep:  # a family timm's FX test cannot trace either is skipped
        case.reference('FX feature extraction', lambda: extractor(case.original()))
    model = case.converted()
    fx_model = extractor(model)
    with torch.inference_mode():
        out = model(x)
        fx_out = list(fx_model(x).values())
    assert len(fx_out) == 1, f'{name}: the FX extractor returns {len(fx_out)} outputs, not the final node only'
    torch.testing.assert_close(fx_out[0], out,
                               msg=lambda m: f'{name}: FX feature extractor output != eager output: {m}')
    assert torch.isfinite(out).all(), f'{name}: output has NaN/inf'
