"""``experiments versus``: its statistics, its degraded test sets, and a tiny study that is stopped and continued."""
import json
import math

import pytest
import torch
import torch.nn as nn

from dpp_surgery.tools import experiments
from dpp_surgery.tools.records import t95
from dpp_surgery.tools.versus_study import SETTINGS, holm, robustness, t_test_p, degraded_views, versus_table


@pytest.mark.parametrize('dof', range(1, 11))
def test_t_test_p_matches_the_95_percent_quantiles(dof):
    """At the tabulated two-sided 95% quantile of Student's t the p-value is 0.05 (the table rounds to 3 places)."""
    assert t_test_p(t95(dof), dof) == pytest.approx(0.05, abs=2e-4)
    assert t_test_p(0.0, dof) == pytest.approx(1.0)
    assert t_test_p(-t95(dof), dof) == t_test_p(t95(dof), dof)
    assert t_test_p(math.inf, dof) == 0.0


def test_t_test_p_against_the_normal_limit_and_a_known_value():
    # many degrees of freedom: near the normal's 2 * (1 - Phi(1.96)) = 0.0500, a little above it (heavier tails)
    assert 0.0500 < t_test_p(1.96, 400) < 0.0510
    # values of scipy.stats.t.sf (two-sided), written out so that the test needs no scipy
    for t, dof, p in ((2.5, 7, 0.04099221858575289), (1.1, 4, 0.33308364954755393), (4.2, 9, 0.002306692506540238),
                      (0.3, 1, 0.8144528418445154), (3.3, 3, 0.0457334506359987)):
        assert t_test_p(t, dof) == pytest.approx(p, rel=1e-9)
    # dof 2 has a closed form: p = 1 - t / sqrt(2 + t^2)
    assert t_test_p(3.0, 2) == pytest.approx(1 - 3 / math.sqrt(11), abs=1e-12)
    with pytest.raises(ValueError, match='dof'):
        t_test_p(1.0, 0)


def test_holm_adjusts_step_down_and_keeps_the_order():
    adjusted = holm({'a': 0.01, 'b': 0.04, 'c': 0.03})
    assert adjusted == pytest.approx({'a': 0.03, 'c': 0.06, 'b': 0.06})
    assert holm({'x': 0.5, 'y': 0.9}) == pytest.approx({'x': 1.0, 'y': 1.0})
    assert holm({}) == {}


@pytest.fixture(scope='module')
def views():
    budget = {'img_size': 32}
    cfg = {'max_shift': 4, 'downscale': 2, 'noise_std': 0.1, 'view_seed': 0}
    return degraded_views(budget, cfg, 60, 0)


def test_views_are_the_finetune_test_draw_and_degraded(views):
    from dpp_surgery.training.data import load_datasets
    from dpp_surgery.training.finetune import subset

    x, labels = views
    draw = subset(load_datasets().test, 60, 1)
    assert torch.equal(labels, torch.stack([draw[i][1] for i in range(60)]))
    for name in ('clean', 'shift_a', 'shift_b', 'downscaled', 'noisy'):
        assert x[name].shape == (60, 3, 32, 32) and 0 <= x[name].min() and x[name].max() <= 1
    assert not torch.equal(x['shift_a'], x['shift_b'])
    assert 0 < (x['noisy'] - x['clean']).std() < 0.11
    assert (x['downscaled'] - x['clean']).abs().mean() > 0.005
    # a shift moves the content: some shifted view equals the clean image rolled by at most 4 px
    a, clean = x['shift_a'][0], x['clean'][0]
    assert any(torch.allclose(a[:, 4:-4, 4:-4], clean[:, 4 - dy:28 - dy, 4 - dx:28 - dx])
               for dy in range(-4, 5) for dx in range(-4, 5))


class _Pixel(nn.Module):
    """Reads one pixel: changes class with any shift of the content there."""

    def forward(self, x):
        return torch.stack([x[:, 0, 10, 10], -x[:, 0, 10, 10]], dim=1)


class _Constant(nn.Module):
    """Class 0 whatever the input."""

    def forward(self, x):
        return torch.stack([x.new_ones(len(x)), x.new_zeros(len(x))], dim=1)


def test_robustness_tells_a_shift_sensitive_model_from_an_invariant_one(views):
    x, labels = views
    pixel, mean = robustness(_Pixel(), x, labels), robustness(_Constant(), x, labels)
    assert mean['shift_consistency'] == 1.0
    assert pixel['shift_consistency'] < 0.95
    no_shift = degraded_views({'img_size': 32}, {'max_shift': 0, 'downscale': 2, 'noise_std': 0.1, 'view_seed': 0},
                              60, 0)
    assert robustness(_Pixel(), *no_shift)['shift_consistency'] == 1.0
    assert mean['clean_accuracy'] == pytest.approx((labels == 0).float().mean().item())


