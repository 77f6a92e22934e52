"""``bench train`` and ``bench triton-report`` as records: the benchmark returns data, main prints the rendering of
the record it writes, and the renderers read nothing but the record."""
import json

from dpp_surgery.tools.bench import render
from dpp_surgery.tools.bench.triton_report import render_triton_report


def test_bench_train_prints_the_rendering_of_its_record(tmp_path, capsys):
    from dpp_surgery.tools import bench
    path = tmp_path / 'train.json'
    assert bench.main(['--record', str(path), 'train', '--models', 'resnet18', '--img-size', '32', '-b', '2',
                       '--repeat', '1', '--no-amp']) == 0
    out = capsys.readouterr().out
    record = json.loads(path.read_text())
    assert render(record) in out
    assert record['benchmark'] == 'train' and record['meta']['command'].startswith('python -m dpp_surgery.bench ')
    assert record['meta']['date'] and record['machine'] and f"Measured on: {record['machine']}." in out
    assert record['settings']['amp'] == ['none'] and record['settings']['batch'] == 2  # args.amp: JSON-able
    (row,) = record['rows']
    assert (row['model'], row['amp'], row['original_precision']) == ('resnet18', 'none', 'none')
    assert row['original_ms'] > 0 and row['flop_ratio'] > 1
    assert (f"| resnet18 | none | float32 | {row['original_ms']:.0f} | {row['original_img_s']:.0f} | float32 | "
            f"{row['converted_ms']:.0f} |") in out
    assert f"FLOP ratio {row['flop_ratio']:.2f}" in record['checks'][0]['check']
    assert 'batch 2, 32 px, 2 threads, cpu,' in out


_ROW = {'kernel': 'forward', 'geometry': '2x2s2', 'name': 'forward lite-sym-mean 2x2s2 float32 nchw', 'arch': 'sm_90',
        'registers': 40, 'stack': 0, 'shared': 0, 'block': [256, 1], 'warps': 4, 'occupancy': 0.75,
        'blocks_per_sm': 12, 'limiter': 'registers'}


def test_render_triton_report_from_a_record():
    record = {'benchmark': 'triton-report', 'settings': {'arch': [90, 80]}, 'triton': '9.9.9',
              'specializations': 1, 'archs': [90, 80], 'channels': 256, 'machine': 'a test machine',
              'rows': [_ROW, dict(_ROW, arch='sm_80', stack=16)],
              'missed': ['forward ... sm_80: spills (16 stack bytes)'],
              'seconds': 1.5, 'checks': [{'check': 'no register spill: 1 of 2 compiled kernels spill', 'pass': False}]}
    text = render(json.loads(json.dumps(record)))
    assert text.startswith('Triton 9.9.9: 1 kernel specializations x sm_90, sm_80 (256 channels')
    assert 'Measured on: a test machine' in text
    assert '| forward lite-sym-mean 2x2s2 float32 nchw | sm_80 | 40 | 16 | 0 | 256 x 1 | 4 | 75% | registers |' in text
    assert '- missed: forward ... sm_80: spills (16 stack bytes)' in text
    assert '- MISS: no register spill: 1 of 2 compiled kernels spill' in text and text.endswith('(1.5 s)')
    assert render_triton_report({'benchmark': 'triton-report', 'skipped': 'no ptxas'}) == \
        'triton-report: skipped: no ptxas'
