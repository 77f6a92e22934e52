"""The paper-style experiment: the small ResNet's downsampling variants and ``experiments paper``."""
import json
import os

import pytest
import torch
from torch import nn

from dpp_surgery import DPP2d
from dpp_surgery.training import data as data_mod
from dpp_surgery.tools.experiments import main
from dpp_surgery.models.smallnet import DOWNSAMPLE_VARIANTS, SmallResNet, create_smallnet

HAS_FASHION = os.path.isdir(data_mod.DEFAULT_DATA)
needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason='apt-get install dataset-fashion-mnist (CI installs it)')

DPP_VARIANTS = {'dpp_lite_sym': ('lite', 'sym'), 'dpp_lite_asym': ('lite', 'asym'),
                'dpp_full_sym': ('full', 'sym'), 'dpp_full_asym': ('full', 'asym')}


def _count(model: nn.Module, cls) -> int:
    return sum(type(m) is cls for m in model.modules())


def _strided_convs(model: nn.Module):
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]


def test_variant_list():
    assert DOWNSAMPLE_VARIANTS == ('strided_conv', 'max', 'avg', *DPP_VARIANTS)


@pytest.mark.parametrize('variant', DOWNSAMPLE_VARIANTS)
def test_variant_builds_with_its_downsampling_only(variant):
    model = create_smallnet(variant)
    assert isinstance(model, SmallResNet)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert model(torch.randn(2, 1, 27, 31)).shape == (2, 10)  # odd sizes work too
    pools = {cls: _count(model, cls) for cls in (nn.MaxPool2d, nn.AvgPool2d, DPP2d)}
    strided = _strided_convs(model)
    if variant == 'strided_conv':
        assert pools == {nn.MaxPool2d: 0, nn.AvgPool2d: 0, DPP2d: 0}
        # two downsampling blocks, each with a strided 3x3 conv and a strided 1x1 shortcut
        assert strided == ['stages.1.blocks.0.conv1', 'stages.1.blocks.0.shortcut.0', 'stages.2.blocks.0.conv1',
                           'stages.2.blocks.0.shortcut.0']
        assert all(type(model.stages[i].down) is nn.Identity for i in range(3))
        return
    assert strided == []
    expected = {nn.MaxPool2d: 0, nn.AvgPool2d: 0, DPP2d: 0}
    expected[{'max': nn.MaxPool2d, 'avg': nn.AvgPool2d}.get(variant, DPP2d)] = 2
    assert pools == expected and type(model.stages[0].down) is nn.Identity
    # the pool sits at the start of stages 1 and 2, on the previous stage's channels, 2x2 / stride 2
    for stage, channels in ((1, 16), (2, 32)):
        pool = model.stages[stage].down
        assert pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
        if variant in DPP_VARIANTS:
            assert (pool.channels, pool.guide, pool.reward) == (channels, *DPP_VARIANTS[variant])
            assert torch.equal(pool.theta_alpha, torch.zeros(channels))  # the paper's init: alpha = lambda = 1
            assert torch.equal(pool.theta_lambda, torch.zeros(channels))


@pytest.mark.parametrize('variant', DOWNSAMPLE_VARIANTS)
def test_forward_backward_reaches_every_parameter(variant):
    model = create_smallnet(variant)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_variants_differ_only_by_downsampling():
    counts = {}
    for variant in DOWNSAMPLE_VARIANTS:
        torch.manual_seed(0)
        model = create_smallnet(variant)
        counts[variant] = sum(p.numel() for p in model.parameters())
        shared = {k: v for k, v in model.state_dict().items() if '.down.' not in k}
        if variant == 'strided_conv':
            reference = shared
        else:  # the same seed gives the same weights to every layer the variants share
            assert shared.keys() == reference.keys()
            assert all(torch.equal(shared[k], reference[k]) for k in reference)
    base = counts['strided_conv']
    assert 100_000 <= base <= 300_000
    assert counts['max'] == counts['avg'] == base
    # Lite: alpha and lambda per channel; Full adds a 3x3 depthwise guide per channel (16 + 32 channels)
    assert counts['dpp_lite_sym'] == counts['dpp_lite_asym'] == base + 2 * 48
    assert counts['dpp_full_sym'] == counts['dpp_full_asym'] == base + 2 * 48 + 9 * 48


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown downsample variant 'lp'; available: strided_conv, max"):
        create_smallnet('lp')


