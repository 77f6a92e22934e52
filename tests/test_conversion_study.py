"""What converting buys and costs: ``experiments placement``, ``heal`` and ``dpp-params``, the fine-tuning options
they use (DPP trace, init and norm overrides, a fixed subset draw) and the demo's placement panel."""
import json
import math
import os
import shutil

import pytest
import torch

from dpp_surgery.tools import conversion_study as cs
from dpp_surgery.tools.experiments import main
from dpp_surgery.training.data import DEFAULT_DATA

HAS_FASHION = os.path.isdir(DEFAULT_DATA)
needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason='apt-get install dataset-fashion-mnist (CI installs it)')


def _placement_args(out, *extra):
    return ['placement', '--seeds', '0', '1', '--policies', 'original', 'pre', '--train-subset', '64',
            '--test-subset', '32', '--epochs', '1', '--batch-size', '32', '--latency-size', '32',
            '--latency-repeat', '2', '--trace-every', '1', '--output', str(out), '--no-progress', *extra]


@needs_fashion
def test_placement_end_to_end(tmp_path, capsys):
    out = tmp_path / 'placement'
    assert main(_placement_args(out)) == 0
    md = (out / 'placement.md').read_text()
    record = json.loads((out / 'placement.json').read_text())
    assert md.strip() in capsys.readouterr().out  # printed too
    assert [(r['variant'], r['seed']) for r in record['runs']] == [('original', 0), ('pre', 0), ('original', 1),
                                                                   ('pre', 1)]
    # one fixed subset: the same test images for every run
    assert {r['test_count'] for r in record['runs']} == {32}
    pre = record['policies']['pre']
    assert pre['placement'] == 'pre' and 1.0 < pre['flop_ratio_train'] <= cs.FLOP_NEUTRAL
    assert pre['params'] > record['policies']['original']['params']
    lat = pre['latency']
    assert lat['torch_ms']['converted'] > 0 and lat['onnxruntime_ms']['converted']['custom'] > 0
    assert lat['onnxruntime_ms']['converted']['decomposed'] > 0 and not lat['errors']
    assert max(lat['onnx_max_rel_error'].values()) < 1e-3  # the timed files compute the model
    # the DPP runs carry their trace, one line per step, with gradients of the DPP parameters
    pre_runs = [r for r in record['runs'] if r['variant'] == 'pre']
    assert all(len(r['trace']) == 2 for r in pre_runs)  # 64 images / batch 32 = 2 steps
    line = pre_runs[0]['trace'][0]
    assert set(line['dpp']) == set(pre_runs[0]['dpp']) and line['grad_other'] > 0
    assert all(v['grad_theta_alpha'] > 0 and v['grad_theta_lambda'] > 0 for v in line['dpp'].values())
    assert line['lr_dpp'] == pytest.approx(10 * line['lr_other'])
    assert all(r['trace'] == [] for r in record['runs'] if r['variant'] == 'original')
    # the table: every policy, the paired column, the recommendation for every budget
    rows = [line for line in md.splitlines() if line.startswith('| original') or line.startswith('| pre')]
    assert len(rows) == 2 and '(FLOP-neutral)' in rows[1]
    accs = [r['test_accuracy'] for r in pre_runs]
    assert f"| {', '.join(f'{100 * a:.2f}' for a in accs)} |" in rows[1]
    assert md.count('- With ') == len(cs.FLOP_BUDGETS) and 'Machine: ' in md and '`python -m dpp_surgery' in md
    # the run folders keep their checkpoints; a second run refuses to replace the results
    assert (out / 'runs' / 'pre_seed1' / 'last.safetensors').exists()
    assert main(_placement_args(out)) == 1
    assert '--overwrite' in capsys.readouterr().err


