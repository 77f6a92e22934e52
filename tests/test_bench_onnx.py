"""bench onnx, onnx-layer and runtimes (dpp_surgery/tools/bench/onnx_runtimes.py): the checks from the measurements,
the Markdown from the record alone, and the commands end to end at tiny sizes."""
import json

import pytest

from dpp_surgery.tools import bench
from dpp_surgery.tools.bench import onnx_runtimes
from dpp_surgery.tools.bench.common import roundtrip

_LATENCY_KEYS = ['torch original', 'torch converted', 'ort original', 'ort decomposed', 'ort custom',
                 'ort custom (function)']


def _latency_rows():
    return [dict(zip(_LATENCY_KEYS, (10.0, 12.0, 5.0, 6.0, 5.5, 7.0)), model='a', batch=1, dpp_layers=2),
            dict(zip(_LATENCY_KEYS, (10.0, 12.0, 5.0, 8.0, 5.5, 7.0)), model='a', batch=8, dpp_layers=2)]


def _summaries():
    return [
        {'model': 'a', 'nodes': {'original': 10, 'decomposed': 50, 'custom': 12}, 'dpp_layers': 2, 'custom_nodes': 2,
         'dpp_nodes': ['p1', 'p2'], 'nodes_per_layer': {'tiling': [20, 19], 'other': []},
         'export_s': {'original': 2.0, 'decomposed': 2.5, 'custom': 4.0}, 'flop_ratio': 1.5},
        {'model': 'b', 'nodes': {'original': 10, 'decomposed': 90, 'custom': 12}, 'dpp_layers': 2, 'custom_nodes': 2,
         'dpp_nodes': ['p1', 'p2'], 'nodes_per_layer': {'tiling': [], 'other': [40, 40]},
         'export_s': {'original': 2.0, 'decomposed': 2.0, 'custom': 2.0}, 'flop_ratio': 1.2},
    ]


def _onnx_record():
    """A bench onnx record as main writes it (after the JSON round trip), from hand-made measurements."""
    rows = _latency_rows()
    shares = {'a': 0.05, 'resnet50': 0.1}
    portable = [{'model': 'a', 'batch': 8, 'portable ms': 6.0, 'native ms': 5.0, 'portable DPP2d ms': 1.2,
                 'native DPP2d ms': 1.0, 'max_rel_diff': 3e-7}]
    checks = (onnx_runtimes.onnx_latency_checks(rows, shares) + onnx_runtimes.onnx_file_checks(_summaries(), rows)
              + onnx_runtimes.portable_checks(portable))
    return roundtrip({
        'benchmark': 'onnx', 'meta': {'command': 'python -m dpp_surgery.bench onnx', 'versions': {}},
        'settings': {'threads': 2, 'models': ['a'], 'batches': [1, 8], 'size': 32, 'repeat': 3, 'portable': True},
        'machine': 'a test machine', 'versions': {'onnxruntime': '9.9.9'}, 'rows': rows, 'dpp_share': shares,
        'dpp_time': {'a': {'batch': 8, 'custom_ms': 2.0, 'decomposed_ms': 10.0,
                           'decomposed_by_op': {'Log': 4.0, 'Conv': 3.0, 'Mul': 2.0, 'Exp': 1.0}}},
        'files': _summaries(), 'portable_vs_native': portable,
        'ort_library': {'isa_paths': ['avx2', 'avx512'], 'isa_selected_here': 'avx512', 'min_glibc': '2.17'},
        'checks': checks})


