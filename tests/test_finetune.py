"""Fine-tuning with real parts: offline ImageNet EfficientNet-Lite0 weights, Debian's Fashion-MNIST, timm's
optimizer/scheduler/EMA, a real SIGKILL and resume, and real 2-process DDP (gloo)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import dpp_surgery
from dpp_surgery import data as data_mod
from dpp_surgery.train import FinetuneConfig, build_model, build_optimizer, finetune

pytestmark = pytest.mark.skipif(not os.path.isdir(data_mod.DEFAULT_DATA),
                                reason='apt-get install dataset-fashion-mnist (CI installs it)')

SMALL = dict(image_size=32, train_subset=64, test_subset=32, batch_size=16, epochs=2, progress=False, threads=2)
CLI_SMALL = ['--image-size', '32', '--test-subset', '32', '--batch-size', '16', '--no-progress', '--amp', 'none',
             '--threads', '1']
ENV = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')


def _metrics(out):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_finetune_writes_metrics_and_checkpoints(tmp_path):
    out = str(tmp_path / 'run')
    metrics = finetune(output=out, ema=True, accum_steps=2, label_smoothing=0.1, **SMALL)
    lines = _metrics(out)
    assert [m['epoch'] for m in lines] == [1, 2]
    for m in lines:
        for key in ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'lr', 'images_per_second'):
            assert m[key] is not None
        assert m['test_count'] == 32 and m['dpp']  # mean alpha/lambda of every DPP layer
        assert all(set(v) == {'alpha', 'lambda'} for v in m['dpp'].values())
    assert lines[-1]['step'] == 2 * (64 // 16) // 2  # accumulation: one step per 2 batches
    assert metrics['best_test_accuracy'] == max(m['test_accuracy'] for m in lines)
    for name in ('best.safetensors', 'last.safetensors'):
        model = dpp_surgery.load(os.path.join(out, name))
        assert model.num_classes == 10 and dpp_surgery.dpp_layers(model)
    with open(os.path.join(out, 'config.json')) as f:
        cfg = json.load(f)
    assert cfg['ema'] is True
    with pytest.raises(FileExistsError, match='--resume.*--overwrite'):
        finetune(output=out, **SMALL)


def test_default_policy_dpp_parameters_learn(tmp_path):
    """Fine-tuning the default conversion moves every DPP layer's alpha and lambda (with init='avg' they would sit
    where their gradients nearly vanish: the reason the default init is the authors')."""
    out = str(tmp_path / 'run')
    finetune(output=out, lr=0.02, dpp_lr_scale=10.0, amp='none', **dict(SMALL, epochs=1, train_subset=96))
    model = dpp_surgery.load(os.path.join(out, 'last.safetensors'))
    layers = dpp_surgery.dpp_layers(model)
    assert len(layers) == 4
    for name, layer in layers:
        assert layer.init == 'paper', name
        # both thetas start at 0; with init='avg' they would move by about 1e-6 in these 6 steps
        moved = max(layer.theta_alpha.abs().max().item(), layer.theta_lambda.abs().max().item())
        assert moved > 1e-4, (name, moved)


def test_dpp_parameters_are_not_weight_decayed():
    cfg = FinetuneConfig(image_size=32, weight_decay=0.05, dpp_lr_scale=3.0)
    model, _ = build_model(cfg, num_classes=10)
    opt = build_optimizer(model, cfg)
    dpp = {id(p) for _, p in dpp_surgery.dpp_parameters(model)}
    assert dpp
    for group in opt.param_groups:
        ids = {id(p) for p in group['params']}
        if ids & dpp:
            assert ids == dpp and group['weight_decay'] == 0.0 and group['lr_scale'] == 3.0


def test_offline_weights_are_imagenet_weights():
    cfg = FinetuneConfig(convert=False)
    model, _ = build_model(cfg, num_classes=1000, keep_head=True)
    from dpp_surgery.photos import load_photo
    x = torch.nn.functional.interpolate(load_photo('chelsea'), size=(224, 224), mode='bilinear', antialias=True)
    with torch.no_grad():
        pred = model.eval()((x - 0.5) / 0.5).argmax(-1).item()
    assert 281 <= pred <= 285  # an ImageNet cat class for scikit-image's cat photo


def test_seeded_runs_repeat(tmp_path):
    a = finetune(output=str(tmp_path / 'a'), amp='none', **dict(SMALL, epochs=1))
    b = finetune(output=str(tmp_path / 'b'), amp='none', **dict(SMALL, epochs=1))
    assert a['test_loss'] == b['test_loss'] and a['train_loss'] == b['train_loss']