@needs_fashion
def test_placement_runs_resnet18_from_scratch(tmp_path):
    out = tmp_path / 'resnet'
    args = _placement_args(out, '--model', 'resnet18', '--no-amp')
    args[args.index('--seeds') + 1:args.index('--policies')] = ['0']
    assert main(args) == 0
    record = json.loads((out / 'placement.json').read_text())
    assert record['args']['model'] == 'resnet18'
    import timm

    # from scratch: the policies' parameters are ResNet-18's plus DPP's, and 'pre' keeps the FLOPs within the limit
    resnet = timm.create_model('resnet18')
    assert record['policies']['original']['params'] == sum(p.numel() for p in resnet.parameters())
    assert 1.0 < record['policies']['pre']['flop_ratio_train'] <= cs.FLOP_NEUTRAL
    assert {r['variant'] for r in record['runs']} == {'original', 'pre'}
    assert all(0 <= r['test_accuracy'] <= 1 for r in record['runs'])
    with open(out / 'runs' / 'pre_seed0' / 'config.json') as f:
        config = json.load(f)
    assert config['model'] == 'resnet18' and config['pretrained'] is False and config['amp'] is False
    assert record['args']['amp'] == 'none' and record['args']['amp_dtype'] == 'auto'  # (the request, as before)
    md = (out / 'placement.md').read_text()
    assert 'ResNet-18 from scratch' in md and '`--no-amp`' in md
    assert 'Precision per run: original float32 x1; pre float32 x1.' in md  # pinned: no probe decided it


def test_placement_output_follows_the_model(tmp_path, monkeypatch, capsys):
    # without --output each model has its own results folder (refused here, before any work, by a bad argument)
    monkeypatch.chdir(tmp_path)
    seen = []

    def stop(args):
        seen.append(args.output)
        raise ValueError('stop')

    monkeypatch.setattr(cs, '_check_placement_args', stop)
    assert main(['placement', '--model', 'resnet18']) == 1 and main(['placement']) == 1
    assert seen == ['results/placement_resnet18', 'results/placement']


def _record(accs, ratios):
    """A placement record with the given per-seed accuracies and FLOP ratios per policy."""
    runs = [{'variant': name, 'seed': s, 'test_accuracy': a, 'test_error': 100 * (1 - a)}
            for name, values in accs.items() for s, a in enumerate(values)]
    return {'runs': runs, 'policies': {name: {'flop_ratio_train': ratios[name]} for name in accs}}


def test_recommendations_pick_the_best_policy_within_each_budget():
    record = _record({'original': [0.80, 0.81, 0.79, 0.80], 'pre': [0.82, 0.83, 0.815, 0.825],
                      'block': [0.85, 0.86, 0.845, 0.855], 'post': [0.79, 0.80, 0.78, 0.79]},
                     {'original': 1.0, 'pre': 1.02, 'block': 1.22, 'post': 1.08})
    lines = cs.recommendations(record)
    assert len(lines) == 3
    assert '**pre**' in lines[0] and 'resolved' in lines[0] and 'not resolved' not in lines[0]
    assert '**block**' in lines[1] and '**block**' in lines[2]
    assert '+5.25 points' in lines[2]


def test_recommendations_say_when_nothing_beats_the_original():
    record = _record({'original': [0.85, 0.86], 'pre': [0.80, 0.84]}, {'original': 1.0, 'pre': 1.02})
    lines = cs.recommendations(record)
    assert all('**original**' in line and 'no policy within it' in line for line in lines)


def test_recommendations_tell_seed_noise_apart():
    record = _record({'original': [0.80, 0.84, 0.78], 'pre': [0.83, 0.80, 0.80]}, {'original': 1.0, 'pre': 1.02})
    assert 'not resolved' in cs.recommendations(record)[0]


@pytest.mark.parametrize('extra, message', [
    (['--policies', 'pre', 'block'], "must include 'original'"),
    (['--policies', 'original', 'sideways'], 'distinct names'),
    (['--seeds', '1', '1'], 'must not repeat'),
    (['--epochs', '0'], '--epochs must be >= 1'),
    (['--img-size', '0'], '--img-size must be >= 1'),
    (['--image-size', '0'], '--img-size must be >= 1'),  # (the spelling of earlier versions, still read)
    (['--train-subset', '-3'], '--train-subset must be >= 0'),
])
def test_placement_refuses_bad_arguments_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / 'p'
    assert main(_placement_args(out, *extra)) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _heal_args(out, *extra):
    return ['heal', '--seeds', '0', '--placements', 'pre', 'block', '--steps', '0', '3', '--heal-size', '32', '--eval-size', '32',
            '--heal-fashion', '24', '--heal-photos', '2', '--heal-crops', '4', '--batch-size', '8',
            '--output', str(out), *extra]


