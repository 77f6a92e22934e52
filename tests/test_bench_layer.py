"""``bench layer``, ``bench init`` and ``bench preserve`` (:mod:`dpp_surgery.tools.bench.layer`,
:mod:`dpp_surgery.tools.bench.presets`): tiny runs, their records, and the Markdown their renderers write from the
records alone."""
import functools
import json

import torch

from dpp_surgery.tools import bench
from dpp_surgery.tools.bench import layer as bench_layer, render
from dpp_surgery.tools.bench.layer import COMPILED_PATH, DPP2d, _compiled_name, _FormPath, peak_training_memory
from dpp_surgery.tools.bench.presets import render_preserve

TINY_LAYER = ['layer', '--shape', '2', '16', '12', '12', '--repeat', '2']


def _table_lines(text: str, dtype: str) -> list:
    """The table rows under the ``**dtype**`` line of a rendered layer record."""
    block = text.split(f'**{dtype}**\n\n', 1)[1].split('\n\n', 1)[0]
    lines = block.splitlines()
    assert lines[0].startswith('| op | dtype | layout |') and lines[1].startswith('|---|')
    return lines[2:]


def test_bench_layer_small(tmp_path, capsys):
    """bench layer on the CPU in float32 and bfloat16: what it prints is the rendering of the record it writes, one
    table per dtype, the record's numbers in it, the ten CPU targets with their values."""
    out = tmp_path / 'layer.json'
    assert bench.main(['--record', str(out), *TINY_LAYER, '--dtypes', 'float32', 'bfloat16']) == 0
    text = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert text == render(record) + '\n'
    assert record['benchmark'] == 'layer' and record['meta']['command'].startswith('python -m dpp_surgery.bench ')
    assert record['meta']['date'] and record['meta']['versions']['torch'] == torch.__version__
    assert record['machine'] and f"Measured on: {record['machine']}." in text
    assert record['shape'] == [2, 16, 12, 12] and record['settings']['repeat'] == 2 and record['inner'] == 1
    assert record['device'] == 'cpu' and record['compiled'] is False and record['peak_bandwidth'] is None
    first = record['rows'][0]
    assert f"| {first['op']} | float32 | NCHW | {first['fwd_ms']:.3f} | {first['fwd_bwd_ms']:.3f} |" in text
    for dtype in ('float32', 'bfloat16'):
        lines = _table_lines(text, dtype)
        assert lines and all(f'| {dtype} |' in line for line in lines)
        for layout in ('NCHW', 'channels_last'):
            assert f'| DPP lite-sym 2x2 | {dtype} | {layout} |' in text
    assert text.index('**float32**') < text.index('**bfloat16**')
    assert '(PyTorch path) | float32 | NCHW |' in text and '(PyTorch path) | float32 | channels_last' not in text
    assert 'torch.compile' not in text  # (on the CPU only with --compile)
    assert 'MaxPool2d(3,2,1)' in text and 'AvgPool2d(2,2)' in text
    assert len(record['checks']) == len(record['targets']) == 10
    assert text.count('- PASS: ') + text.count('- MISS: ') == 10
    target = record['targets'][0]
    assert f"{target['target']}: {target['value']:.2f}" in text
    dpp = next(r for r in record['rows'] if r['op'] == 'DPP lite-sym 2x2' and r['layout'] == 'NCHW'
               and r['dtype'] == 'float32')
    assert dpp['fwd_ms'] > 0 and dpp['fwd_bwd_ms'] > 0 and dpp['bandwidth'] is None
    # a training step needs at least the input gradient and the output
    assert 1.0 < dpp['memory_x'] < 10.0


