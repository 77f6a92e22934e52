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