@needs_fashion
def test_heal_end_to_end(tmp_path):
    from dpp_surgery.models.weights import LITE0_MEAN, LITE0_STD, create_efficientnet_lite0
    from dpp_surgery.surgery import convert
    from dpp_surgery.tools.bench import photo_views, preservation

    out = tmp_path / 'heal'
    assert main(_heal_args(out)) == 0
    assert sorted(p for p in os.listdir(out)) == ['heal.json', 'heal.md', 'heal.png']
    record = json.loads((out / 'heal.json').read_text())
    assert record['heal_images'] == 24 + 2 * 4 and record['eval_views'] == 10 * len(cs.EVAL_PHOTOS)
    assert not set(record['heal_photos']) & set(record['eval_photos'])  # never measured on what it healed on
    assert [(r['placement'], [c['step'] for c in r['curve']]) for r in record['runs']] == [('pre', [0, 3]),
                                                                                         ('block', [0, 3])]
    # step 0 is the converted model before any healing
    original = create_efficientnet_lite0().eval()
    model = create_efficientnet_lite0()
    convert(model, input_size=(3, 32, 32), placement='pre')
    views = photo_views(32, LITE0_MEAN, LITE0_STD, names=cs.EVAL_PHOTOS)
    expected = preservation(original, model, views)
    first = record['runs'][0]['curve'][0]
    assert first['top1_agreement'] == pytest.approx(expected['top1_agreement'])
    assert first['logit_cosine'] == pytest.approx(expected['logit_cosine'], abs=1e-5)
    # healing changed the model: a different function after 3 steps
    assert record['runs'][0]['curve'][1]['logit_cosine'] != first['logit_cosine']
    md = (out / 'heal.md').read_text()
    assert 'agreement after 3 steps' in md and '| pre |' in md and '| block |' in md
    from PIL import Image
    with Image.open(out / 'heal.png') as img:
        assert img.size[0] > 500