def _tiny_args(out, *extra):
    return ['paper', '--variants', 'strided_conv', 'dpp_lite_asym', '--seeds', '0', '--train-subset', '256',
            '--test-subset', '200', '--epochs', '1', '--batch-size', '64', '--output', str(out), '--no-progress',
            *extra]


@needs_fashion
def test_paper_end_to_end(tmp_path, capsys):
    out = tmp_path / 'paper'
    assert main(_tiny_args(out)) == 0
    assert sorted(os.listdir(out)) == ['paper.json', 'paper.md']  # no temporary files or checkpoints left
    md = (out / 'paper.md').read_text()
    record = json.loads((out / 'paper.json').read_text())
    assert md.strip() == capsys.readouterr().out.strip()
    assert '`python -m dpp_surgery.experiments paper --variants strided_conv dpp_lite_asym --seeds 0' in md
    assert 'Machine: ' in md and '1 threads' in md
    rows = [line for line in md.splitlines() if line.startswith('| ') and not line.startswith('| downsampling')]
    assert [r.split(' | ')[0] for r in rows] == ['| strided_conv', '| dpp_lite_asym']
    runs = record['runs']
    assert [(r['variant'], r['seed']) for r in runs] == [('strided_conv', 0), ('dpp_lite_asym', 0)]
    for r, row in zip(runs, rows):
        assert r['n_train'] == 256 and r['n_test'] == 200
        assert 0 <= r['test_error'] <= 100 and len(r['epoch_seconds']) == len(r['train_loss_per_epoch']) == 1
        assert f"| {r['test_error']:.2f} |" in row and f"| {r['params']:,} |" in row
    assert runs[0]['dpp_params'] == 0 and runs[0]['dpp'] == {}
    assert runs[1]['dpp_params'] == 2 * 48 and set(runs[1]['dpp']) == {'stages.1.down', 'stages.2.down'}
    assert record['args']['variants'] == ['strided_conv', 'dpp_lite_asym'] and record['args']['threads'] == 1
    assert record['machine'] in md


