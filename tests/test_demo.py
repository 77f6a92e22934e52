"""The main job, ``python -m dpp_surgery.demo``: the --quick run end to end on real Fashion-MNIST, the output-folder
guard, the missing-data error, and the properties of the photo pooling table."""
import contextlib
import io
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpp_surgery.training import data
from dpp_surgery.tools import demo
from dpp_surgery.export import onnx as export
from dpp_surgery.tools.photos import load_photo

needs_data = pytest.mark.skipif(not os.path.isdir(data.DEFAULT_DATA), reason='needs dataset-fashion-mnist')


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    """One --quick run of the whole job (about a minute on 2 cores), shared by the assertions below."""
    out = tmp_path_factory.mktemp('demo') / 'out'
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = demo.main(['--quick', '--no-progress', '--threads', '2', '--out', str(out)])
    return rc, stdout.getvalue(), stderr.getvalue(), out


@needs_data
def test_quick_job_runs_every_stage(quick_run):
    rc, text, err, out = quick_run
    assert rc == 0, err[-2000:]
    headers = re.findall(r'^== (\d)/(\d) ', text, flags=re.M)
    assert [int(h[0]) for h in headers] == list(range(1, 9)) and all(h[1] == '8' for h in headers)
    assert 'Plan for efficientnet_lite0 at input (3, 64, 64)' in text
    for name in ('demo.png', 'pooling.png', 'summary.md', 'summary.json', demo.MARKER,
                 os.path.join('finetune', 'last.safetensors'), os.path.join('finetune', 'metrics.jsonl')):
        assert (out / name).is_file(), name


@needs_data
def test_quick_job_summary_and_onnx(quick_run):
    _, text, _, out = quick_run
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['dpp_layers'] > 0
    assert len(summary['dpp']) == summary['dpp_layers']
    assert summary['params_converted'] > summary['params_original']
    assert summary['test_count'] == 64
    assert [r['mode'] for r in summary['onnx']] == list(export.SUPPORTED_MODES)
    table = text[text.index('| mode | file |'):]
    for r in summary['onnx']:
        assert r['ok'] and r['max_rel_error'] <= 1e-4
        assert os.path.getsize(r['file']) > 1_000_000
        row = next(line for line in table.splitlines() if line.startswith(f"| {r['mode']} |"))
        assert '| ok |' in row
        # onnxruntime classifies the test images as the reloaded PyTorch checkpoint does (64 images: 1/64 apart)
        assert abs(r['onnx_accuracy'] - summary['accuracy_after']) <= 1 / 64 + 1e-9
        assert r['onnx_ms'] > 0
    assert summary['torch_ms'] > 0
    for stage in summary['stage_seconds'].values():
        assert stage >= 0
    assert f"| DPP layers | {summary['dpp_layers']} (" in text
    assert 'Machine: ' in text and 'cores' in text and 'CPU capability' in text
    # the precision stated is the one fine-tuning ran with, as finetune recorded it
    with open(out / 'finetune' / 'metrics.jsonl') as f:
        ran = json.loads(f.readline())['precision']
    assert summary['finetune']['precision'] == ran
    assert f'in training under {ran})' in text
    assert f'images/s, {ran} |' in (out / 'summary.md').read_text()


@needs_data
def test_quick_job_figure_and_learned_parameters(quick_run):
    from PIL import Image

    _, _, _, out = quick_run
    with Image.open(out / 'demo.png') as img:
        img.load()
        assert img.width >= 1200 and img.height >= 600
        assert len(np.unique(np.asarray(img.convert('L').resize((64, 32))))) > 20  # not a blank canvas
    summary = json.loads((out / 'summary.json').read_text())
    # the plotted values are those of the saved fine-tuned checkpoint: alpha = exp(min(theta_alpha, 10)),
    # lambda = exp(theta_lambda)
    from safetensors.torch import load_file
    state = load_file(str(out / 'finetune' / 'last.safetensors'))
    names = sorted(k[:-len('.theta_alpha')] for k in state if k.endswith('.theta_alpha'))
    assert sorted(d['name'] for d in summary['dpp']) == names
    moved = False
    for d in summary['dpp']:
        theta_alpha, theta_lambda = state[d['name'] + '.theta_alpha'], state[d['name'] + '.theta_lambda']
        assert len(d['alpha']) == len(d['lambda']) == d['channels'] == len(theta_alpha)
        torch.testing.assert_close(torch.tensor(d['alpha']), theta_alpha.clamp(max=10).exp())
        torch.testing.assert_close(torch.tensor(d['lambda']), theta_lambda.exp())
        moved |= any(abs(a - d['init'][0]) > 0 for a in d['alpha'])
    assert moved, 'the figure must show the fine-tuned parameters, not their initial values'