def test_onnx_file_summary_counts_the_decomposition_per_layer(tmp_path):
    """bench onnx's file table: nodes per DPP layer are the decomposed file's nodes written for each DPP2d node."""
    import onnx
    import torch
    from dpp_surgery import DPP2d, export_onnx
    torch.manual_seed(0)
    original = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AvgPool2d(2),
                                   torch.nn.MaxPool2d(3, 2, 1)).eval()
    converted = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), DPP2d(4), DPP2d(4, 3, 2, 1)).eval()
    x = torch.randn(1, 3, 32, 32)
    files = {label: export_onnx(model, str(tmp_path / f'{label}.onnx'), mode=mode, example_input=x, min_size=8)
             for label, model, mode in (('original', original, 'decomposed'), ('decomposed', converted, 'decomposed'),
                                        ('custom', converted, 'custom'))}
    summary = onnx_runtimes._file_summary('tiny', converted, files,
                                          {'original': 1.0, 'decomposed': 2.0, 'custom': 3.0})
    assert roundtrip(summary) == summary  # JSON types only
    decomposed = len(onnx.load(files['decomposed']).graph.node)
    assert summary['nodes']['custom'] == 3 and summary['custom_nodes'] == 2 and summary['dpp_layers'] == 2
    per = summary['nodes_per_layer']
    assert len(per['tiling']) == len(per['other']) == 1
    assert per['tiling'][0] + per['other'][0] == decomposed - 1  # all but the conv
    assert 0 < per['tiling'][0] <= 25 < per['other'][0]
    # the DPP layers' own time: the DPP2d nodes, and the decomposed nodes under their names (not the model's conv)
    times = onnx_runtimes._dpp_node_time(files, summary['dpp_nodes'], batch=2, size=32, threads=1, runs=2)
    assert times['custom_ms'] > 0 and times['decomposed_ms'] > 0
    assert {'Conv', 'Log', 'Exp'} <= set(times['decomposed_by_op'])
    assert abs(sum(times['decomposed_by_op'].values()) - times['decomposed_ms']) < 1e-6
    assert onnx_runtimes._dpp_node_time(files, [], batch=2, size=32, threads=1, runs=1)['decomposed_ms'] == 0


def test_onnx_latency_table_checks():
    """The latency table's targets: decomposed within 1.2x the custom file per model and batch, the kernel's share;
    the table and the share line written from the record."""
    checks = onnx_runtimes.onnx_latency_checks(_latency_rows(), {'resnet50': 0.1})
    assert [c['pass'] for c in checks] == [True, True, True, True, False, True]
    assert checks[3]['check'] == 'a batch 1: onnxruntime decomposed / custom 1.09x <= 1.2x'
    text = onnx_runtimes.render_onnx(_onnx_record())
    assert '| a | 1 | 2 | 10.0 | 12.0 | 5.0 | 6.0 | 5.5 | 7.0 | 2.18x | 1.09x |' in text
    assert 'onnxruntime 9.9.9' in text and 'at 32 px, 2 threads' in text and 'median ms of 3 interleaved runs' in text
    assert 'Measured on: a test machine.' in text
    assert 'DPP2d nodes (custom kernel, batch 8, profiler): a 5.0%, resnet50 10.0%' in text
    assert '- PASS: a batch 1: onnxruntime decomposed / custom 1.09x <= 1.2x' in text
    assert '- MISS: a batch 8: onnxruntime decomposed / custom 1.45x <= 1.2x' in text
    assert '- PASS: DPP2d nodes <= 15% of converted resnet50 onnxruntime time (10.0%)' in text


def test_onnx_dpp_time_table():
    """The DPP-time table: one row per model with the ratio of the decomposition to the kernel and the operators'
    shares of the decomposition, largest first; then the portable library against the native build."""
    text = onnx_runtimes.render_onnx(_onnx_record())
    assert '| a | 2.0 | 10.0 | 5.0x | Log 40%, Conv 30%, Mul 20%, Exp 10% |' in text
    assert 'batch 8, 32 px' in text
    assert 'avx2, avx512, chosen at run time, here avx512; glibc >= 2.17' in text
    assert '| a | 8 | 6.0 | 5.0 | 1.200x | 1.20 | 1.00 | 1.200x | 3.0e-07 |' in text
    assert "- MISS: a batch 8: portable library's DPP2d time 1.200x the -march=native build's <= 1.1x" in text
    # without the portable comparison (--no-portable): neither its paragraph nor its table
    record = _onnx_record()
    record['portable_vs_native'], record['ort_library'] = [], {}
    record['checks'] = [c for c in record['checks'] if 'portable' not in c['check']]
    text = onnx_runtimes.render_onnx(record)
    assert 'portable' not in text and sum(line.startswith('|---') for line in text.splitlines()) == 3


