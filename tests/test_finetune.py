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
from dpp_surgery.training import data as data_mod
from dpp_surgery.training import finetune as finetune_module
from dpp_surgery.checkpoint import read_metadata
from dpp_surgery.training.finetune import FinetuneConfig, build_model, build_optimizer, finetune
from groups import check_param_groups

# only the tests that read Fashion-MNIST skip without it; the others (options, optimizer groups, weights) run anyway
needs_data = pytest.mark.skipif(not os.path.isdir(data_mod.DEFAULT_DATA),
                                reason='apt-get install dataset-fashion-mnist (CI installs it)')

SMALL = dict(img_size=32, train_subset=64, test_subset=32, batch_size=16, epochs=2, progress=False, threads=2)
CLI_SMALL = ['--img-size', '32', '--test-subset', '32', '-b', '16', '--no-progress', '--no-amp', '--threads', '1']
ENV = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')


def _metrics(out):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


@needs_data
def test_finetune_writes_metrics_and_checkpoints(tmp_path):
    out = str(tmp_path / 'run')
    metrics = finetune(output=out, model_ema=True, grad_accum_steps=2, smoothing=0.1, **SMALL)
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
    assert cfg['model_ema'] is True and cfg['img_size'] == 32 and cfg['model'] == 'efficientnet_lite0'
    for name in ('best.safetensors', 'last.safetensors'):  # what eval reads
        assert read_metadata(os.path.join(out, name))['extra']['img_size'] == 32
    with pytest.raises(FileExistsError, match='--resume.*--overwrite'):
        finetune(output=out, **SMALL)


@needs_data
def test_default_policy_dpp_parameters_learn(tmp_path):
    """Fine-tuning the default conversion moves every DPP layer's alpha and lambda (with init='avg' they would sit
    where their gradients nearly vanish: the reason the default init is the authors')."""
    out = str(tmp_path / 'run')
    finetune(output=out, lr=0.02, dpp_lr_scale=10.0, amp=False, **dict(SMALL, epochs=1, train_subset=96))
    model = dpp_surgery.load(os.path.join(out, 'last.safetensors'))
    layers = dpp_surgery.dpp_layers(model)
    assert len(layers) == 4
    for name, layer in layers:
        assert layer.init == 'paper', name
        # both thetas start at 0; with init='avg' they would move by about 1e-6 in these 6 steps
        moved = max(layer.theta_alpha.abs().max().item(), layer.theta_lambda.abs().max().item())
        assert moved > 1e-4, (name, moved)


def test_dpp_parameters_are_not_weight_decayed():
    """The optimizer finetune builds, with the scheduler it builds: every parameter of the converted model in exactly
    one group, theta_alpha and theta_lambda of every DPP layer in one group without weight decay at lr * 3."""
    from timm.scheduler import create_scheduler_v2
    cfg = FinetuneConfig(img_size=32, weight_decay=0.05, dpp_lr_scale=3.0, lr=0.02)
    model, _ = build_model(cfg, num_classes=10)
    assert len(dpp_surgery.dpp_layers(model)) == 4
    opt = build_optimizer(model, cfg)
    check_param_groups(model, opt.param_groups, weight_decay=0.05, dpp_lr_scale=3.0, lr=0.02)
    # timm's scheduler starts from each group's own lr (and finds no lr_scale to apply a second time)
    create_scheduler_v2(opt, sched=cfg.sched, num_epochs=1, updates_per_epoch=4, step_on_epochs=False)
    check_param_groups(model, opt.param_groups, weight_decay=0.05, dpp_lr_scale=3.0, lr=0.02)


def test_offline_weights_are_imagenet_weights():
    cfg = FinetuneConfig(convert=False)
    model, _ = build_model(cfg, num_classes=1000, keep_head=True)
    from dpp_surgery.tools.photos import load_photo
    x = torch.nn.functional.interpolate(load_photo('chelsea'), size=(224, 224), mode='bilinear', antialias=True)
    with torch.no_grad():
        pred = model.eval()((x - 0.5) / 0.5).argmax(-1).item()
    assert 281 <= pred <= 285  # an ImageNet cat class for scikit-image's cat photo