def test_heal_images_mix_fashion_and_photo_crops(monkeypatch):
    import argparse

    if not HAS_FASHION:
        pytest.skip('apt-get install dataset-fashion-mnist (CI installs it)')
    args = argparse.Namespace(heal_size=40, heal_fashion=5, heal_photos=3, heal_crops=2)
    x = cs._heal_images(args, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (5 + 3 * 2, 3, 40, 40)
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6  # [0, 1] normalised
    grey = x[:5]
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    again = cs._heal_images(args, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.equal(x, again)  # a fixed draw


@pytest.mark.parametrize('extra, message', [
    (['--steps', '0', '0'], '--steps takes distinct'),
    (['--placements', 'diagonal'], '--placements takes distinct'),
    (['--heal-photos', '99'], '--heal-photos must be in'),
    (['--heal-size', '8'], '--heal-size must be >= 32'),
    (['--heal-fashion', '0', '--heal-photos', '0'], 'at least one batch'),
])
def test_heal_refuses_bad_arguments(tmp_path, capsys, extra, message):
    assert main(_heal_args(tmp_path / 'h', *extra)) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'h').exists()


def test_heal_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / 'h'
    out.mkdir()
    (out / 'heal.png').write_bytes(b'earlier')
    assert main(_heal_args(out)) == 1
    assert '--overwrite' in capsys.readouterr().err
    assert (out / 'heal.png').read_bytes() == b'earlier'


def test_heal_keeps_or_moves_running_stats(monkeypatch):
    """'frozen' keeps every batch norm's running statistics while healing; 'train' moves them; the original (the
    teacher) is never touched."""
    import argparse

    from dpp_surgery.models.weights import create_efficientnet_lite0

    original = create_efficientnet_lite0().eval()
    kept = {}
    from dpp_surgery import surgery

    real_convert = surgery.convert

    def spy_convert(model, **kwargs):
        kept['model'] = model
        return real_convert(model, **kwargs)

    monkeypatch.setattr(surgery, 'convert', spy_convert)
    images, views = torch.randn(16, 3, 32, 32), torch.randn(4, 3, 32, 32)
    moved = {}
    for mode in ('frozen', 'train'):
        args = argparse.Namespace(heal_size=32, lr=1e-4, dpp_lr_scale=10.0, temperature=2.0, batch_size=8,
                                  steps=[2], norm_stats=mode, amp='auto')
        cs._heal_one(original, 'pre', 0, images, views, args)
        moved[mode] = not torch.equal(kept['model'].bn1.running_mean, original.bn1.running_mean)
        assert any(not torch.equal(a, b) for a, b in zip(kept['model'].parameters(), original.parameters()))
    assert moved == {'frozen': False, 'train': True}
    assert torch.equal(original.bn1.running_mean, create_efficientnet_lite0().bn1.running_mean)


def test_movement_and_gradient_ratio_from_a_trace():
    trace = [{'step': 0, 'grad_other': 2.0,
              'dpp': {'a': {'alpha': 1.0, 'alpha_min': 1.0, 'alpha_max': 1.0, 'lambda': 1.0, 'lambda_min': 1.0,
                            'lambda_max': 1.0, 'grad_theta_alpha': 0.2, 'grad_theta_lambda': 0.02}}},
             {'step': 25, 'grad_other': 4.0,
              'dpp': {'a': {'alpha': 1.1, 'alpha_min': 0.5, 'alpha_max': 1.2, 'lambda': 1.0, 'lambda_min': 0.9,
                            'lambda_max': 1.05, 'grad_theta_alpha': 0.4, 'grad_theta_lambda': 0.04}}}]
    moved = cs._movement({'trace': trace})
    assert moved['alpha'] == pytest.approx(math.log(2.0))  # alpha_min halved
    assert moved['lambda'] == pytest.approx(-math.log(0.9))
    ratio = cs._grad_ratio({'trace': trace})
    assert ratio['theta_alpha'] == pytest.approx(0.1) and ratio['theta_lambda'] == pytest.approx(0.01)


@needs_fashion
def test_dpp_params_end_to_end(tmp_path):
    out = tmp_path / 'params'
    args = ['dpp-params', '--seeds', '0', '--remedies', 'lr-x10', 'lr-x1000', 'init-1-3', '--train-subset', '64',
            '--test-subset', '32', '--epochs', '1',
            '--trace-every', '1', '--output', str(out), '--no-progress']
    assert main(args) == 0
    record = json.loads((out / 'dpp_params.json').read_text())
    runs = {r['variant']: r for r in record['runs']}
    base, big, init = runs['lr-x10'], runs['lr-x1000'], runs['init-1-3']
    assert big['trace'][0]['lr_dpp'] == pytest.approx(1000 * big['trace'][0]['lr_other'])
    # the first trace line is taken before the first step: the init the remedy asked for
    first = next(iter(init['trace'][0]['dpp'].values()))
    assert first['alpha'] == pytest.approx(1.0) and first['lambda'] == pytest.approx(3.0)
    assert cs._movement(big)['lambda'] > cs._movement(base)['lambda']  # 100x the step moves lambda further
    md = (out / 'dpp_params.md').read_text()
    assert '| lr-x1000 | dpp_lr_scale=1000.0 |' in md and 'grad ratio theta_alpha' in md and 'vs lr-x10' in md
    assert md.count('| init-1-3 | ') == 1 + len(init['dpp'])  # its row, and one per DPP layer


def test_dpp_params_refuses_unknown_remedies(tmp_path, capsys):
    assert main(['dpp-params', '--remedies', 'magic', '--output', str(tmp_path / 'x')]) == 1
    assert '--remedies takes distinct names' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the fine-tuning options the studies use

def test_dpp_init_and_norm_reach_every_dpp_layer():
    from dpp_surgery.training.finetune import FinetuneConfig, build_model

    model, _ = build_model(FinetuneConfig(pretrained=False, dpp_init='0.5,2', dpp_norm='none', img_size=32), 10)
    from dpp_surgery.layers import DPP2d

    layers = [m for m in model.modules() if isinstance(m, DPP2d)]
    assert layers
    for layer in layers:
        assert torch.allclose(layer.alpha, torch.tensor(0.5)) and torch.allclose(layer.lam, torch.tensor(2.0))
        assert layer.norm == 'none'


@pytest.mark.parametrize('init', ['huge', '1,2,3', '0,1', '-1,2', 'inf,1'])
def test_bad_dpp_init_fails_with_the_fix(init):
    from dpp_surgery.training.finetune import FinetuneConfig, finetune

    with pytest.raises(ValueError, match='ALPHA,LAMBDA'):
        finetune(FinetuneConfig(dpp_init=init, output='unused'))


def test_bad_dpp_norm_and_trace_fail_before_any_work(tmp_path):
    from dpp_surgery.training.finetune import FinetuneConfig, finetune

    with pytest.raises(ValueError, match='norm'):
        finetune(FinetuneConfig(dpp_norm='max', output=str(tmp_path / 'a')))
    with pytest.raises(ValueError, match='dpp_trace_every'):
        finetune(FinetuneConfig(dpp_trace_every=-1, output=str(tmp_path / 'b')))
    assert not os.listdir(tmp_path)


def test_dpp_trace_reads_the_gradients_held_now():
    from dpp_surgery.layers import DPP2d, param_groups
    from dpp_surgery.training.finetune import dpp_trace

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), DPP2d(4, kernel_size=2, stride=2))
    opt = torch.optim.SGD(param_groups(model, dpp_lr_scale=7.0, lr=0.1))
    before = dpp_trace(model, opt)
    assert before['grad_other'] is None and before['dpp']['1']['grad_theta_alpha'] is None
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    after = dpp_trace(model, opt)
    layer = after['dpp']['1']
    expected = model[1].theta_alpha.grad.pow(2).mean().sqrt().item()
    assert layer['grad_theta_alpha'] == pytest.approx(expected)
    grads = torch.cat([model[0].weight.grad.flatten(), model[0].bias.grad.flatten()])
    assert after['grad_other'] == pytest.approx(grads.pow(2).mean().sqrt().item())
    assert after['lr_dpp'] == pytest.approx(0.7) and after['lr_other'] == pytest.approx(0.1)
    assert layer['alpha'] == pytest.approx(1.0) and layer['lambda_min'] <= layer['lambda'] <= layer['lambda_max']