def test_bench_layer_compile_times_both_forms(capsys, monkeypatch):
    """--compile on the CPU: the PyTorch path under torch.compile for each guide, in the form it runs and in the
    other one, with their ratio as a target line per guide and direction (compiled by the eager backend here, for
    time); --no-memory leaves the memory column and its targets out."""
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='eager'))
    assert bench.main(['layer', '--shape', '2', '8', '12', '12', '--repeat', '2', '--dtypes', 'float32',
                       '--compile', '--no-memory']) == 0
    text = capsys.readouterr().out
    for name in (COMPILED_PATH, _compiled_name('lite', 'stacked'), _compiled_name('full'),
                 _compiled_name('full', 'pooled')):
        assert f'| {name} | float32 | NCHW |' in text
    lines = [line for line in text.splitlines() if '(the form it runs)' in line]
    assert len(lines) == 4 and all(line.startswith(('- PASS: ', '- MISS: ')) for line in lines)
    assert sum('lite guide, pooled (the form it runs) / stacked form' in line for line in lines) == 2
    assert sum('full guide, stacked (the form it runs) / pooled form' in line for line in lines) == 2
    lines = _table_lines(text, 'float32')
    assert len(lines) == 14 + 9 and all(line.endswith('| - |') for line in lines)  # (PyTorch path: NCHW only)
    assert 'training memory' not in text and text.count('- PASS: ') + text.count('- MISS: ') == 8 + 4


def test_bench_record_refuses_to_overwrite(tmp_path, capsys, monkeypatch):
    """--record to an existing file without --overwrite: exit 2 before measuring, the file untouched."""
    path = tmp_path / 'layer.json'
    path.write_text('{"kept": true}\n')

    def measured(*args, **kwargs):
        raise AssertionError('measured although the record could not be written')

    monkeypatch.setattr(bench_layer, 'interleaved_medians', measured)
    assert bench.main(['--record', str(path), *TINY_LAYER]) == 2
    assert path.read_text() == '{"kept": true}\n'
    captured = capsys.readouterr()
    assert '--overwrite' in captured.err and captured.out == ''


def test_bench_form_paths_compute_the_layer():
    """The forms bench layer --compile compares compute what DPP2d computes, in the input's dtype."""
    torch.manual_seed(0)
    for guide in ('lite', 'full'):
        layer = DPP2d(4, guide=guide, impl='torch')
        for form in ('pooled', 'stacked'):
            other = _FormPath(4, form, guide=guide)
            other.load_state_dict(layer.state_dict())
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(2, 4, 9, 8).to(dtype)
                out = other(x)
                assert out.dtype == dtype
                torch.testing.assert_close(out, layer(x))


def test_peak_training_memory_counts_saved_tensors():
    x = torch.randn(2, 8, 16, 16)
    kernel = peak_training_memory(DPP2d(8), x)
    reference = peak_training_memory(DPP2d(8, impl='torch'), x)
    assert 1.25 <= kernel < reference


def test_bench_init(tmp_path, capsys):
    """bench init: what it prints is the rendering of its record; every preset on random input and the photo."""
    out = tmp_path / 'init.json'
    assert bench.main(['--record', str(out), 'init']) == 0
    text = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert text == render(record) + '\n'
    assert record['benchmark'] == 'init' and record['meta']['command'].endswith(' init') and record['meta']['date']
    assert f"Measured on: {record['machine']}." in text
    assert '| photo china.jpg' in text
    assert text.count('| random') == 5 and len(record['rows']) == 10
    first = record['rows'][0]
    assert f"| {first['input']} | {first['init']} | {first['reward']} | {first['avg_max']:.2e} |" in text
    assert record['checks'] == [] and 'PASS' not in text and 'MISS' not in text


def _preserve_record(default_init: str = 'paper') -> dict:
    top1 = iter((0.0, 0.05, 0.01, 0.10, 0.12, 0.02, 0.15, 0.15, 0.03))
    rows = [{'placement': placement, 'init': init, 'top1_agreement': next(top1), 'logit_cosine': 0.5 + 0.01 * (i - j),
             'marks': []}
            for i, placement in enumerate(('post', 'pre', 'block'))
            for j, init in enumerate(('paper', 'avg', 'max (asym)'))]
    best = max(rows, key=lambda r: (r['top1_agreement'], r['logit_cosine']))
    best['marks'].append('best')
    next(r for r in rows if r['placement'] == 'block' and r['init'] == default_init)['marks'].append('default')
    return json.loads(json.dumps({
        'benchmark': 'preserve', 'settings': {'threads': 2, 'size': 224},
        'meta': {'format': 1, 'command': 'python -m dpp_surgery.bench preserve', 'date': '2026-01-01T00:00:00+00:00',
                 'versions': {'torch': '2.0'}},
        'machine': 'a test machine', 'size': 224, 'views': 150, 'photos': 15, 'rows': rows,
        'best': {'placement': best['placement'], 'init': best['init']},
        'default': {'placement': 'block', 'init': default_init}, 'checks': []}))