@needs_data
def test_seeded_runs_repeat(tmp_path):
    a = finetune(output=str(tmp_path / 'a'), amp=False, **dict(SMALL, epochs=1))
    b = finetune(output=str(tmp_path / 'b'), amp=False, **dict(SMALL, epochs=1))
    assert a['test_loss'] == b['test_loss'] and a['train_loss'] == b['train_loss']


@needs_data
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
    with pytest.raises(ValueError, match="amp_dtype must be one of auto, float16, bfloat16"):
        finetune(amp_dtype='fp8')
    with pytest.raises(ValueError, match="amp must be true or false"):
        finetune(amp='fp8')


@needs_data
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


DDP_RANKS, DDP_SUBSET = 2, 96  # per-rank batch 16 (CLI_SMALL): 3 steps of global batch 32


def _single_process_reference(init, cfg):
    """The DDP run's training redone in this process with batch 2 x 16: the model from ``init`` with its BatchNorm
    frozen as in the workers (see ddp_worker.freeze_batchnorm: with train-mode BatchNorm each rank would normalise
    over its own half-batch, which one process with the global batch does not), the optimizer and scheduler finetune
    builds, and per step the union of the ranks' batches, from DistributedSampler's split of the same permutation.

    DDP averages the ranks' gradients; with the mean loss on each rank and equal batch sizes that is the gradient of
    the mean loss over the union. Returns the final state_dict and the global batches (as subset indices).
    """
    from timm.scheduler import create_scheduler_v2
    from torch.utils.data import DistributedSampler

    from dpp_surgery.training import finetune as train_mod
    from ddp_worker import freeze_batchnorm
    data = data_mod.load_datasets(cfg.data, cfg.img_size)
    train_set = train_mod.subset(data.train, cfg.train_subset, cfg.seed)
    model, _ = build_model(cfg, data.num_classes)
    model.load_state_dict(init)
    freeze_batchnorm(model)
    optimizer = build_optimizer(model, cfg)
    rank_order = []
    for rank in range(DDP_RANKS):
        sampler = DistributedSampler(train_set, num_replicas=DDP_RANKS, rank=rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
        sampler.set_epoch(0)
        rank_order.append(list(sampler))
    steps = len(rank_order[0]) // cfg.batch_size
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, updates_per_epoch=steps, step_on_epochs=False)
    transform = data_mod.BatchTransform(cfg.img_size, model.pretrained_cfg['mean'], model.pretrained_cfg['std'])
    model.train()
    global_batches = []
    for step in range(steps):
        batch = [i for order in rank_order for i in order[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
        global_batches.append(batch)
        images = torch.stack([train_set[i][0] for i in batch])
        labels = torch.stack([train_set[i][1] for i in batch])
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(transform(images)), labels,
                                                 label_smoothing=cfg.smoothing)
        loss.backward()
        optimizer.step()
        scheduler.step_update(num_updates=step + 1)
    return model.state_dict(), global_batches


@needs_data
def test_torchrun_ddp_two_processes(tmp_path):
    """Real 2-process DDP (gloo) through the CLI: the ranks end with the same weights, and those are the weights of
    a single process with the global batch (the union of the ranks' batches)."""
    out, states = str(tmp_path / 'ddp'), str(tmp_path / 'states')
    worker = os.path.join(os.path.dirname(__file__), 'ddp_worker.py')  # finetune, then saves its rank's model
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(DDP_RANKS), worker,
           states, '--output', out, '--train-subset', str(DDP_SUBSET), '--epochs', '1', '--lr', '0.1',
           '--dpp-lr-scale', '10'] + CLI_SMALL  # updates well above float32 rounding, the DPP thetas' too
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = _metrics(out)
    assert len(lines) == 1  # rank 0 alone writes the log
    m = lines[0]
    assert m['world_size'] == 2 and m['test_count'] == 32  # accuracy reduced over both ranks' halves
    steps = DDP_SUBSET // (16 * DDP_RANKS)  # each rank sees half of the data per step
    assert m['step'] == steps == 3
    model = dpp_surgery.load(os.path.join(out, 'last.safetensors'))
    assert dpp_surgery.dpp_layers(model)
    assert sum(1 for line in res.stderr.splitlines() if line.startswith('checkpoint:')) == 1

    ranks = [torch.load(os.path.join(states, f'rank{r}.pt'), weights_only=True) for r in range(DDP_RANKS)]
    init, final = ranks[0]['init'], ranks[0]['final']
    # the ranks stay in step: the whole state_dict equal, bit for bit
    assert set(ranks[1]['final']) == set(final)
    for name, value in final.items():
        assert torch.equal(ranks[1]['final'][name], value), name
    # the saved checkpoint is that model
    assert set(model.state_dict()) == set(final)
    for name, value in model.state_dict().items():
        assert torch.equal(value, final[name]), name

    # a single process with the global batches ends with the same weights
    with open(os.path.join(out, 'config.json')) as f:
        cfg = FinetuneConfig.from_dict(json.load(f))
    ref, global_batches = _single_process_reference(init, cfg)
    assert len(global_batches) == steps and all(len(set(b)) == 2 * 16 for b in global_batches)
    assert sorted(i for b in global_batches for i in b) == list(range(DDP_SUBSET))  # each image once
    params = {name for name, _ in model.named_parameters()}
    assert len([name for name, _ in dpp_surgery.dpp_parameters(model)]) == 8 and len(params) > 100
    ulp = torch.finfo(torch.float32).eps
    for name, value in final.items():
        if not value.is_floating_point():
            assert torch.equal(ref[name], value), name
            continue
        scale = max(value.abs().max().item(), init[name].abs().max().item())
        moved = (value - init[name]).abs().max().item()
        err = (ref[name] - value).abs().max().item()
        # the same update to within 0.5%, give or take a few roundings of the values: a batch of 32 and two of 16
        # add up in different orders, and the steps carry the differences on (up to 0.01% of a parameter's update
        # on AVX-512 CPUs, up to 0.13% on an AVX2-only one); a wrong gradient average is off by tens of percent ...
        tol = 5e-3 * moved + 4 * ulp * scale
        assert err <= tol, (name, err, moved)
        if name in params:  # ... and every parameter, the DPP thetas too, moved by far more than that
            assert moved > 10 * tol, (name, moved, tol)
        else:  # the frozen BatchNorm statistics
            assert moved == 0, name