@needs_fashion
def test_subset_seed_fixes_the_draw_across_seeds(tmp_path):
    from dpp_surgery.training.finetune import FinetuneConfig, _Run, _prepare_data

    def drawn(seed, subset_seed):
        cfg = FinetuneConfig(seed=seed, subset_seed=subset_seed, train_subset=50, test_subset=20)
        run = _Run(cfg=cfg, device=torch.device('cpu'), world=1, rank=0, state_path='')
        _prepare_data(run)
        return run.train_set.indices, run.test_set.indices

    assert drawn(0, 3) == drawn(1, 3)
    assert drawn(0, -1) != drawn(1, -1)  # the default: the seed draws the subset too
    assert drawn(3, -1) == drawn(0, 3)


def test_photo_views_of_named_photos():
    from dpp_surgery.tools.bench import photo_views

    views = photo_views(32, names=['china.jpg', 'chelsea'])
    assert views.shape == (20, 3, 32, 32)
    every = photo_views(32)
    assert torch.equal(views[:10], every[:10])  # china.jpg is the first shipped photo


# ---------------------------------------------------------------------------------------------------------------
# the demo's placement panel

def test_demo_placement_points_from_a_record(tmp_path):
    from dpp_surgery.tools.demo import load_placement_points

    path = tmp_path / 'placement.json'
    record = {'policies': {'original': {'gflops_train': 0.065, 'flop_ratio_train': 1.0},
                           'pre': {'gflops_train': 0.067, 'flop_ratio_train': 1.02}},
              'runs': [{'variant': 'original', 'test_accuracy': 0.8}, {'variant': 'pre', 'test_accuracy': 0.82},
                       {'variant': 'pre', 'test_accuracy': 0.84}]}
    path.write_text(json.dumps(record))
    points = load_placement_points(str(path))
    assert [(p['name'], p['accuracies']) for p in points] == [('original', [0.8]), ('pre', [0.82, 0.84])]