def test_render_preserve_from_a_record():
    """bench preserve's table from a hand-made record (a real run takes about a minute): the marks are the
    record's, not today's default policy; the views and machine come from the record."""
    record = _preserve_record()
    text = render(record)
    assert text == render_preserve(record)
    assert '150 views (15 photos x 10 crops/flips) at 224 px' in text
    assert 'Measured on: a test machine.' in text
    assert '| block | paper (best, default) | 15.0% | 0.5200 |' in text
    assert '| post | paper | 0.0% | 0.5000 |' in text
    assert sum('default)' in line for line in text.splitlines() if line.startswith('| ')) == 1
    moved = render(_preserve_record(default_init='avg'))
    assert '| block | avg (default) | 15.0% | 0.5100 |' in moved and '| block | paper (best) |' in moved


def test_bench_preserve_marks_rows():
    """The marks bench preserve records: the best row (agreement, then cosine) and today's default policy."""
    from dpp_surgery.surgery import ConversionPolicy
    from dpp_surgery.tools.bench.presets import _mark_rows

    rows = [{'placement': p, 'init': i, 'top1_agreement': a, 'logit_cosine': c}
            for p, i, a, c in (('post', 'paper', 0.5, 0.9), ('pre', 'avg', 0.5, 0.95), ('block', 'paper', 0.1, 0.2),
                               ('block', 'avg', 0.1, 0.3))]
    best, default = _mark_rows(rows)
    assert best == {'placement': 'pre', 'init': 'avg'} and rows[1]['marks'] == ['best']
    assert default['placement'] == ConversionPolicy().placement
    marked = [r for r in rows if 'default' in r['marks']]
    assert len(marked) <= 1 and all(r['placement'] == default['placement'] and r['init'] == default['init']
                                    for r in marked)


def test_render_layer_cuda_record():
    """A CUDA record (hand-made: no GPU here) renders with the bandwidth column, CUDA events and the GPU's peak from
    the record; a memory not measured shows as '-'."""
    rows = [{'op': op, 'dtype': 'bfloat16', 'layout': 'channels_last', 'fwd_ms': ms, 'fwd_bwd_ms': 2 * ms,
             'memory_x': None, 'bandwidth': bw} for op, ms, bw in (('AvgPool2d(2,2)', 0.1, 0.8),
                                                                   ('DPP lite-sym 2x2', 0.12, 0.655))]
    record = json.loads(json.dumps({
        'benchmark': 'layer', 'settings': {'threads': 2, 'device': 'cuda'},
        'meta': {'format': 1, 'command': 'python -m dpp_surgery.bench layer --device cuda', 'date': '2026-01-01',
                 'versions': {'torch': '2.0'}},
        'machine': 'a GPU', 'device': 'cuda', 'shape': [32, 256, 56, 56], 'dtypes': ['bfloat16'], 'repeat': 20,
        'inner': 10, 'compiled': False, 'memory': False, 'peak_bandwidth': 3.35e12, 'rows': rows, 'targets': [],
        'checks': [{'check': 'bf16 channels_last: forward bandwidth >= 60% of peak: 0.66', 'pass': True}]}))
    text = render(record)
    assert 'medians of 20 interleaved runs of 10 calls each (CUDA events)' in text and '(3350 GB/s)' in text
    assert 'Measured on: a GPU.' in text and '**bfloat16**' in text and '**float32**' not in text
    assert '| forward bandwidth / peak |' in text and '\n|' + '---|' * 9 + '\n' in text
    assert '| DPP lite-sym 2x2 | bfloat16 | channels_last | 0.120 | 0.240 | 1.20x | 1.20x | - | 66% |' in text
    assert text.endswith('- PASS: bf16 channels_last: forward bandwidth >= 60% of peak: 0.66')