def test_pretrained_file(tmp_path):
    import timm
    from safetensors.torch import save_file
    source = timm.create_model('resnet18')
    path = str(tmp_path / 'resnet18.safetensors')
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    model, _ = build_model(FinetuneConfig(model='resnet18', pretrained_path=path, convert=False), num_classes=1000,
                           keep_head=True)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        build_model(FinetuneConfig(model='resnet18', pretrained_path=str(tmp_path / 'missing.pth')), num_classes=10)
    with pytest.raises(RuntimeError, match='cannot load .* into resnet34'):
        build_model(FinetuneConfig(model='resnet34', pretrained_path=path), num_classes=10)


def test_offline_weights_check_every_shape():
    import timm
    from dpp_surgery.models.weights import efficientnet_lite0_state_dict
    with pytest.raises(RuntimeError, match="has shape .* but model tensor"):
        efficientnet_lite0_state_dict(timm.create_model('efficientnet_lite0', num_classes=10))
    with pytest.raises(RuntimeError, match='must be timm.create_model'):
        efficientnet_lite0_state_dict(timm.create_model('efficientnet_lite1'))


def test_offline_weights_for_another_model_fail_before_the_data(tmp_path):
    # the model and weights do not fit: said before any data set is looked for (this one does not exist)
    cfg = FinetuneConfig(model='resnet18', pretrained_source='offline', data=str(tmp_path / 'no-data'),
                         output=str(tmp_path / 'run'))
    with pytest.raises(ValueError, match='offline has weights for efficientnet_lite0 only, not resnet18'):
        finetune(cfg)
    assert not (tmp_path / 'run').exists()


# ---------------------------------------------------------------------------------------------------------------
# what finetune takes: a model name, an nn.Module (converted or not) or a checkpoint path

TINY = dict(img_size=32, train_subset=32, test_subset=16, batch_size=16, epochs=1, progress=False, threads=2,
            amp=False)