@pytest.mark.parametrize('content', ['not json', '[]', '{"policies": {"a": {}}, "runs": []}',
                                     '{"policies": {"a": {"gflops_train": 1, "flop_ratio_train": 1}}, "runs": []}',
                                     '{"policies": {}, "runs": []}'])
def test_demo_placement_panel_refuses_other_files(tmp_path, content):
    from dpp_surgery.tools.demo import load_placement_points

    path = tmp_path / 'placement.json'
    path.write_text(content)
    with pytest.raises(ValueError, match='experiments placement'):
        load_placement_points(str(path))


def test_demo_placement_panel_refuses_a_huge_file(tmp_path):
    from dpp_surgery.tools import demo

    path = tmp_path / 'placement.json'
    with open(path, 'wb') as f:
        f.truncate(demo._PLACEMENT_MAX_BYTES + 1)  # sparse: no disk used
    with pytest.raises(ValueError, match='MiB'):
        demo.load_placement_points(str(path))


def test_demo_figure_has_the_placement_panel(tmp_path):
    from PIL import Image

    from dpp_surgery.tools.demo import _save_figure

    crops = {'a': torch.rand(1, 3, 16, 16)}
    dpp = [{'name': 'l', 'channels': 2, 'alpha': [1.0, 1.1], 'lambda': [1.0, 0.9], 'init': [1.0, 1.0]}]
    points = [{'name': 'original', 'gflops': 0.065, 'flop_ratio': 1.0, 'accuracies': [0.8, 0.81]},
              {'name': 'pre', 'gflops': 0.067, 'flop_ratio': 1.02, 'accuracies': [0.82, 0.83]}]
    with_panel, without = tmp_path / 'a.png', tmp_path / 'b.png'
    _save_figure(crops, 'x', dpp, 't', str(with_panel), placement_points=points)
    _save_figure(crops, 'x', dpp, 't', str(without), placement_points=None)
    with Image.open(with_panel) as a, Image.open(without) as b:
        assert a.size == b.size and a.size[0] >= 2000  # three panels side by side
        right_a = a.convert('L').crop((int(a.size[0] * 0.75), 0, a.size[0], a.size[1]))
        right_b = b.convert('L').crop((int(b.size[0] * 0.75), 0, b.size[0], b.size[1]))
        assert right_a.tobytes() != right_b.tobytes()  # the points are drawn


def test_results_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a private temporary file; the result has the mode a plain write gives (or the mode
    of the file it replaces), not the temporary file's 0600."""
    import stat

    from dpp_surgery.utils import write_text

    plain = tmp_path / 'plain.txt'
    plain.write_text('x')
    new = tmp_path / 'new.md'
    write_text(str(new), 'y', overwrite=False)
    assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    os.chmod(new, 0o640)
    write_text(str(new), 'z', overwrite=True)
    assert stat.S_IMODE(new.stat().st_mode) == 0o640 and new.read_text() == 'z'


def _params_run(variant, seed, acc=None, lam=1.0, step=50):
    layer = {'alpha': 1.0, 'alpha_min': 1.0, 'alpha_max': 1.0, 'lambda': 1.0, 'lambda_min': 1.0, 'lambda_max': 1.0,
             'grad_theta_alpha': 0.01, 'grad_theta_lambda': 0.02}
    trace = [{'step': 0, 'dpp': {'blocks.1.0.dpp': layer}, 'grad_other': 0.1},
             {'step': step, 'dpp': {'blocks.1.0.dpp': {**layer, 'lambda': lam, 'lambda_max': lam}}, 'grad_other': 0.1}]
    if acc is None:
        return {'variant': variant, 'seed': seed, 'diverged': True, 'error': 'non-finite', 'test_accuracy': None,
                'test_error': None, 'trace': trace[:1], 'last_finite_step': 0}
    return {'variant': variant, 'seed': seed, 'test_accuracy': acc, 'test_error': 100 * (1 - acc), 'trace': trace}