def test_onnx_file_table_checks():
    """The file table's targets: nodes per layer only where every DPP layer tiles its input, export time per mode,
    decomposed latency against the FLOP ratio."""
    rows = [{'model': 'a', 'batch': 1, 'ort decomposed': 14.0, 'ort original': 10.0},
            {'model': 'b', 'batch': 1, 'ort decomposed': 13.0, 'ort original': 10.0}]
    checks = onnx_runtimes.onnx_file_checks(_summaries(), rows)
    assert [c['pass'] for c in checks] == [True, True, False, True, True, True, False]
    text = [c['check'] for c in checks]
    assert text[0] == 'a: at most 20 ONNX nodes per tiling DPP layer <= 25' and not any('b: at most' in t for t in text)
    assert "a: custom export 2.00x the original's <= 1.5x" in text
    assert 'b batch 1: onnxruntime decomposed / original 1.30x <= FLOP ratio 1.20' in text
    rendered = onnx_runtimes.render_onnx(_onnx_record())
    assert '| a | 2 (2) | 10 | 50 | 12 | 20 | - | 2.0 | 2.5 | 4.0 | 1.25x | 2.00x |' in rendered
    assert '| b | 2 (0) | 10 | 90 | 12 | - | 40 | 2.0 | 2.0 | 2.0 | 1.00x | 1.00x |' in rendered
    assert "- MISS: a: custom export 2.00x the original's <= 1.5x" in rendered


def test_bench_onnx_layer_small(tmp_path, capsys):
    """bench onnx-layer: each layer as the native kernel, the written decomposition and its channel groups, all
    matching PyTorch, with the node counts of the files, then the element-wise operator probe; what it prints is
    the rendering of the record it writes."""
    out = tmp_path / 'onnx_layer.json'
    assert bench.main(['--threads', '1', '--record', str(out), 'onnx-layer', '--stem', '8', '16', '--tile', '8',
                       '16', '--groups', '2', '4', '--batches', '1', '2', '--repeat', '2']) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert text == bench.render(result) + '\n'
    assert result['benchmark'] == 'onnx-layer' and result['meta']['command'].endswith('--repeat 2')
    assert result['machine'] and result['versions']['onnxruntime'] and result['settings']['groups'] == [2, 4]
    assert '| stem (3x3/s2/p1) | 8x16x16 | 1 |' in text and '| tile (2x2/s2/p0) | 8x16x16 | 2 |' in text
    assert '| stem | 2x8x9x8x8 |' in text and '| tile | 2x8x4x8x8 |' in text
    rows = result['rows']
    first = rows[0]
    assert f"| stem (3x3/s2/p1) | 8x16x16 | 1 | {first['kernel_ms']:.2f} | {first['groups']['1']['ms']:.2f} (" in text
    assert [(r['layer'], r['batch']) for r in rows] == [('stem', 1), ('stem', 2), ('tile', 1), ('tile', 2)]
    for r in rows:
        groups = r['groups']
        assert list(groups) == ['1', '2', '4']
        # one chain per group, plus the Split and Concat: the node count grows with the groups
        assert groups['1']['nodes'] < groups['2']['nodes'] < groups['4']['nodes']
        assert max(g['error'] for g in groups.values()) <= 1e-4 and r['kernel_error'] <= 1e-4
        assert r['kernel_ms'] > 0 and all(g['ms'] > 0 for g in groups.values())
    assert rows[2]['groups']['1']['nodes'] <= 25  # the 2x2 layer's file: its decomposition and nothing else
    assert all(set(p['ms']) == set(onnx_runtimes.ONNX_PROBE_OPS) for p in result['probes'])
    assert [c['pass'] for c in result['checks']] == [True] * 4
    assert '- PASS: stem batch 1: every form matches PyTorch within 1e-4' in text