def _resnet(converted: bool):
    """A random-init resnet10t with a 10-class head, converted (post placement, not the default) or not."""
    import warnings

    import timm
    model = timm.create_model('resnet10t', num_classes=10)
    if converted:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            dpp_surgery.convert(model, input_size=(3, 32, 32), placement='post')
    return model


def _same_state(model, state) -> bool:
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(v, state[k]) for k, v in now.items())


@needs_data
@pytest.mark.parametrize('converted', [True, False], ids=['converted', 'unconverted'])
def test_finetune_takes_a_module(tmp_path, converted):
    """A converted module keeps its conversion (not converted a second time); an unconverted one is converted with
    the config's policy. The module passed in is left as it was, and config.json names it."""
    model = _resnet(converted)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = len(dpp_surgery.dpp_layers(model))
    out = tmp_path / 'run'
    finetune(model=model, output=str(out), **TINY)
    tuned = dpp_surgery.load(str(out / 'last.safetensors'))
    conversions = read_metadata(str(out / 'last.safetensors'))['conversions']
    assert len(conversions) == 1  # one conversion: the module's own, or the one finetune made
    assert conversions[0]['policy'].get('placement', 'block') == ('post' if converted else 'block')
    default = _resnet(False)
    dpp_surgery.convert(default, input_size=(3, 32, 32))
    assert len(dpp_surgery.dpp_layers(tuned)) == (n if converted else len(dpp_surgery.dpp_layers(default)))
    assert len(dpp_surgery.dpp_layers(model)) == n and _same_state(model, before)  # the caller's module untouched
    assert json.loads((out / 'config.json').read_text())['model'] == '<module ResNet>'


@needs_data
def test_finetune_takes_a_checkpoint_and_resumes_it(tmp_path):
    path = str(tmp_path / 'converted.safetensors')
    dpp_surgery.save(_resnet(True), path)
    n = len(dpp_surgery.dpp_layers(dpp_surgery.load(path)))
    out = str(tmp_path / 'run')
    finetune(model=path, output=out, **TINY)
    with open(os.path.join(out, 'config.json')) as f:
        assert json.load(f)['model'] == path
    finetune(model=path, resume=out, **dict(TINY, epochs=2))  # timm's --resume: the run folder
    assert [m['epoch'] for m in _metrics(out)] == [1, 2]
    assert len(dpp_surgery.dpp_layers(dpp_surgery.load(os.path.join(out, 'last.safetensors')))) == n
    assert len(read_metadata(os.path.join(out, 'last.safetensors'))['conversions']) == 1
    with pytest.raises(ValueError, match='--resume continues the run in .* drop --output'):
        finetune(model=path, resume=out, output=str(tmp_path / 'other'), **TINY)


def test_distillation_from_a_converted_model_needs_a_teacher(tmp_path):
    model = _resnet(True)
    path = str(tmp_path / 'converted.safetensors')
    dpp_surgery.save(model, path)
    out = tmp_path / 'run'
    for given in (model, path):
        with pytest.raises(ValueError, match=r'is converted already; pass teacher=.*\(--no-distill\)'):
            finetune(model=given, distill=True, output=str(out))
    with pytest.raises(ValueError, match='teacher is used by distillation only; pass distill=True'):
        finetune(model=model, teacher=_resnet(False), output=str(out))
    with pytest.raises(TypeError, match=r'teacher is wrapped in DataParallel; pass the model inside it'):
        finetune(model=model, teacher=torch.nn.DataParallel(_resnet(False)), distill=True, output=str(out))
    assert not out.exists()


@needs_data
def test_distillation_with_a_teacher(tmp_path):
    teacher = _resnet(False)
    student = _resnet(True)
    metrics = finetune(model=student, teacher=teacher, distill=True, output=str(tmp_path / 'run'), **TINY)
    assert metrics['test_metric'] == 'teacher_agreement' and metrics['train_accuracy'] is None