def test_dpp_params_table_reports_diverged_remedies():
    # a remedy that diverged in every seed gets a row that says so; one that diverged in some is compared over the
    # seeds that finished
    runs = [_params_run('lr-x10', s, 0.80 + 0.01 * s) for s in range(3)]
    runs += [_params_run('lr-x1000', s) for s in range(3)]
    runs += [_params_run('lr-x100', 0), _params_run('lr-x100', 1, 0.83, lam=2.0), _params_run('lr-x100', 2, 0.84)]
    record = {'args': {'train_subset': 64, 'epochs': 1, 'image_size': 32, 'batch_size': 8, 'lr': 0.02,
                       'dpp_lr_scale': 10.0, 'seeds': [0, 1, 2], 'test_subset': 32, 'trace_every': 50},
              'command': 'python -m dpp_surgery.experiments dpp-params', 'machine': 'test', 'wall_seconds': 60,
              'remedies': {'lr-x10': {}, 'lr-x100': {'dpp_lr_scale': 100.0}, 'lr-x1000': {'dpp_lr_scale': 1000.0}},
              'runs': runs}
    md = cs.dpp_params_table(record)
    row = next(line for line in md.splitlines() if line.startswith('| lr-x1000 |'))
    assert 'diverged in 3 of 3 seeds' in row
    row = next(line for line in md.splitlines() if line.startswith('| lr-x100 |'))
    # seeds 1 and 2: +2.0 and +2.0 points against lr-x10, and lambda moved by ln 2 in one of the two
    assert '83.50' in row and '+2.00 +/- 0.00' in row and 'diverged in 1 of 3 seeds' in row
    assert f'{math.log(2) / 2:.3g}' in row
    assert not any(line.startswith('| lr-x1000 | blocks') for line in md.splitlines())  # no per-layer rows


# ---------------------------------------------------------------------------------------------------------------
# study-table: the tables from the records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('study, folder', [('placement', 'placement'), ('heal', 'heal'),
                                           ('dpp-params', 'dpp_params'), ('placement', 'placement_resnet18'),
                                           ('placement', 'placement_block_10seeds'), ('versus', 'versus')])
