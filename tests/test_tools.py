"""The benchmarks run end to end (tiny sizes) and print what they promise (the demo: tests/test_demo.py)."""
import json

from dpp_surgery.tools import bench


def test_bench_layer_small(tmp_path, capsys):
    out = tmp_path / 'layer.json'
    assert bench.main(['--json', str(out), 'layer', '--shape', '2', '16', '12', '12', '--repeat', '2',
                       '--dtypes', 'float32', 'bfloat16']) == 0
    text = capsys.readouterr().out
    for dtype in ('float32', 'bfloat16'):
        assert f'| DPP lite-sym 2x2 | {dtype} | NCHW |' in text
        assert f'| DPP lite-sym 2x2 | {dtype} | channels_last |' in text
    assert '(PyTorch path) | float32 | NCHW |' in text and '(PyTorch path) | float32 | channels_last' not in text
    assert 'torch.compile' not in text  # (on the CPU only with --compile)
    assert 'MaxPool2d(3,2,1)' in text and 'AvgPool2d(2,2)' in text
    assert text.count('PASS') + text.count('MISS') == 10
    result = json.loads(out.read_text())
    dpp = next(r for r in result['rows'] if r['op'] == 'DPP lite-sym 2x2' and r['layout'] == 'NCHW'
               and r['dtype'] == 'float32')
    assert dpp['fwd_ms'] > 0 and dpp['fwd_bwd_ms'] > 0
    # a training step needs at least the input gradient and the output
    assert 1.0 < dpp['memory_x'] < 10.0


def test_bench_layer_compile_times_both_forms(capsys):
    """--compile on the CPU: the PyTorch path under torch.compile for each guide, in the form it runs and in the
    other one, with their ratio as a target line per guide and direction."""
    assert bench.main(['layer', '--shape', '2', '8', '12', '12', '--repeat', '2', '--dtypes', 'float32',
                       '--compile', '--no-memory']) == 0
    text = capsys.readouterr().out
    for name in (bench.COMPILED_PATH, bench._compiled_name('lite', 'stacked'), bench._compiled_name('full'),
                 bench._compiled_name('full', 'pooled')):
        assert f'| {name} | float32 | NCHW |' in text
    lines = [line for line in text.splitlines() if '(the form it runs)' in line]
    assert len(lines) == 4 and all(line.lstrip().startswith(('PASS', 'MISS')) for line in lines)
    assert sum('lite guide, pooled (the form it runs) / stacked form' in line for line in lines) == 2
    assert sum('full guide, stacked (the form it runs) / pooled form' in line for line in lines) == 2


def test_bench_form_paths_compute_the_layer():
    """The forms bench layer --compile compares compute what DPP2d computes, in the input's dtype."""
    import torch
    torch.manual_seed(0)
    for guide in ('lite', 'full'):
        layer = bench.DPP2d(4, guide=guide, impl='torch')
        for form in ('pooled', 'stacked'):
            other = bench._FormPath(4, form, guide=guide)
            other.load_state_dict(layer.state_dict())
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(2, 4, 9, 8).to(dtype)
                out = other(x)
                assert out.dtype == dtype
                torch.testing.assert_close(out, layer(x))


def test_peak_training_memory_counts_saved_tensors():
    import torch
    x = torch.randn(2, 8, 16, 16)
    kernel = bench.peak_training_memory(bench.DPP2d(8), x)
    reference = bench.peak_training_memory(bench.DPP2d(8, impl='torch'), x)
    assert 1.25 <= kernel < reference


def test_bench_init(capsys):
    assert bench.main(['init']) == 0
    text = capsys.readouterr().out
    assert '| photo china.jpg' in text
    assert text.count('| random') == 5



