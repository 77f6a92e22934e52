"""Mixed precision follows the hardware: amp='auto' picks bfloat16 on a CPU only where it is native."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from dpp_surgery import data as data_mod
from dpp_surgery import precision
from dpp_surgery.precision import PrecisionWarning, cpu_bf16_native, resolve_amp

needs_data = pytest.mark.skipif(not os.path.isdir(data_mod.DEFAULT_DATA),
                                reason='apt-get install dataset-fashion-mnist (CI installs it)')


def _fake_cpu(monkeypatch, onednn: bool, flags):
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: onednn)
    monkeypatch.setattr(precision, '_cpu_flags', lambda: flags)
    monkeypatch.setattr(precision.platform, 'machine', lambda: 'x86_64')


@pytest.mark.parametrize('onednn, flags, native', [
    (False, {'avx2', 'fma'}, False),  # an AVX2-only CPU: oneDNN itself says no
    (False, {'avx512f', 'avx512_bf16'}, False),  # ONEDNN_MAX_CPU_ISA below bf16: oneDNN says no
    (True, {'avx512f', 'avx512bw', 'avx512vl', 'avx512dq'}, False),  # AVX-512 without BF16: oneDNN emulates it
    (True, {'avx512f', 'avx512_bf16'}, True),
    (True, {'avx512f', 'amx_bf16', 'amx_tile'}, True),
    (True, None, True),  # flags unreadable (not Linux): oneDNN's word
])
def test_cpu_bf16_native_needs_onednn_and_a_bf16_instruction_set(monkeypatch, onednn, flags, native):
    _fake_cpu(monkeypatch, onednn, flags)
    got, reason = cpu_bf16_native()
    assert got is native and reason
    choice = resolve_amp('auto', 'cpu')
    assert choice.amp == ('bf16' if native else 'none')
    assert choice.dtype == (torch.bfloat16 if native else None) and not choice.grad_scaler
    assert choice.description.startswith('bfloat16 autocast' if native else 'float32')
    assert reason in choice.description


def test_explicit_bf16_on_a_cpu_without_it_runs_with_a_warning(monkeypatch):
    _fake_cpu(monkeypatch, False, {'avx2'})
    with pytest.warns(PrecisionWarning, match=r'no native bfloat16.*emulated.*slower than float32.*--amp auto'):
        choice = resolve_amp('bf16', 'cpu')
    assert choice.amp == 'bf16' and choice.dtype == torch.bfloat16 and 'emulated' in choice.description
    _fake_cpu(monkeypatch, True, {'avx512_bf16'})
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert resolve_amp('bf16', 'cpu').amp == 'bf16'
    assert resolve_amp('none', 'cpu').dtype is None


def test_bad_amp_choices():
    with pytest.raises(ValueError, match="amp 'fp16' needs a GPU"):
        resolve_amp('fp16', 'cpu')
    with pytest.raises(ValueError, match="amp must be one of 'auto', 'none', 'bf16', 'fp16', but got 'fp8'"):
        resolve_amp('fp8', 'cpu')


@pytest.mark.parametrize('bf16, expected', [(True, 'bf16'), (False, 'fp16')])
def test_gpu_auto_is_bf16_where_supported_else_fp16_with_a_scaler(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: bf16)
    choice = resolve_amp('auto', 'cuda')
    assert choice.amp == expected and choice.grad_scaler == (expected == 'fp16')


def test_this_cpu_and_an_emulated_avx2_cpu():
    """On the CPU the tests run on, and on the same CPU with oneDNN limited to AVX2 (as on a CPU without AVX-512):
    auto is float32 there whatever this CPU has."""
    code = ('import json, torch; from dpp_surgery.precision import resolve_amp, cpu_description; '
            'print(json.dumps([resolve_amp("auto", "cpu").amp, cpu_description(), '
            'bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())]))')
    here = json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                                     check=True).stdout)
    assert here[0] == ('bf16' if cpu_bf16_native()[0] else 'none')
    assert ('no native bfloat16' in here[1]) == (here[0] == 'none')
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA='AVX2')
    limited = json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                                        check=True).stdout)
    assert limited[2] is False and limited[0] == 'none' and 'no native bfloat16' in limited[1]


@needs_data
def test_finetune_prints_and_records_the_precision(tmp_path, capsys):
    from dpp_surgery.checkpoint import read_metadata
    from dpp_surgery.train import finetune

    expected = resolve_amp('auto', 'cpu')
    out = str(tmp_path / 'run')
    metrics = finetune(output=out, image_size=32, train_subset=32, test_subset=16, batch_size=16, epochs=1,
                       progress=False, threads=2, max_steps=1)
    assert f'precision: {expected.description}' in capsys.readouterr().err
    assert metrics['amp'] == expected.amp and metrics['precision'] == expected.description
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        line = json.loads(f.readline())
    assert line['amp'] == expected.amp and line['precision'] == expected.description
    for name in ('last.safetensors', 'best.safetensors'):
        assert read_metadata(os.path.join(out, name))['extra']['amp'] == expected.to_dict()