@needs_data
def test_refuses_foreign_folder(tmp_path, capsys):
    foreign = tmp_path / 'mine'
    foreign.mkdir()
    (foreign / 'thesis.tex').write_text('keep me')
    assert demo.main(['--quick', '--out', str(foreign)]) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'does not look like a previous demo output' in err and "'thesis.tex'" in err
    assert sorted(os.listdir(foreign)) == ['thesis.tex']
    (tmp_path / 'a_file').write_text('x')
    assert demo.main(['--quick', '--out', str(tmp_path / 'a_file')]) == 1
    assert 'is a file' in capsys.readouterr().err


def test_accepts_own_folder(tmp_path):
    own = tmp_path / 'previous'
    own.mkdir()
    (own / 'pooling.png').write_bytes(b'old')  # only names the demo writes: a previous demo output
    (own / 'efficientnet_lite0_dpp_decomposed.onnx').write_bytes(b'old')
    demo.check_output_dir(str(own))
    assert (own / demo.MARKER).is_file()
    (own / 'notes.txt').write_text('added later')  # the marker says the folder is the demo's
    demo.check_output_dir(str(own))
    new = tmp_path / 'new' / 'deeper'
    demo.check_output_dir(str(new))
    assert sorted(os.listdir(new)) == [demo.MARKER]


def test_missing_fashion_mnist_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, 'DEFAULT_DATA', str(tmp_path / 'no-such-dir'))
    assert demo.main(['--quick', '--out', str(tmp_path / 'out')]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith('error: ') and captured.err.count('\n') == 1
    assert 'apt-get install dataset-fashion-mnist' in captured.err and 'Traceback' not in captured.err
    assert not (tmp_path / 'out').exists()


def test_bad_arguments_exit_2(tmp_path):
    for argv in (['--train-subset', '10'], ['--image-size', '16'], ['--threads', '0']):
        with pytest.raises(SystemExit) as e:
            demo.main(argv + ['--out', str(tmp_path)])
        assert e.value.code == 2


def _window_bounds(x: torch.Tensor):
    """min and max of every 2x2/stride-2 window, by unfolding (independent of the demo's own check)."""
    n, c, h, w = x.shape
    cols = F.unfold(x[..., :h // 2 * 2, :w // 2 * 2].reshape(n * c, 1, h // 2 * 2, w // 2 * 2), 2, stride=2)
    shape = (n, c, h // 2, w // 2)
    return cols.min(1).values.reshape(shape), cols.max(1).values.reshape(shape)


def test_pooling_table_properties():
    photo = load_photo('china.jpg')
    rows, pooled = demo.pool_photo(photo)
    by_name = {r['method']: r for r in rows}
    assert list(by_name) == list(demo.pooling_methods())
    assert all(r['in_window'] for r in rows)
    assert all(r['size'] == tuple(pooled['MaxPool2d'].shape[-2:]) == (106, 160) for r in rows)
    assert by_name['AvgPool2d']['detail_vs_avg'] == pytest.approx(1.0)
    assert by_name['MaxPool2d']['detail_vs_avg'] > 1.2
    # the init='max' preset approaches max pooling
    assert by_name['DPP lite-asym, init=max']['detail_vs_avg'] == pytest.approx(
        by_name['MaxPool2d']['detail_vs_avg'], rel=0.05)
    # every DPP output lies within its window's min and max, checked here independently, at both stages
    for name, pool in demo.pooling_methods().items():
        if not name.startswith('DPP'):
            continue
        with torch.no_grad():
            x = photo
            for _ in range(2):
                y = pool(x)
                lo, hi = _window_bounds(x)
                assert bool(((y >= lo - 1e-6) & (y <= hi + 1e-6)).all()), name
                x = y
    # and the table's own check can fail
    half = F.avg_pool2d(photo, 2)
    assert demo._in_window(photo, half)
    assert not demo._in_window(photo, half + 0.01)


def test_pooling_only(tmp_path, capsys):
    assert demo.main(['--pooling-only', '--out', str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for name in demo.pooling_methods():
        assert f'| {name} |' in text
    assert '| NO |' not in text
    assert os.path.getsize(tmp_path / 'pooling.png') > 10_000