def test_bench_onnx_layer_rejects_groups_that_do_not_divide():
    with pytest.raises(SystemExit, match="--groups 3 does not divide the stem layer's 8 channels"):
        bench.main(['onnx-layer', '--stem', '8', '16', '--tile', '8', '16', '--groups', '3'])


def test_bench_runtimes_small(tmp_path):
    """bench runtimes: the original's and the converted model's files in onnxruntime, OpenVINO and tract (and
    onnxruntime's custom file), each checked against PyTorch, one row per model, batch and runtime."""
    import subprocess
    import sys
    out = tmp_path / 'runtimes.json'
    # a process of its own, as the command runs: OpenVINO stays out of the test process (see conftest other_runtime)
    done = subprocess.run([sys.executable, '-m', 'dpp_surgery.bench', '--threads', '1', '--record', str(out),
                           'runtimes', '--models', 'resnet10t', '--size', '64', '--batches', '1', '2', '--repeat', '1'],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    result = json.loads(out.read_text())
    assert text == bench.render(result) + '\n'
    assert result['meta']['versions'] and result['machine']
    rows = result['rows']
    assert [(r['batch'], r['runtime']) for r in rows] == [(b, rt) for b in (1, 2)
                                                          for rt in ('onnxruntime', 'openvino', 'tract')]
    for r in rows:
        kinds = {'original', 'decomposed'} | ({'custom'} if r['runtime'] == 'onnxruntime' else set())
        assert kinds <= set(r) and all(r[k] > 0 for k in kinds) and not ({'custom'} - kinds) & set(r)
        assert r['max_error'] <= 1e-4 and r['flop_ratio'] > 1
        assert f"| resnet10t | {r['batch']} | {r['runtime']} | {r['original']:.1f} |" in text
    assert set(result['versions']) == {'onnxruntime', 'openvino', 'tract'}
    checks = result['checks']
    assert len(checks) == 2 * len(rows) and all(c['pass'] for c in checks if 'within 1e-4' in c['check'])


def test_bench_runtimes_table_and_missing_runtime(monkeypatch):
    from dpp_surgery.export import runtimes
    rows = [{'model': 'a', 'batch': 1, 'runtime': 'onnxruntime', 'flop_ratio': 1.5, 'original': 10.0,
             'decomposed': 14.0, 'custom': 12.0, 'max_error': 1e-6},
            {'model': 'a', 'batch': 1, 'runtime': 'tract', 'flop_ratio': 1.5, 'original': 10.0, 'decomposed': 16.0,
             'max_error': 2e-4}]
    checks = onnx_runtimes.runtimes_checks(rows)
    assert [c['pass'] for c in checks] == [True, True, False, False]
    assert checks[2]['check'] == 'a batch 1 in tract: every file within 1e-4 of PyTorch (2.0e-04)'
    record = roundtrip({'benchmark': 'runtimes', 'meta': {}, 'settings': {'repeat': 3, 'size': 32, 'threads': 2},
                        'machine': 'a test machine', 'versions': {'onnxruntime': '1', 'tract': '2'}, 'rows': rows,
                        'checks': checks})
    text = bench.render(record)
    assert '| a | 1 | onnxruntime | 10.0 | 14.0 | 12.0 | 1.40x | 1.50 | 1.17x | 1.0e-06 |' in text
    assert '| a | 1 | tract | 10.0 | 16.0 | - | 1.60x | 1.50 | - | 2.0e-04 |' in text
    assert 'median ms of 3 interleaved runs' in text and 'onnxruntime 1, tract 2' in text
    assert 'Measured on: a test machine.' in text and '- MISS: a batch 1 in tract: decomposed / original 1.60x' in text
    monkeypatch.setitem(runtimes._PACKAGE, 'openvino', 'dpp_surgery_no_such_package')
    with pytest.raises(SystemExit, match='openvino is not installed .*pip install dpp_surgery_no_such_package'):
        bench.main(['runtimes', '--runtimes', 'openvino'])