def test_every_setting_has_the_arms_the_study_names():
    r18 = [a.name for a in SETTINGS['resnet18'].arms]
    lite = [a.name for a in SETTINGS['efficientnet_lite0'].arms]
    assert r18 == ['original', 'dpp-pre', 'blur-pre', 'avg-pre', 'max-pre', 's3dpp-pre']
    assert lite == ['original'] + [f'{op}-{p}' for p in ('block', 'post') for op in ('dpp', 'blur', 'avg', 'max')] \
        + ['s3dpp-block']


TINY = ['versus', '--settings', 'resnet18', '--arms', 'dpp-pre', 'blur-pre', '--train-subset', '64', '--epochs', '1',
        '--batch-size', '32', '--test-subset', '50', '--no-progress', '--no-amp']


def _run(argv):
    assert experiments.main(argv) == 0


@pytest.mark.timeout(900)
def test_a_study_runs_is_recorded_at_each_step_and_continues(tmp_path, monkeypatch):
    out = str(tmp_path / 'vs')
    # costs with a tiny latency run; the first sitting runs seed 0 only
    _run(TINY + ['--seeds', '0', '--latency-size', '32', '--latency-repeat', '1', '--output', out])
    record = json.loads((tmp_path / 'vs' / 'versus.json').read_text())
    assert [(r['arm'], r['seed']) for r in record['runs']] == [('original', 0), ('dpp-pre', 0), ('blur-pre', 0)]
    assert set(record['costs']) == {'resnet18/original', 'resnet18/dpp-pre', 'resnet18/blur-pre'}
    assert record['costs']['resnet18/dpp-pre']['flop_ratio_train'] > 1.0 > 0
    assert 'latency' in record['costs']['resnet18/blur-pre'] and 'latency' not in record['costs']['resnet18/original']
    for r in record['runs']:
        assert r['clean_accuracy'] == pytest.approx(r['test_accuracy'], abs=1e-6)  # the same draw, the final model
        assert 0 <= r['shift_consistency'] <= 1
        # a recorded run keeps its weights and metrics, not the optimizer state it will never resume from
        folder = tmp_path / 'vs' / 'runs' / 'resnet18' / f"{r['arm']}_seed0"
        assert sorted(p.name for p in folder.iterdir()) == ['best.safetensors', 'config.json', 'last.safetensors',
                                                            'metrics.jsonl']

    # a second sitting with a second seed runs only what is missing, and records each run as it finishes
    from dpp_surgery.tools import versus_study

    finished = []
    real = versus_study._save

    def spy(args, rec):
        finished.append(len(rec['runs']))
        real(args, rec)

    monkeypatch.setattr(versus_study, '_save', spy)
    _run(TINY + ['--seeds', '0', '1', '--latency-size', '32', '--latency-repeat', '1', '--output', out])
    record = json.loads((tmp_path / 'vs' / 'versus.json').read_text())
    assert [(r['arm'], r['seed']) for r in record['runs']][3:] == [('original', 1), ('dpp-pre', 1), ('blur-pre', 1)]
    assert finished[:3] == [4, 5, 6] and len(record['sittings']) == 2
    table = (tmp_path / 'vs' / 'versus.md').read_text()
    assert table == versus_table(record) + '\n'
    assert '| dpp-pre | pre |' in table and 'Holm-adjusted over the 3 comparisons' in table
    assert 'Precision per run: original float32 x2; dpp-pre float32 x2; blur-pre float32 x2.' in table
    assert '1-minute load average after each run: median' in table

    # study-table regenerates the same file from the record
    (tmp_path / 'vs' / 'versus.md').write_text('stale')
    _run(['study-table', 'versus', '--output', out])
    assert (tmp_path / 'vs' / 'versus.md').read_text() == table


def test_a_study_with_other_options_is_refused_before_any_work(tmp_path):
    out = tmp_path / 'vs'
    out.mkdir()
    record = {'plan': {'version': 1, 'settings': {'resnet18': {'budget': {'epochs': 9}}}}, 'runs': [], 'costs': {},
              'sittings': []}
    (out / 'versus.json').write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r'other options .*settings\.resnet18\.budget.*--overwrite'):
        experiments.build_parser()  # the parser builds
        from dpp_surgery.tools.versus_study import versus
        args = experiments.build_parser().parse_args(TINY + ['--output', str(out), '--seeds', '0'])
        args.argv, args.amp = TINY, 'none'
        versus(args)
    assert not (out / 'runs').exists()
    (out / 'versus.json').write_text('{"plan": 1}')
    with pytest.raises(ValueError, match='not a record of `experiments versus`'):
        versus(args)


@pytest.mark.parametrize('flags, message', [
    (['--arms', 'dpp-nowhere'], 'unknown arm'),
    (['--seeds', '0', '0'], 'must not repeat'),
    (['--epochs', '0'], '--epochs must be >= 1'),
    (['--noise-std', '2'], 'noise-std'),
    (['--img-size', '8'], '--img-size must be >= 16'),
])
def test_bad_options_name_the_problem(flags, message, tmp_path, capsys):
    assert experiments.main(TINY + ['--output', str(tmp_path)] + flags) != 0
    assert message in capsys.readouterr().err
