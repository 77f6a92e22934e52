"""make gpu-check-dry: the GPU check script on the CPU (Triton's interpreter, tiny shapes, aot_eager), so that the
script cannot rot between GPU runs."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    pytest.importorskip('triton')
    out = tmp_path / 'out'
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET='1')
    res = subprocess.run([sys.executable, '-m', 'dpp_surgery.tools.gpu_check', '--dry', '--output', str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    record = json.loads((out / 'gpu_check.json').read_text())
    assert record['dry'] and record['failed'] == []
    sections = record['sections']
    assert list(sections) == ['versions', 'parity', 'compile', 'autocast', 'determinism', 'bench', 'triton_report']
    for name, entry in sections.items():
        assert entry['status'] in ('ok', 'skipped') and entry['seconds'] >= 0, (name, entry)
        if entry['status'] == 'skipped':
            assert entry['reason'], name
    assert sections['versions']['result']['torch']
    log = (out / 'gpu_check.log').read_text()
    assert 'GPU check (dry run on the CPU)' in log and '== parity' in log
    if sections['compile']['status'] == 'ok':
        assert sections['compile']['result']['breaks'] == 0