def test_distillation_heals_without_labels(tmp_path):
    out = str(tmp_path / 'heal')
    metrics = finetune(output=out, distill=True, distill_alpha=1.0, **dict(SMALL, epochs=1))
    assert metrics['train_accuracy'] is None  # labels unused
    assert metrics['test_metric'] == 'teacher_agreement' and 0 <= metrics['test_accuracy'] <= 1
    model = dpp_surgery.load(os.path.join(out, 'last.safetensors'))
    assert model.num_classes == 1000  # the model keeps its ImageNet head, like its teacher
    assert model.pretrained_cfg['mean'] == (0.5, 0.5, 0.5)  # the offline weights' normalisation survives a reload
    with pytest.raises(ValueError, match='--distill-alpha 1 to heal without labels'):
        finetune(output=str(tmp_path / 'x'), distill=True, distill_alpha=0.5, **SMALL)


def test_bad_options():
    with pytest.raises(TypeError, match="unknown finetune option"):
        finetune(epoch=1)
    with pytest.raises(ValueError, match='batch_size must be >= 1'):
        finetune(batch_size=0)
    with pytest.raises(ValueError, match="amp must be one of"):
        finetune(amp='fp8')


def test_sigkill_mid_epoch_then_resume(tmp_path):
    """Kill the process with SIGKILL after a mid-epoch checkpoint; --resume continues from it and ends where an
    uninterrupted run ends."""
    args = [sys.executable, '-m', 'dpp_surgery', 'finetune', '--train-subset', '320', '--epochs', '2',
            '--checkpoint-every', '3', '--seed', '3'] + CLI_SMALL
    ref_out, out = str(tmp_path / 'ref'), str(tmp_path / 'run')
    subprocess.run(args + ['--output', ref_out], check=True, env=ENV, capture_output=True, timeout=600)

    proc = subprocess.Popen(args + ['--output', out], env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    killed_after = None
    for line in proc.stderr:
        if line.startswith('checkpoint: epoch 0 batch 12 step 12'):
            killed_after = line
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stderr.close()
    assert killed_after is not None and proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, 'metrics.jsonl'))  # killed inside the first epoch

    res = subprocess.run(args + ['--output', out, '--resume'], env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = [l for l in res.stderr.splitlines() if l.startswith('resumed from')]
    assert resumed and 'epoch 0, batch 12, step 12' in resumed[0]
    got, ref = _metrics(out), _metrics(ref_out)
    assert [m['step'] for m in got] == [m['step'] for m in ref] == [20, 40]
    for a, b in zip(got, ref):  # the same data order, weights and optimizer state as without the kill
        assert a['test_loss'] == pytest.approx(b['test_loss'], rel=1e-5)
        assert a['test_accuracy'] == b['test_accuracy']


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        finetune(output=str(tmp_path / 'none'), resume=True, **SMALL)


def test_torchrun_ddp_two_processes(tmp_path):
    out = str(tmp_path / 'ddp')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'dpp_surgery',
           'finetune', '--output', out, '--train-subset', '128', '--epochs', '1'] + CLI_SMALL
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = _metrics(out)
    assert len(lines) == 1  # rank 0 alone writes the log
    m = lines[0]
    assert m['world_size'] == 2 and m['test_count'] == 32  # accuracy reduced over both ranks' halves
    assert m['step'] == 128 // (16 * 2)  # each rank sees half of the data per step
    model = dpp_surgery.load(os.path.join(out, 'last.safetensors'))
    assert dpp_surgery.dpp_layers(model)
    assert sum(1 for line in res.stderr.splitlines() if line.startswith('checkpoint:')) == 1


def test_pretrained_file(tmp_path):
    import timm
    from safetensors.torch import save_file
    source = timm.create_model('resnet18')
    path = str(tmp_path / 'resnet18.safetensors')
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    model, _ = build_model(FinetuneConfig(model='resnet18', pretrained_file=path, convert=False), num_classes=1000,
                           keep_head=True)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        build_model(FinetuneConfig(model='resnet18', pretrained_file=str(tmp_path / 'missing.pth')), num_classes=10)
    with pytest.raises(RuntimeError, match='cannot load .* into resnet34'):
        build_model(FinetuneConfig(model='resnet34', pretrained_file=path), num_classes=10)


def test_offline_weights_check_every_shape():
    import timm
    from dpp_surgery.weights import efficientnet_lite0_state_dict
    with pytest.raises(RuntimeError, match="has shape .* but model tensor"):
        efficientnet_lite0_state_dict(timm.create_model('efficientnet_lite0', num_classes=10))
    with pytest.raises(RuntimeError, match='must be timm.create_model'):
        efficientnet_lite0_state_dict(timm.create_model('efficientnet_lite1'))