def test_first_line_strips_colour_codes_and_falls_back():
    from dpp_surgery.utils import first_line
    assert first_line(RuntimeError('\x1b[96mstep 2/3\x1b[0m failed\nmore detail')) == 'step 2/3 failed'
    assert first_line(ValueError('')) == 'ValueError'
    assert first_line(ValueError('  \n'), '') == ''


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
    summary = bench._file_summary('tiny', converted, files, {'original': 1.0, 'decomposed': 2.0, 'custom': 3.0})
    decomposed = len(onnx.load(files['decomposed']).graph.node)
    assert summary['nodes']['custom'] == 3 and summary['custom_nodes'] == 2 and summary['dpp_layers'] == 2
    per = summary['nodes_per_layer']
    assert len(per['tiling']) == len(per['other']) == 1
    assert per['tiling'][0] + per['other'][0] == decomposed - 1  # all but the conv
    assert 0 < per['tiling'][0] <= 25 < per['other'][0]
    # the DPP layers' own time: the DPP2d nodes, and the decomposed nodes under their names (not the model's conv)
    times = bench._dpp_node_time(files, summary['dpp_nodes'], batch=2, size=32, threads=1, runs=2)
    assert times['custom_ms'] > 0 and times['decomposed_ms'] > 0
    assert {'Conv', 'Log', 'Exp'} <= set(times['decomposed_by_op'])
    assert abs(sum(times['decomposed_by_op'].values()) - times['decomposed_ms']) < 1e-6
    assert bench._dpp_node_time(files, [], batch=2, size=32, threads=1, runs=1)['decomposed_ms'] == 0


def test_onnx_latency_table_checks(capsys):
    """The latency table's targets: decomposed within 1.2x the custom file per model and batch, the kernel's share."""
    import argparse
    keys = ['torch original', 'torch converted', 'ort original', 'ort decomposed', 'ort custom',
            'ort custom (function)']
    rows = [dict(zip(keys, (10.0, 12.0, 5.0, 6.0, 5.5, 7.0)), model='a', batch=1, dpp_layers=2),
            dict(zip(keys, (10.0, 12.0, 5.0, 8.0, 5.5, 7.0)), model='a', batch=8, dpp_layers=2)]
    checks = bench._print_onnx_table(rows, {'resnet50': 0.1}, argparse.Namespace(size=32, threads=2, batches=[1, 8]))
    text = capsys.readouterr().out
    assert 'PASS: a batch 1: onnxruntime decomposed / custom 1.09x <= 1.2x' in text
    assert 'MISS: a batch 8: onnxruntime decomposed / custom 1.45x <= 1.2x' in text
    assert [ok for _, ok in checks] == [True, True, True, True, False, True]


def test_onnx_dpp_time_table(capsys):
    """The DPP-time table: one row per model with the ratio of the decomposition to the kernel and the operators'
    shares of the decomposition, largest first."""
    import argparse
    times = {'a': {'batch': 8, 'custom_ms': 2.0, 'decomposed_ms': 10.0,
                   'decomposed_by_op': {'Log': 4.0, 'Conv': 3.0, 'Mul': 2.0, 'Exp': 1.0}}}
    bench._print_dpp_time_table(times, argparse.Namespace(size=32, batches=[1, 8]))
    text = capsys.readouterr().out
    assert '| a | 2.0 | 10.0 | 5.0x | Log 40%, Conv 30%, Mul 20%, Exp 10% |' in text
    assert 'batch 8, 32 px' in text


def test_onnx_file_table_checks(capsys):
    """The file table's targets: nodes per layer only where every DPP layer tiles its input, export time per mode,
    decomposed latency against the FLOP ratio."""
    import argparse
    summaries = [
        {'model': 'a', 'nodes': {'original': 10, 'decomposed': 50, 'custom': 12}, 'dpp_layers': 2, 'custom_nodes': 2,
         'nodes_per_layer': {'tiling': [20, 19], 'other': []},
         'export_s': {'original': 2.0, 'decomposed': 2.5, 'custom': 4.0}, 'flop_ratio': 1.5},
        {'model': 'b', 'nodes': {'original': 10, 'decomposed': 90, 'custom': 12}, 'dpp_layers': 2, 'custom_nodes': 2,
         'nodes_per_layer': {'tiling': [], 'other': [40, 40]},
         'export_s': {'original': 2.0, 'decomposed': 2.0, 'custom': 2.0}, 'flop_ratio': 1.2},
    ]
    rows = [{'model': 'a', 'batch': 1, 'ort decomposed': 14.0, 'ort original': 10.0},
            {'model': 'b', 'batch': 1, 'ort decomposed': 13.0, 'ort original': 10.0}]
    checks = bench._print_file_table(summaries, rows, argparse.Namespace(size=32))
    assert [ok for _, ok in checks] == [True, True, False, True, True, True, False]
    text = capsys.readouterr().out
    assert 'PASS: a: at most 20 ONNX nodes per tiling DPP layer <= 25' in text and 'b: at most' not in text
    assert 'MISS: a: custom export 2.00x' in text and 'MISS: b batch 1: onnxruntime decomposed / original 1.30x' in text


