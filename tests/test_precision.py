"""Mixed precision follows the hardware: amp='auto' picks bfloat16 on a CPU only where it is native."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from dpp_surgery.training import data as data_mod
from dpp_surgery.training import precision
from dpp_surgery.training.precision import PrecisionWarning, cpu_bf16_native, resolve_amp

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
    with pytest.warns(PrecisionWarning,
                      match=r'no native bfloat16.*emulated.*slower than float32.*--amp-dtype auto or --no-amp'):
        choice = resolve_amp('bf16', 'cpu')
    assert choice.amp == 'bf16' and choice.dtype == torch.bfloat16 and 'emulated' in choice.description
    _fake_cpu(monkeypatch, True, {'avx512_bf16'})
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert resolve_amp('bf16', 'cpu').amp == 'bf16'
    assert resolve_amp('none', 'cpu').dtype is None


def test_bad_amp_choices():
    with pytest.raises(ValueError, match=r'float16 autocast \(--amp-dtype float16\) needs a GPU'):
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
    code = ('import json, torch; from dpp_surgery.training.precision import resolve_amp, cpu_description; '
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


@pytest.mark.parametrize('times, expected', [
    ({'none': 300.0, 'bf16': 200.0}, 'bf16'),
    ({'none': 200.0, 'bf16': 300.0}, 'none'),  # native but slower for this model (strided depthwise convs)
    ({'none': 200.0, 'bf16': 195.0}, 'none'),  # within the margin: not worth the precision
])
def test_auto_on_a_native_cpu_follows_the_probe(monkeypatch, times, expected):
    _fake_cpu(monkeypatch, True, {'avx512_bf16'})
    calls = []
    choice = resolve_amp('auto', 'cpu', probe=lambda: calls.append(1) or times)
    assert calls == [1] and choice.amp == expected
    assert f"{times['bf16']:.0f} ms in bfloat16" in choice.reason
    # no probe where bfloat16 is not native, and never for an explicit choice
    _fake_cpu(monkeypatch, False, {'avx2'})
    assert resolve_amp('auto', 'cpu', probe=lambda: pytest.fail('probed')).amp == 'none'
    assert resolve_amp('none', 'cpu', probe=lambda: pytest.fail('probed')).amp == 'none'


def test_probe_leaves_model_and_rng_alone():
    import timm

    model = timm.create_model('resnet10t', num_classes=5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    rng = torch.get_rng_state()
    times = precision.probe_cpu_bf16(model, x, steps=1)
    assert set(times) == {'none', 'bf16'} and all(t > 0 for t in times.values())
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    assert all(p.grad is None for p in model.parameters())


def _lines(out):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


@needs_data
def test_finetune_logs_and_records_the_precision(tmp_path, caplog):
    import logging

    from dpp_surgery.checkpoint import read_metadata
    from dpp_surgery.training.finetune import finetune

    out = str(tmp_path / 'run')
    small = dict(image_size=32, train_subset=32, test_subset=16, batch_size=16, progress=False, threads=2)
    caplog.set_level(logging.INFO, logger='dpp_surgery.training.finetune')  # the CLI shows these lines on stderr
    metrics = finetune(output=out, epochs=2, max_steps=1, **small)
    assert f"precision: {metrics['precision']}" in caplog.messages
    # bfloat16 only where the CPU has it natively; then the probe measured it (its times are in the reason)
    assert metrics['amp'] in (('bf16', 'none') if cpu_bf16_native()[0] else ('none',))
    if cpu_bf16_native()[0]:
        assert 'a probed training step took' in metrics['precision']
    assert _lines(out)[-1]['amp'] == metrics['amp'] and _lines(out)[-1]['precision'] == metrics['precision']
    for name in ('last.safetensors', 'best.safetensors'):
        assert read_metadata(os.path.join(out, name))['extra']['amp']['amp'] == metrics['amp']
    assert torch.load(os.path.join(out, 'train_state.pt'), weights_only=True)['amp'] == metrics['amp']
    # a resumed run keeps the precision it started with, without probing again
    resumed = finetune(output=out, epochs=2, resume=True, **small)
    assert resumed['amp'] == metrics['amp'] and 'kept from the start of the resumed run' in resumed['precision']


@needs_data
def test_finetune_auto_is_float32_without_native_bf16(tmp_path, monkeypatch):
    from dpp_surgery.training.finetune import finetune

    _fake_cpu(monkeypatch, False, {'avx2'})
    metrics = finetune(output=str(tmp_path / 'run'), image_size=32, train_subset=32, test_subset=16, batch_size=16,
                       epochs=1, max_steps=1, progress=False, threads=2)
    assert metrics['amp'] == 'none' and metrics['precision'].startswith('float32 (amp=auto: oneDNN reports no bf')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        metrics = finetune(output=str(tmp_path / 'bf16'), amp='bf16', image_size=32, train_subset=32, test_subset=16,
                           batch_size=16, epochs=1, max_steps=1, progress=False, threads=1)
    assert metrics['amp'] == 'bf16' and any(issubclass(w.category, PrecisionWarning) for w in caught)