def test_committed_tables_are_what_their_records_give(tmp_path, study, folder):
    from dpp_surgery.tools.experiments import STUDY_STEMS

    stem = STUDY_STEMS[study]
    src = os.path.join(REPO, 'results', folder)
    if not os.path.isfile(os.path.join(src, f'{stem}.json')):
        pytest.skip(f'results/{folder} holds no record')
    shutil.copy(os.path.join(src, f'{stem}.json'), tmp_path)
    assert main(['study-table', study, '--output', str(tmp_path)]) == 0
    with open(os.path.join(src, f'{stem}.md')) as f:
        assert (tmp_path / f'{stem}.md').read_text() == f.read()
    if study == 'heal':
        assert (tmp_path / 'heal.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('content, message', [
    (None, 'does not exist'),
    ('{"runs": [', 'is not valid JSON'),
    ('[1, 2]', 'is not a record of `experiments dpp-params`'),
    ('{"runs": [{"variant": "x"}], "args": {}}', 'is not a record of `experiments dpp-params`'),
])
def test_study_table_refuses_what_is_not_a_record(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / 'dpp_params.json').write_text(content)
    assert main(['study-table', 'dpp-params', '--output', str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and 'rerun `python -m dpp_surgery.experiments dpp-params' in err
    assert 'Traceback' not in err and not (tmp_path / 'dpp_params.md').exists()


def test_study_table_refuses_an_oversized_record(tmp_path, capsys, monkeypatch):
    from dpp_surgery.tools import records

    monkeypatch.setattr(records, 'MAX_RECORD_BYTES', 1 << 10)
    (tmp_path / 'heal.json').write_text('{"runs": [' + ' ' * 2048 + ']}')
    assert main(['study-table', 'heal', '--output', str(tmp_path)]) == 1
    assert 'larger than any record' in capsys.readouterr().err


def test_precision_note_counts_each_runs_precision():
    record = {'args': {'amp': 'auto'}, 'runs': [
        {'variant': 'block', 'amp': 'bf16'}, {'variant': 'block', 'amp': 'none'}, {'variant': 'block', 'amp': 'bf16'},
        {'variant': 'original', 'amp': 'none'}, {'variant': 'lr-x1000', 'amp': None}]}
    note = cs._precision_note(record, 'variant')
    assert note.endswith(': block bfloat16 x2, float32 x1; original float32 x1.')
    assert 'can go either way' in note and 'lr-x1000' not in note  # a diverged run has no precision
    assert cs._precision_note({'args': {}, 'runs': [{'variant': 'x'}]}, 'variant') == ''
    new = dict(record, args={'amp': 'auto', 'amp_dtype': 'auto'})  # a record of --amp/--amp-dtype (timm's flags)
    assert '(`--amp-dtype auto` times a probe step' in cs._precision_note(new, 'variant')
    assert '(`--amp auto` times a probe step' in note  # records of earlier versions read as they were written


def test_amp_flags_of_old_and_new_records():
    assert cs.amp_flags({'amp': 'bf16'}) == '--amp bf16'  # an earlier version's record
    assert cs.amp_flags({}) == '--amp auto'
    assert cs.amp_flags({'amp': 'none', 'amp_dtype': 'auto'}) == '--no-amp'
    assert cs.amp_flags({'amp': 'bf16', 'amp_dtype': 'bfloat16'}) == '--amp-dtype bfloat16'
    assert cs.amp_flags({'amp': 'auto', 'amp_dtype': 'auto'}) == '--amp-dtype auto'


@pytest.mark.parametrize('folder, stem, page', [('placement', 'placement', 'placement'),
                                                ('placement_resnet18', 'placement', 'placement'),
                                                ('placement_block_10seeds', 'placement', 'placement'),
                                                ('fashion_mnist', 'fashion_mnist', 'placement'),
                                                ('heal', 'heal', 'healing'),
                                                ('dpp_params', 'dpp_params', 'dpp-params')])
def test_docs_quote_the_committed_tables(folder, stem, page):
    # the results pages of the docs hold the results files' lines, not figures typed in (their generated blocks:
    # `python -m dpp_surgery.tools.docs_results`; tests/test_docs_results.py checks them against the JSON records)
    path = os.path.join(REPO, 'results', folder, f'{stem}.md')
    if not os.path.isfile(path):
        pytest.skip(f'results/{folder} holds no table')
    with open(path) as f:
        table = f.read()
    with open(os.path.join(REPO, 'docs', 'results', f'{page}.md')) as f:
        lines = f.read().splitlines()
    missing = [line for line in table.splitlines() if line and line not in lines]
    assert not missing, f'docs/results/{page}.md does not quote these lines of results/{folder}/{stem}.md: {missing}'


@needs_fashion
def test_dpp_params_records_a_remedy_that_diverges(tmp_path):
    # a real divergence: lr 0.5 with the DPP parameters at x1000 makes them non-finite within the first steps; the
    # study goes on and reports it, where lr-x10 finishes
    out = tmp_path / 'params'
    assert main(['dpp-params', '--seeds', '0', '--remedies', 'lr-x10', 'lr-x1000', '--lr', '0.5', '--train-subset',
                 '64', '--test-subset', '32', '--epochs', '1', '--img-size', '32', '-b', '16',
                 '--trace-every', '1', '--output', str(out), '--no-progress']) == 0
    runs = {r['variant']: r for r in json.loads((out / 'dpp_params.json').read_text())['runs']}
    assert runs['lr-x1000']['diverged'] and runs['lr-x1000']['test_accuracy'] is None
    assert 'non-finite' in runs['lr-x1000']['error'] and runs['lr-x1000']['trace']
    assert not runs['lr-x10'].get('diverged') and runs['lr-x10']['test_accuracy'] is not None
    assert '| lr-x1000 | dpp_lr_scale=1000.0 | diverged in 1 of 1 seeds' in (out / 'dpp_params.md').read_text()