def test_existing_results_are_not_overwritten(tmp_path, capsys):
    out = tmp_path / 'paper'
    out.mkdir()
    (out / 'paper.md').write_text('earlier results\n')
    assert main(_tiny_args(out)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('dpp_surgery.experiments: error: ') and '--overwrite' in err and len(err.splitlines()) == 1
    assert (out / 'paper.md').read_text() == 'earlier results\n'
    assert not (out / 'paper.json').exists()


@needs_fashion
def test_overwrite_replaces_results(tmp_path):
    out = tmp_path / 'paper'
    out.mkdir()
    (out / 'paper.json').write_text('{}\n')
    assert main(_tiny_args(out, '--overwrite', '--variants', 'avg')) == 0
    assert [r['variant'] for r in json.loads((out / 'paper.json').read_text())['runs']] == ['avg']


@pytest.mark.parametrize('bad, message', [
    (['--epochs', '0'], '--epochs must be >= 1, but got 0'),
    (['--train-subset', '-1'], '--train-subset must be >= 0'),
    (['--seeds', '0', '0'], 'must not repeat'),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, bad, message):
    assert main(_tiny_args(tmp_path / 'paper', *bad)) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'paper').exists()


def test_unknown_variant_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(['paper', '--variants', 'lp', '--output', str(tmp_path)])
    assert "invalid choice: 'lp'" in capsys.readouterr().err


def _runs(errors):
    return [{'variant': v, 'seed': s, 'test_error': e} for v, per_seed in errors.items() for s, e in enumerate(per_seed)]


def test_paired_differences_and_findings():
    from dpp_surgery.tools.experiments import _findings
    from dpp_surgery.tools.records import paired_differences
    runs = _runs({'max': [10.0, 11.0, 12.0], 'avg': [10.5, 11.4, 12.6], 'dpp_lite_asym': [9.0, 10.1, 10.9],
                  'strided_conv': [10.0, 13.0, 11.0]})
    d = paired_differences(runs, 'dpp_lite_asym', 'max')  # differences -1.0, -0.9, -1.1
    assert d['seeds'] == 3 and d['mean'] == pytest.approx(-1.0) and d['se'] == pytest.approx(0.1 / 3 ** 0.5)
    assert d['resolved'] and d['t'] == pytest.approx(-17.32, abs=0.01)
    d = paired_differences(runs, 'strided_conv', 'max')  # 0, 2, -1: mean 1/3 with a large spread
    assert not d['resolved']
    assert paired_differences(runs[:1] + runs[3:4], 'avg', 'max') is None  # one common seed: no test
    text = '\n'.join(_findings(runs, ['strided_conv', 'max', 'avg', 'dpp_lite_asym']))
    assert 'lowest first: dpp_lite_asym (10.00%), max (11.00%), strided_conv (11.33%), avg (11.50%).' in text
    assert 'resolved, lower error: dpp_lite_asym vs max -1.00 +/- 0.06; dpp_lite_asym vs avg -1.50 +/- 0.12.' in text
    assert 'avg vs max +0.50' in text and 'max vs avg' not in text  # the baselines compared once
    assert 'than both max and avg pooling: dpp_lite_asym.' in text
    one_seed = _findings(_runs({'max': [10.0], 'dpp_lite_sym': [9.0]}), ['max', 'dpp_lite_sym'])
    assert 'One seed only' in one_seed[-1]


def test_committed_paper_table_is_current(tmp_path, capsys):
    """zoo/paper/paper.md is exactly what `experiments paper-table` renders from the committed paper.json."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'zoo', 'paper')
    out = tmp_path / 'paper'
    out.mkdir()
    with open(os.path.join(src, 'paper.json')) as f:
        (out / 'paper.json').write_text(f.read())
    assert main(['paper-table', '--output', str(out)]) == 0
    with open(os.path.join(src, 'paper.md')) as f:
        assert (out / 'paper.md').read_text() == f.read()
    assert 'Findings (computed from the runs above):' in capsys.readouterr().out


def test_paper_table_needs_results(tmp_path, capsys):
    assert main(['paper-table', '--output', str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert 'paper.json does not exist' in err and 'experiments paper --output' in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / 'paper.json').write_text('{"runs": []}')
    assert main(['paper-table', '--output', str(tmp_path)]) == 1
    assert 'holds no runs' in capsys.readouterr().err
    assert not (tmp_path / 'paper.md').exists()


def test_fashion_mnist_experiment_keeps_existing_results(tmp_path, capsys):
    """`experiments fashion-mnist` refuses to replace earlier results before training anything."""
    (tmp_path / 'fashion_mnist.md').write_text('earlier results\n')
    assert main(['fashion-mnist', '--output', str(tmp_path), '--no-progress']) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('dpp_surgery.experiments: error: ') and '--overwrite' in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ['fashion_mnist.md']
    assert (tmp_path / 'fashion_mnist.md').read_text() == 'earlier results\n'


def test_fashion_mnist_table_states_the_precision_of_every_run():
    from dpp_surgery.tools.experiments import fashion_mnist_table

    args = dict(train_subset=100, epochs=1, image_size=64, batch_size=32, lr=0.02, test_subset=50, seeds=[0, 1])
    runs = [dict(seed=s, converted=c, test_accuracy=0.5 + 0.1 * s + 0.01 * c, images_per_second=10.0 + c,
                 amp=amp, precision='...') for s, (c, amp) in
            [(0, (False, 'none')), (0, (True, 'bf16')), (1, (False, 'none')), (1, (True, 'none'))]]
    table = fashion_mnist_table({'args': args, 'runs': runs, 'machine': 'a CPU', 'command': 'cmd'})
    rows = {line.split(' | ')[0]: line for line in table.splitlines() if line.startswith('| ')}
    assert rows['| original'].endswith('| float32, float32 |') and '50.00%, 60.00%' in rows['| original']
    assert rows['| converted (default policy)'].endswith('| bfloat16, float32 |')
    assert 'Command: `cmd`' in table and 'Machine: a CPU.' in table