@pytest.mark.parametrize('make, error, message', [
    (lambda p: 42, TypeError, r'model must be a timm model name, a checkpoint path .* or an nn.Module, but got int '
                              r"42; for example model='efficientnet_lite0'"),
    (lambda p: torch.nn.DataParallel(_resnet(False)), TypeError, r'pass the model inside it \(model.module\)'),
    (lambda p: torch.nn.Linear(2, 2), TypeError, 'must be a timm classification model .* timm.create_model'),
    (lambda p: str(p / 'missing.safetensors'), FileNotFoundError, 'missing.safetensors does not exist; pass an '
                                                                  'existing .safetensors'),
    (lambda p: (p / 'bad.safetensors').write_bytes(b'not safetensors') and str(p / 'bad.safetensors'), ValueError,
     'is not a checkpoint that dpp_surgery.load can read .* pass a .safetensors written by dpp_surgery'),
    (lambda p: str(p), ValueError, 'is a folder; pass a checkpoint in it'),
    (lambda p: 'no_such_model', ValueError, "unknown model 'no_such_model'"),
    (lambda p: '<module ResNet>', ValueError, 'pass that module again'),
], ids=['int', 'data-parallel', 'not-timm', 'missing', 'corrupt', 'folder', 'unknown-name', 'module-record'])
def test_wrong_model_kinds_fail_with_the_fix_before_any_work(tmp_path, make, error, message):
    given = make(tmp_path)
    with pytest.raises(error, match=message):
        finetune(model=given, output=str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()


# config.json of a run before the flags took timm's names (every field, as that version wrote it)
OLD_CONFIG = {
    'model': 'efficientnet_lite0', 'pretrained': 'offline', 'pretrained_file': None, 'convert': True,
    'placement': None, 'dpp_init': None, 'dpp_norm': None, 'data': None, 'image_size': 48, 'train_subset': 64,
    'test_subset': 32, 'epochs': 1, 'batch_size': 16, 'accum_steps': 2, 'opt': 'sgd', 'lr': 0.01, 'momentum': 0.9,
    'weight_decay': 0.0001, 'dpp_lr_scale': 1.0, 'sched': 'cosine', 'warmup_epochs': 0, 'label_smoothing': 0.2,
    'amp': 'bf16', 'ema': True, 'ema_decay': 0.99, 'distill': False, 'distill_alpha': 1.0,
    'distill_temperature': 2.0, 'seed': 0, 'subset_seed': -1, 'output': 'runs/old', 'resume': False,
    'overwrite': False, 'checkpoint_every': 0, 'num_workers': 1, 'threads': 0, 'device': 'auto', 'progress': True,
    'max_steps': 0, 'dpp_trace_every': 0}


def test_old_config_json_loads_with_todays_names():
    from dpp_surgery.training.finetune import upgrade_config
    cfg = FinetuneConfig.from_dict(OLD_CONFIG)
    assert (cfg.img_size, cfg.grad_accum_steps, cfg.smoothing, cfg.workers) == (48, 2, 0.2, 1)
    assert cfg.model_ema is True and cfg.model_ema_decay == 0.99 and cfg.pretrained_path is None
    assert cfg.pretrained is True and cfg.pretrained_source == 'offline' and cfg.resume is None
    assert cfg.amp is True and cfg.amp_dtype == 'bfloat16'
    assert (cfg.lr, cfg.dpp_lr_scale) == (0.01, 1.0)  # the run's own values, not today's defaults
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    assert upgrade_config({'pretrained': 'none', 'amp': 'none'}) == {'pretrained': False, 'amp': False}
    assert upgrade_config({'amp': 'fp16', 'pretrained': 'timm'}) == {
        'amp': True, 'amp_dtype': 'float16', 'pretrained': True, 'pretrained_source': 'timm'}
    with pytest.raises(ValueError, match='image_size is the old name of img_size, and both are given'):
        upgrade_config({'img_size': 64, 'image_size': 32})
    with pytest.raises(TypeError, match=r"unknown finetune option\(s\) \['foo'\]"):
        FinetuneConfig.from_dict({'foo': 1})
    # the keyword arguments of earlier versions still work
    resolved = finetune_module._resolve_config(None, dict(image_size=40, ema=True, pretrained='none', amp='none'))
    assert (resolved.img_size, resolved.model_ema, resolved.pretrained, resolved.amp) == (40, True, False, False)
    assert finetune_module._resolve_config(FinetuneConfig(input_size=(3, 24, 24)), {}).img_size == 24
    with pytest.raises(ValueError, match='input_size .* must be 3 N N'):
        finetune_module._resolve_config(None, dict(input_size=(3, 24, 32)))