def test_bench_onnx_layer_small(tmp_path, capsys):
    """bench onnx-layer: each layer as the native kernel, the written decomposition and its channel groups, all
    matching PyTorch, with the node counts of the files, then the element-wise operator probe."""
    out = tmp_path / 'onnx_layer.json'
    assert bench.main(['--threads', '1', '--json', str(out), 'onnx-layer', '--stem', '8', '16', '--tile', '8', '16',
                       '--groups', '2', '4', '--batches', '1', '2', '--repeat', '2']) == 0
    text = capsys.readouterr().out
    assert '| stem (3x3/s2/p1) | 8x16x16 | 1 |' in text and '| tile (2x2/s2/p0) | 8x16x16 | 2 |' in text
    assert '| stem | 2x8x9x8x8 |' in text and '| tile | 2x8x4x8x8 |' in text
    result = json.loads(out.read_text())
    rows = result['rows']
    assert [(r['layer'], r['batch']) for r in rows] == [('stem', 1), ('stem', 2), ('tile', 1), ('tile', 2)]
    for r in rows:
        groups = r['groups']
        assert sorted(groups, key=int) == ['1', '2', '4']
        # one chain per group, plus the Split and Concat: the node count grows with the groups
        assert groups['1']['nodes'] < groups['2']['nodes'] < groups['4']['nodes']
        assert max(g['error'] for g in groups.values()) <= 1e-4 and r['kernel_error'] <= 1e-4
        assert r['kernel_ms'] > 0 and all(g['ms'] > 0 for g in groups.values())
    assert rows[2]['groups']['1']['nodes'] <= 25  # the 2x2 layer's file: its decomposition and nothing else
    assert all(set(p['ms']) == set(bench.ONNX_PROBE_OPS) for p in result['probes'])
    assert [c['pass'] for c in result['checks']] == [True] * 4


def test_bench_onnx_layer_rejects_groups_that_do_not_divide(capsys):
    import pytest

    with pytest.raises(SystemExit, match="--groups 3 does not divide the stem layer's 8 channels"):
        bench.main(['onnx-layer', '--stem', '8', '16', '--tile', '8', '16', '--groups', '3'])


def test_bench_runtimes_small(tmp_path):
    """bench runtimes: the original's and the converted model's files in onnxruntime, OpenVINO and tract (and
    onnxruntime's custom file), each checked against PyTorch, one row per model, batch and runtime."""
    import subprocess
    import sys
    out = tmp_path / 'runtimes.json'
    # a process of its own, as the command runs: OpenVINO stays out of the test process (see conftest other_runtime)
    done = subprocess.run([sys.executable, '-m', 'dpp_surgery.bench', '--threads', '1', '--json', str(out),
                           'runtimes', '--models', 'resnet10t', '--size', '64', '--batches', '1', '2', '--repeat', '1'],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    result = json.loads(out.read_text())
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


def test_bench_runtimes_table_and_missing_runtime(capsys, monkeypatch):
    import argparse

    import pytest
    from dpp_surgery.export import runtimes
    rows = [{'model': 'a', 'batch': 1, 'runtime': 'onnxruntime', 'flop_ratio': 1.5, 'original': 10.0,
             'decomposed': 14.0, 'custom': 12.0, 'max_error': 1e-6},
            {'model': 'a', 'batch': 1, 'runtime': 'tract', 'flop_ratio': 1.5, 'original': 10.0, 'decomposed': 16.0,
             'max_error': 2e-4}]
    checks = bench._print_runtimes_table(rows, {'onnxruntime': '1', 'tract': '2'},
                                         argparse.Namespace(repeat=3, size=32, threads=2))
    text = capsys.readouterr().out
    assert '| a | 1 | onnxruntime | 10.0 | 14.0 | 12.0 | 1.40x | 1.50 | 1.17x | 1.0e-06 |' in text
    assert '| a | 1 | tract | 10.0 | 16.0 | - | 1.60x | 1.50 | - | 2.0e-04 |' in text
    assert [ok for _, ok in checks] == [True, True, False, False]
    monkeypatch.setitem(runtimes._PACKAGE, 'openvino', 'dpp_surgery_no_such_package')
    with pytest.raises(SystemExit, match='openvino is not installed .*pip install dpp_surgery_no_such_package'):
        bench.main(['runtimes', '--runtimes', 'openvino'])
