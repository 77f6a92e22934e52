"""save/load: exact rebuild, atomic writes, clear errors for bad files."""
import json
import os
import pathlib

import pytest
import torch

import dpp_surgery
from dpp_surgery import CheckpointError, ConversionPolicy, convert, create, load, save
from dpp_surgery.checkpoint import FORMAT, read_metadata


def _converted(name='resnet18', **policy):
    torch.manual_seed(0)
    model = create(name, num_classes=7)
    convert(model, input_size=(3, 64, 64), **policy)
    with torch.no_grad():  # make the DPP parameters differ from their init, so the round trip is meaningful
        for _, layer in dpp_surgery.dpp_layers(model):
            layer.theta_alpha.normal_()
            layer.theta_lambda.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize('policy', [{}, {'placement': 'post', 'max_pool': {'guide': 'full', 'reward': 'asym'}},
                                    {'placement': 'pre', 'targets': ['strided_conv']}])
def test_round_trip_rebuilds_identical_model(tmp_path, policy):
    model = _converted(**policy)
    path = save(model, str(tmp_path / 'm.safetensors'))
    meta = read_metadata(path)
    assert meta['model_name'] == 'resnet18' and meta['model_kwargs']['num_classes'] == 7
    assert len(meta['conversions']) == 1 and meta['dpp_surgery_version'] == dpp_surgery.__version__
    loaded = load(path).eval()
    assert type(loaded) is type(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert [n for n, _ in dpp_surgery.dpp_layers(loaded)] == [n for n, _ in dpp_surgery.dpp_layers(model)]


def _randomise(model, seed=0):
    """Every floating parameter and buffer (DPP theta_alpha/theta_lambda, convs, norms, running stats) moved off its
    init, so that a rebuild that drops or re-initialises any of them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g)
                t.copy_(t.abs() + 0.5 + noise.abs() if name.endswith('running_var') else t + 0.3 * noise)
    return model


def test_two_conversions_replay_in_order(tmp_path):
    model = create('resnet10t', num_classes=5)
    convert(model, input_size=(3, 64, 64), targets=['max_pool'], max_pool={'init': 'max', 'reward': 'asym'})
    convert(model, input_size=(3, 48, 48), targets=['strided_conv'], placement='post',
            strided_conv={'guide': 'full'})
    _randomise(model).eval()
    names = [n for n, _ in dpp_surgery.dpp_layers(model)]
    assert names == ['maxpool', 'layer2.0.conv1.dpp', 'layer3.0.conv1.dpp', 'layer4.0.conv1.dpp']
    for _, layer in dpp_surgery.dpp_layers(model):  # not at init (the presets are constant across channels)
        assert layer.theta_alpha.std() > 0 and layer.theta_lambda.std() > 0
    path = save(model, str(tmp_path / 'm.safetensors'))
    meta = read_metadata(path)
    assert [(c['policy']['targets'], c['input_size']) for c in meta['conversions']] == [
        (['max_pool'], [3, 64, 64]), (['strided_conv'], [3, 48, 48])]
    loaded = load(path).eval()
    assert loaded._dpp_surgery_history == model._dpp_surgery_history  # the same policies and sizes, in order
    assert [n for n, _ in dpp_surgery.dpp_layers(loaded)] == names
    assert [type(m) for _, m in loaded.named_modules()] == [type(m) for _, m in model.named_modules()]
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        assert out.isfinite().all() and out.std() > 0
        torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)


def test_allowed_model_kwargs_round_trip(tmp_path):
    model = create('resnet10t', num_classes=3, in_chans=1, drop_rate=0.1, global_pool='max', drop_path_rate=None)
    path = save(_randomise(model).eval(), str(tmp_path / 'k.safetensors'))
    assert read_metadata(path)['model_kwargs'] == {'num_classes': 3, 'in_chans': 1, 'drop_rate': 0.1,
                                                   'global_pool': 'max'}
    loaded = load(path).eval()
    assert loaded.conv1[0].in_channels == 1 and loaded.drop_rate == 0.1 and loaded.global_pool.pool_type == 'max'
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_unconverted_model_round_trip(tmp_path):
    model = create('resnet18').eval()
    loaded = load(save(model, str(tmp_path / 'plain.safetensors'))).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_no_overwrite_without_asking(tmp_path):
    model = _converted()
    path = str(tmp_path / 'm.safetensors')
    save(model, path)
    before = pathlib.Path(path).read_bytes()
    with pytest.raises(FileExistsError, match='exists; pass overwrite=True'):
        save(model, path)
    assert pathlib.Path(path).read_bytes() == before
    save(model, path, overwrite=True)


def test_crash_during_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch as st
    model = _converted()
    path = tmp_path / 'm.safetensors'
    save(model, str(path))
    good = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(st, 'save_file', crash)
    with pytest.raises(OSError, match='disk full'):
        save(model, str(path), overwrite=True)
    assert path.read_bytes() == good  # the old checkpoint is intact
    assert sorted(os.listdir(tmp_path)) == ['m.safetensors']  # and no temporary file is left


def test_truncated_file(tmp_path):
    path = save(_converted(), str(tmp_path / 'm.safetensors'))
    data = pathlib.Path(path).read_bytes()
    for cut in (4, 100, len(data) // 2):
        bad = tmp_path / f'cut{cut}.safetensors'
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match='truncated|corrupted'):
            load(str(bad))


def test_corrupted_header(tmp_path):
    path = save(_converted(), str(tmp_path / 'm.safetensors'))
    data = bytearray(pathlib.Path(path).read_bytes())
    data[10:20] = b'\xff' * 10
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load(str(bad))


def test_other_formats(tmp_path):
    pt = tmp_path / 'model.pt'
    torch.save(create('resnet18').state_dict(), pt)
    with pytest.raises(CheckpointError, match='not a readable safetensors file'):
        load(str(pt))
    from safetensors.torch import save_file
    plain = tmp_path / 'plain.safetensors'
    save_file({'w': torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match='not a dpp_surgery checkpoint'):
        load(str(plain))
    with pytest.raises(CheckpointError, match='does not exist'):
        load(str(tmp_path / 'missing.safetensors'))


def test_mismatching_weights(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = save(_converted(), str(tmp_path / 'm.safetensors'))
    with safe_open(path, framework='pt') as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta['model_name'] = 'resnet34'  # the weights are resnet18's
    save_file(tensors, str(tmp_path / 'wrong.safetensors'), metadata=meta)
    with pytest.raises(CheckpointError, match='does not match the rebuilt resnet34'):
        load(str(tmp_path / 'wrong.safetensors'))
    meta2 = dict(meta, model_name='resnet18', conversions='{not json')
    save_file(tensors, str(tmp_path / 'meta.safetensors'), metadata=meta2)
    with pytest.raises(CheckpointError, match='damaged dpp_surgery metadata'):
        load(str(tmp_path / 'meta.safetensors'))


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    import pickle
    path = save(_converted(), str(tmp_path / 'm.safetensors'))

    def forbidden(*a, **k):
        raise AssertionError('load() must not unpickle')

    monkeypatch.setattr(pickle, 'load', forbidden)
    monkeypatch.setattr(pickle, 'loads', forbidden)
    monkeypatch.setattr(torch, 'load', forbidden)
    load(path)
    assert json.loads(json.dumps(read_metadata(path)))['model_name'] == 'resnet18'


# ---------------------------------------------------------------------------------------------------------------
# crafted files: a checkpoint is data, never instructions; every metadata field is checked before anything is built

_JSON_FIELDS = ('model_kwargs', 'conversions', 'preprocessing', 'extra')


def _valid_meta():
    """Metadata that passes every check (no model is built to make it)."""
    return {
        'format': FORMAT, 'dpp_surgery_version': dpp_surgery.__version__, 'model_name': 'resnet10t',
        'model_kwargs': {'num_classes': 7, 'in_chans': 3, 'drop_rate': 0.0},
        'conversions': [{'policy': ConversionPolicy().to_dict(), 'input_size': [3, 64, 64]},
                        {'policy': {'targets': ['strided_conv'], 'placement': 'post'}, 'input_size': [3, 32, 32]}],
        'preprocessing': {'input_size': [3, 64, 64], 'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25],
                          'interpolation': 'bicubic', 'crop_pct': 0.875, 'crop_mode': 'center'},
        'extra': {'epoch': 1, 'notes': {'nested': [1, 2, {'ok': True}]}},
    }


def _write_meta(path, meta):
    """A safetensors file with one tiny tensor and ``meta``: a str value is written as is, others as JSON."""
    from safetensors.torch import save_file
    raw = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    save_file({'w': torch.zeros(1)}, str(path), metadata=raw)
    return str(path)


def _top(key, value):
    def change(meta):
        if value is _DROP:
            del meta[key]
        else:
            meta[key] = value
    return change


_DROP = object()


def _kw(key, value):
    return lambda meta: meta['model_kwargs'].__setitem__(key, value)


def _step(key, value, index=0):
    return lambda meta: meta['conversions'][index].__setitem__(key, value)


def _pol(key, value):
    return lambda meta: meta['conversions'][0]['policy'].__setitem__(key, value)


def _pre(key, value):
    return lambda meta: meta['preprocessing'].__setitem__(key, value)


def _case(change, fragment, id):
    return pytest.param(change, fragment, id=id)


_NUM_CLASSES = 'model_kwargs.num_classes must be an integer from 0 to 100000'
_NOT_ALLOWED = 'is not an allowed model kwarg'
_SIZE = 'conversions[0].input_size must be 3 integers'
CRAFTED = [
    # format and top-level entries
    _case(_top('format', 'dpp_surgery.checkpoint.v2'), 'written by a newer dpp_surgery', 'format-v2'),
    _case(_top('format', 'dpp_surgery.checkpoint.v17'), 'upgrade dpp_surgery', 'format-v17'),
    _case(_top('format', 'dpp_surgery.checkpoint.v0'), 'unknown dpp_surgery checkpoint format', 'format-v0'),
    _case(_top('format', 'pickle'), 'not a dpp_surgery checkpoint', 'format-other'),
    _case(_top('exec', 'import os'), "unknown metadata entry 'exec'", 'unknown-entry'),
    _case(_top('model_kwargs', _DROP), "no 'model_kwargs' entry", 'missing-kwargs'),
    _case(_top('conversions', _DROP), "no 'conversions' entry", 'missing-conversions'),
    _case(_top('dpp_surgery_version', 'v' * 500), 'dpp_surgery_version must be a version string', 'long-version'),
    # model name: a timm registry name, never a path, a hub id or a folder
    _case(_top('model_name', 'no_such_net'), "model_name 'no_such_net' is not a timm model", 'unknown-model'),
    _case(_top('model_name', 'resnet10tt'), "model_name 'resnet10tt' is not a timm model (did you mean 'resnet10t'?)",
          'misspelt-model'),
    _case(_top('model_name', 'hf-hub:timm/resnet18.a1_in1k'), 'model_name must be a timm model name', 'hub-model'),
    _case(_top('model_name', 'local-dir:/etc'), 'model_name must be a timm model name', 'local-dir-model'),
    _case(_top('model_name', '../resnet18'), 'model_name must be a timm model name', 'path-model'),
    _case(_top('model_name', 'resnet18.nope'), "'nope' is not a pretrained tag of resnet18", 'bad-tag'),
    _case(_top('model_name', 'r' * 300), 'model_name must be a timm model name', 'long-model'),
    # model kwargs: an allowlist with types and ranges; nothing that names a file, URL, hub, class or callable
    _case(_kw('checkpoint_path', '/etc/passwd'), f'model_kwargs.checkpoint_path {_NOT_ALLOWED}', 'checkpoint_path'),
    _case(_kw('pretrained_cfg_overlay', {'file': '/etc/passwd'}), f'model_kwargs.pretrained_cfg_overlay {_NOT_ALLOWED}',
          'pretrained_cfg_overlay-file'),
    _case(_kw('pretrained_cfg', {'url': 'https://example.com/w.pth'}), f'model_kwargs.pretrained_cfg {_NOT_ALLOWED}',
          'pretrained_cfg-url'),
    _case(_kw('cache_dir', '/tmp'), f'model_kwargs.cache_dir {_NOT_ALLOWED}', 'cache_dir'),
    _case(_kw('pretrained', True), f'model_kwargs.pretrained {_NOT_ALLOWED}', 'pretrained'),
    _case(_kw('act_layer', 'torch.nn.ReLU'), f'model_kwargs.act_layer {_NOT_ALLOWED}', 'act_layer'),
    _case(_kw('features_only', True), f'model_kwargs.features_only {_NOT_ALLOWED}', 'features_only'),
    _case(_kw('num_classes', 'x'), _NUM_CLASSES, 'num_classes-str'),
    _case(_kw('num_classes', True), _NUM_CLASSES, 'num_classes-bool'),
    _case(_kw('num_classes', -1), _NUM_CLASSES, 'num_classes-negative'),
    _case(_kw('num_classes', 10 ** 9), _NUM_CLASSES, 'num_classes-huge'),
    _case(_kw('num_classes', 7.5), _NUM_CLASSES, 'num_classes-float'),
    _case(_kw('in_chans', 0), 'model_kwargs.in_chans must be an integer from 1 to 16', 'in_chans-0'),
    _case(_kw('in_chans', 4096), 'model_kwargs.in_chans must be an integer from 1 to 16', 'in_chans-huge'),
    _case(_kw('in_chans', '3'), 'model_kwargs.in_chans must be an integer', 'in_chans-str'),
    _case(_kw('drop_rate', 1.0), 'model_kwargs.drop_rate must be a number in [0, 1)', 'drop_rate-1'),
    _case(_kw('drop_path_rate', -0.1), 'model_kwargs.drop_path_rate must be a number in [0, 1)', 'drop_path-neg'),
    _case(_kw('drop_block_rate', 'https://example.com'), 'model_kwargs.drop_block_rate must be a number', 'drop-url'),
    _case(_kw('drop_rate', True), 'model_kwargs.drop_rate must be a number in [0, 1)', 'drop_rate-bool'),
    _case(_kw('drop_rate', 10 ** 400), 'model_kwargs.drop_rate must be a number in [0, 1)', 'drop_rate-huge-int'),
    _case(_kw('global_pool', 'eval'), "model_kwargs.global_pool must be one of '', 'avg'", 'global_pool'),
    _case(_kw('output_stride', 7), 'model_kwargs.output_stride must be one of 8, 16, 32', 'output_stride'),
    _case(_kw('img_size', 100000), 'model_kwargs.img_size must be an integer or a pair', 'img_size-huge'),
    _case(_kw('img_size', [224]), 'model_kwargs.img_size must be an integer or a pair', 'img_size-one'),
    _case(_top('model_kwargs', [1, 2]), 'model_kwargs must be an object', 'kwargs-list'),
    _case(_top('model_kwargs', '{not json'), 'damaged dpp_surgery metadata: model_kwargs is not valid JSON',
          'kwargs-not-json'),
    _case(_top('model_kwargs', '{"a": ' * 50000 + '1' + '}' * 50000), 'model_kwargs is nested too deeply',
          'kwargs-deep'),
    # conversions: a bounded list of {policy, input_size}
    _case(lambda m: m.__setitem__('conversions', m['conversions'][:1] * 17),
          'conversions holds 17 conversions; allowed: at most 16', 'too-many-conversions'),
    _case(_top('conversions', {'policy': {}}), 'conversions must be a list', 'conversions-object'),
    _case(_top('conversions', [1]), 'conversions[0] must be an object with exactly "policy" and "input_size"',
          'conversion-int'),
    _case(_step('script', 'rm -rf /'), 'conversions[0] must be an object with exactly', 'conversion-extra-key'),
    _case(_step('input_size', [3, 12000, 12000]), _SIZE, 'input_size-huge'),
    _case(_step('input_size', [3, 64]), _SIZE, 'input_size-two'),
    _case(_step('input_size', [3, 64.0, 64]), _SIZE, 'input_size-float'),
    _case(_step('input_size', [0, 64, 64]), _SIZE, 'input_size-no-channels'),
    _case(_step('input_size', [17, 64, 64]), _SIZE, 'input_size-channels'),
    _case(_step('input_size', [3, True, 64]), _SIZE, 'input_size-bool'),
    _case(_step('input_size', '3x64x64'), _SIZE, 'input_size-str'),
    _case(_step('input_size', [3, 64, 0], index=1), 'conversions[1].input_size must be 3 integers',
          'second-input_size'),
    # policies: ConversionPolicy's fields with JSON types, known choices, leaf modules from torch.nn / timm.layers
    _case(_pol('exec', 'x'), "conversions[0].policy: unknown policy field 'exec'", 'policy-unknown'),
    _case(_step('policy', ['max_pool']), 'conversions[0].policy must be an object', 'policy-list'),
    _case(_pol('placement', 'middle'), "conversions[0].policy.placement must be one of 'post', 'pre', 'block'",
          'placement'),
    _case(_pol('targets', 'max_pool'), 'conversions[0].policy.targets must be a list', 'targets-str'),
    _case(_pol('targets', ['conv']), "conversions[0].policy.targets must be one of 'max_pool'", 'targets-unknown'),
    _case(_pol('include', 'layer*'), 'conversions[0].policy.include must be a list', 'include-str'),
    _case(_pol('include', [1]), 'conversions[0].policy.include must be a list of name patterns', 'include-int'),
    _case(_pol('exclude', ['x' * 1000]), 'conversions[0].policy.exclude must be a list', 'exclude-long'),
    _case(_pol('exclude', ['a'] * 1000), 'conversions[0].policy.exclude must be a list of at most 256', 'exclude-many'),
    _case(_pol('include_types', ['os.system']), 'conversions[0].policy.include_types must be a list of class names',
          'include_types-dotted'),
    _case(_pol('exclude_types', [{'__class__': 1}]), 'conversions[0].policy.exclude_types', 'exclude_types-object'),
    _case(_pol('skip_stem', 'yes'), 'conversions[0].policy.skip_stem must be true or false', 'skip_stem-str'),
    _case(_pol('skip_global', 1), 'conversions[0].policy.skip_global must be true or false', 'skip_global-int'),
    _case(_pol('max_pool', 'lite'), 'conversions[0].policy.max_pool must be an object', 'variant-str'),
    _case(_pol('max_pool', {'guide': 'huge'}), "conversions[0].policy.max_pool.guide must be one of 'lite', 'full'",
          'guide'),
    _case(_pol('avg_pool', {'norm': 1}), 'conversions[0].policy.avg_pool.norm must be one of', 'norm-int'),
    _case(_pol('max_pool', {'colour': 'red'}), "conversions[0].policy.max_pool has unknown DPP variant option 'colour'",
          'variant-unknown'),
    _case(_pol('strided_conv', {'init': 'huge'}), 'conversions[0].policy.strided_conv.init must be one of', 'init-str'),
    _case(_pol('strided_conv', {'init': [1.0, float('nan')]}), 'conversions[0].policy.strided_conv.init', 'init-nan'),
    _case(_pol('strided_conv', {'init': [1.0, float('inf')]}), 'conversions[0].policy.strided_conv.init', 'init-inf'),
    _case(_pol('strided_conv', {'init': [True, 1]}), 'conversions[0].policy.strided_conv.init', 'init-bool'),
    _case(_pol('strided_conv', {'init': [1, 2, 3]}), 'conversions[0].policy.strided_conv.init', 'init-three'),
    _case(_pol('strided_conv', {'init': [-1, 1]}), 'conversions[0].policy.strided_conv.init', 'init-negative'),
    _case(_pol('strided_conv', {'init': [10 ** 400, 1]}), 'conversions[0].policy.strided_conv.init', 'init-huge-int'),
    _case(_pol('max_pool', {'init': 'max', 'reward': 'sym'}), "conversions[0].policy: init='max' needs reward='asym'",
          'init-max-sym'),
    _case(_pol('leaf_modules', ['Parameter']), "conversions[0].policy.leaf_modules names 'Parameter', which is not an "
                                               'nn.Module class', 'leaf-not-module'),
    _case(_pol('leaf_modules', ['functional']), "leaf_modules names 'functional'", 'leaf-submodule'),
    _case(_pol('leaf_modules', ['os']), "leaf_modules names 'os'", 'leaf-os'),
    _case(_pol('leaf_modules', ['__class__']), "leaf_modules names '__class__'", 'leaf-dunder'),
    _case(_pol('leaf_modules', ['torch.nn.ReLU']), "leaf_modules names 'torch.nn.ReLU'", 'leaf-dotted'),
    _case(_pol('leaf_modules', 'Conv2d'), 'conversions[0].policy.leaf_modules must be a list', 'leaf-str'),
    # preprocessing: known keys, per-channel lists, bounded sizes, known strings
    _case(_top('preprocessing', [1]), 'preprocessing must be an object', 'preprocessing-list'),
    _case(_pre('file', '/etc/passwd'), "preprocessing has unknown entry 'file'", 'preprocessing-unknown'),
    _case(_pre('input_size', [3, 99999, 99999]), 'preprocessing.input_size must be 3 integers', 'pre-size-huge'),
    _case(_pre('mean', 'imagenet'), 'preprocessing.mean must be a list of 1 to 16 finite numbers', 'mean-str'),
    _case(_pre('mean', [0.5] * 17), 'preprocessing.mean must be a list of 1 to 16', 'mean-long'),
    _case(_pre('mean', [0.5, 'x', 0.5]), 'preprocessing.mean must be a list', 'mean-str-item'),
    _case(_pre('mean', [0.5, float('nan'), 0.5]), 'preprocessing.mean must be a list', 'mean-nan'),
    _case(_pre('std', [1, 10 ** 400, 1]), 'preprocessing.std must be a list', 'std-huge-int'),
    _case(_pre('std', [0.0, 1.0, 1.0]), 'preprocessing.std must be a list of 1 to 16 positive', 'std-zero'),
    _case(_pre('mean', [0.5, 0.5]), 'preprocessing: mean, std and input_size must have the same channel count',
          'mean-channels'),
    _case(_pre('interpolation', 'magic'), "preprocessing.interpolation must be one of 'nearest'", 'interpolation'),
    _case(_pre('crop_pct', 0), 'preprocessing.crop_pct must be a number in (0, 2]', 'crop_pct-0'),
    _case(_pre('crop_pct', 3.0), 'preprocessing.crop_pct must be a number in (0, 2]', 'crop_pct-3'),
    _case(_pre('crop_pct', True), 'preprocessing.crop_pct must be a number in (0, 2]', 'crop_pct-bool'),
    _case(_pre('crop_pct', 10 ** 400), 'preprocessing.crop_pct must be a number in (0, 2]', 'crop_pct-huge-int'),
    _case(_pre('crop_mode', 'zoom'), "preprocessing.crop_mode must be one of 'center'", 'crop_mode'),
    # extra: any JSON object
    _case(_top('extra', [1]), 'extra must be a JSON object', 'extra-list'),
    _case(_top('extra', '{bad'), 'damaged dpp_surgery metadata: extra is not valid JSON', 'extra-not-json'),
    _case(_top('extra', '[' * 100000 + ']' * 100000), 'extra is nested too deeply', 'extra-deep'),
    _case(_top('extra', '{"a": ' + '9' * 5000 + '}'), 'extra is not valid JSON', 'extra-huge-int'),
]


def _forbid_reading_and_building(monkeypatch, allowed):
    """Record (and refuse) every model build and every file read other than ``allowed``, the checkpoint itself."""
    import builtins

    import safetensors.torch
    import timm
    calls = []

    def refuse(what):
        def call(*args, **kwargs):
            calls.append((what, args[:1]))
            raise AssertionError(f'{what} called by a checkpoint check')
        return call

    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if not isinstance(file, (str, os.PathLike)) or os.fspath(file) != allowed:
            calls.append(('open', file))
        return real_open(file, *args, **kwargs)

    for module, name in ((timm, 'create_model'), (timm.models, 'create_model'), (torch, 'load'),
                         (safetensors.torch, 'load_file')):
        monkeypatch.setattr(module, name, refuse(f'{module.__name__}.{name}'))
    monkeypatch.setattr(builtins, 'open', guarded_open)
    return calls


def test_the_crafting_baseline_is_valid(tmp_path):
    path = _write_meta(tmp_path / 'ok.safetensors', _valid_meta())
    meta = read_metadata(path)
    assert meta['model_kwargs'] == {'num_classes': 7, 'in_chans': 3, 'drop_rate': 0.0}
    assert [c['input_size'] for c in meta['conversions']] == [[3, 64, 64], [3, 32, 32]]
    assert meta['extra']['notes']['nested'][2] == {'ok': True}
    with pytest.raises(CheckpointError, match='does not match the rebuilt resnet10t'):  # only its weights are wrong
        load(path)


@pytest.mark.parametrize('change, fragment', CRAFTED)
def test_crafted_file_is_refused_before_anything_is_built(tmp_path, monkeypatch, change, fragment):
    meta = _valid_meta()
    change(meta)
    path = _write_meta(tmp_path / 'crafted.safetensors', meta)
    calls = _forbid_reading_and_building(monkeypatch, path)
    for reader in (read_metadata, load):
        with pytest.raises(CheckpointError) as info:
            reader(path)
        message = str(info.value)
        assert fragment in message, message
        assert message.startswith(path) and '\n' not in message and len(message) < 600, message
    assert calls == []


@pytest.mark.parametrize('kwargs', [
    lambda d: {'checkpoint_path': str(d / 'secret.pth')},
    lambda d: {'pretrained_cfg_overlay': {'file': str(d / 'secret.pth')}},
    lambda d: {'pretrained_cfg': {'url': (d / 'secret.pth').as_uri()}},
    lambda d: {'pretrained_cfg': {'hf_hub_id': 'timm/resnet18.a1_in1k'}},
    lambda d: {'cache_dir': str(d)},
    lambda d: {'pretrained': True},
], ids=['checkpoint_path', 'overlay-file', 'cfg-url', 'cfg-hub', 'cache_dir', 'pretrained'])
def test_nothing_outside_the_checkpoint_is_read(tmp_path, monkeypatch, kwargs):
    secret = tmp_path / 'secret.pth'
    torch.save({'fc.weight': torch.zeros(7, 512)}, secret)  # a real file that the crafted checkpoint points at
    path = _write_meta(tmp_path / 'crafted.safetensors', dict(_valid_meta(), model_kwargs=kwargs(tmp_path)))
    calls = _forbid_reading_and_building(monkeypatch, path)
    with pytest.raises(CheckpointError, match=r'model_kwargs\.\w+ is not an allowed model kwarg.*allowed: num_classes'):
        load(path)
    assert calls == []
    local = _write_meta(tmp_path / 'local.safetensors', dict(_valid_meta(), model_name=f'local-dir:{tmp_path}'))
    with pytest.raises(CheckpointError, match='model_name must be a timm model name'):
        load(local)
    assert calls == []


def test_save_refuses_what_load_would_refuse(tmp_path):
    model = create('resnet10t', num_classes=4)
    convert(model, input_size=(3, 32, 32), targets=['max_pool'])
    path = tmp_path / 'never.safetensors'
    for kwargs, key in (({'act_layer': torch.nn.ReLU}, 'act_layer'), ({'checkpoint_path': 'w.pth'}, 'checkpoint_path'),
                        ({'pretrained_cfg_overlay': {'file': 'w.pth'}}, 'pretrained_cfg_overlay'),
                        ({'drop_rate': 1.5}, 'drop_rate'), ({'in_chans': 64}, 'in_chans')):
        model._dpp_surgery_create = ('resnet10t', kwargs)
        with pytest.raises(CheckpointError, match=rf'cannot save resnet10t to .*model_kwargs\.{key} .*(allowed|must)'):
            save(model, str(path))
        assert not path.exists()
    model._dpp_surgery_create = ('resnet10t', {})
    history = model._dpp_surgery_history
    model._dpp_surgery_history = history * 17
    with pytest.raises(CheckpointError, match='conversions holds 17 conversions; allowed: at most 16'):
        save(model, str(path))
    model._dpp_surgery_history = [(history[0][0], (3, 2048, 2048))]
    with pytest.raises(CheckpointError, match=r'conversions\[0\]\.input_size must be 3 integers'):
        save(model, str(path))
    assert not path.exists()
    model._dpp_surgery_history = history
    assert load(save(model, str(path))).num_classes == 4
