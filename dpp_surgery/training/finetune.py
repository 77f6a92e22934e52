"""Fine-tuning of (converted) timm models: ``dpp_surgery.finetune(...)`` and ``dpp-surgery finetune``.

Built on timm's own factories: ``create_optimizer_v2`` (with the DPP parameters free of weight decay),
``create_scheduler_v2``, ``ModelEmaV3``. Mixed precision that follows the hardware (``amp=True`` with
``amp_dtype='auto'``: bfloat16 on a CPU only where it is native, else float32; bfloat16 or float16 with a GradScaler
on GPU; see :mod:`dpp_surgery.precision`), gradient accumulation, label smoothing, seeding, a progress bar, a
JSON-lines metrics log, best and last checkpoints, resume after a kill (``resume=RUN_FOLDER`` continues from its last
checkpoint, also mid-epoch), distillation from the unconverted model, and DistributedDataParallel under ``torchrun``
(gloo on CPU, nccl on GPU).

The model to fine-tune is a timm model name, a dpp_surgery checkpoint or an ``nn.Module``; the options are named as
timm's train.py names the same idea (:class:`FinetuneConfig`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .. import checkpoint as ckpt
from .data import BatchTransform, load_datasets
from ..layers import DPP2d, dpp_parameters, param_groups
from ..surgery import is_converted
from ..utils import atomic_write, first_line, short_repr
from .precision import AMP_CHOICES, AmpChoice, probe_cpu_bf16, resolve_amp

__all__ = ['FinetuneConfig', 'finetune', 'evaluate', 'build_model', 'build_optimizer', 'conversion_kwargs', 'dpp_stats',
           'dpp_trace', 'distill_loss', 'subset', 'upgrade_config', 'amp_mode', 'is_converted', 'RENAMED_FIELDS',
           'AMP_DTYPES', 'PRETRAINED_SOURCES', 'DEFAULT_OUTPUT']

_logger = logging.getLogger(__name__)

STATE_FILE = 'train_state.pt'
LAST_FILE = 'last.safetensors'
BEST_FILE = 'best.safetensors'
METRICS_FILE = 'metrics.jsonl'
TRACE_FILE = 'dpp_trace.jsonl'


# timm's train.py names: FinetuneConfig fields of earlier versions -> their names now. config.json files of earlier
# runs, zoo recipes and keyword arguments with the old names still load (:func:`upgrade_config`).
RENAMED_FIELDS = {'ema': 'model_ema', 'ema_decay': 'model_ema_decay', 'label_smoothing': 'smoothing',
                  'accum_steps': 'grad_accum_steps', 'num_workers': 'workers', 'pretrained_file': 'pretrained_path',
                  'image_size': 'img_size'}
# --amp-dtype choices (timm's names) -> the precision request of dpp_surgery.precision
AMP_DTYPES = {'auto': 'auto', 'float16': 'fp16', 'bfloat16': 'bf16'}
# where --pretrained weights come from (a --pretrained-path file overrides the source)
PRETRAINED_SOURCES = ('auto', 'timm', 'offline')
DEFAULT_OUTPUT = os.path.join('runs', 'finetune')
# the learning rates of the measured runs: the demo (tools/demo.py), experiments fashion-mnist (results/fashion_mnist),
# placement (results/placement, results/placement_resnet18) and dpp-params (results/dpp_params), and the zoo recipes
MEASURED_LR, MEASURED_DPP_LR_SCALE = 0.02, 10.0


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; the ``dpp-surgery finetune`` flags are these fields in kebab-case
    (``data``: ``--data-dir``; also ``-b``, ``-j``), named as timm's train.py names the same idea (``model_ema``,
    ``smoothing``, ``grad_accum_steps``, ``workers``, ``img_size``, ``amp``/``amp_dtype``, ...). :meth:`from_dict`
    also reads the names of earlier versions (:data:`RENAMED_FIELDS`).

    ``model`` is a timm model name, the path of a checkpoint written by :func:`dpp_surgery.save` (or ``convert``,
    ``finetune``), or an ``nn.Module`` (a timm model, converted or not). A model that is already converted keeps
    its conversion; an unconverted one is converted with the policy below when ``convert`` is true.
    """
    model: Any = 'efficientnet_lite0'
    pretrained: bool = True  # start from pretrained weights (a model name only; False: random init)
    pretrained_source: str = 'auto'  # auto | timm | offline; auto = offline for efficientnet_lite0, else timm
    pretrained_path: Optional[str] = None  # a local file of pretrained weights (timm pretrained_cfg_overlay)
    num_classes: Optional[int] = None  # classes of the model's head (None: the data set's)
    convert: bool = True
    placement: Optional[str] = None  # None: the default policy
    operator: Optional[str] = None  # None: the policy's (dpp); 's3dpp', or for comparison 'blur', 'avg', 'max'
    dpp_init: Optional[str] = None  # None: the policy's; 'paper', 'avg', 'max' or 'ALPHA,LAMBDA' for every DPP layer
    dpp_norm: Optional[str] = None  # None: the policy's; 'mean', 'none' or 'sum' for every DPP layer
    data: Optional[str] = None  # None: Debian's Fashion-MNIST
    img_size: int = 64
    input_size: Optional[Tuple[int, int, int]] = None  # (3, N, N); sets img_size N (as timm's --input-size)
    train_subset: int = 0  # 0 = all
    test_subset: int = 0
    epochs: int = 1
    batch_size: int = 32
    grad_accum_steps: int = 1
    opt: str = 'sgd'
    lr: float = MEASURED_LR
    momentum: float = 0.9
    weight_decay: float = 1e-4
    dpp_lr_scale: float = MEASURED_DPP_LR_SCALE
    sched: str = 'cosine'
    warmup_epochs: int = 0
    smoothing: float = 0.1
    amp: bool = True  # mixed precision; amp_dtype 'auto' follows the hardware (dpp_surgery.precision)
    amp_dtype: str = 'auto'  # auto | float16 | bfloat16
    model_ema: bool = False
    model_ema_decay: float = 0.999
    distill: bool = False
    distill_alpha: float = 1.0  # weight of the KL term; 1.0 = labels unused
    distill_temperature: float = 2.0
    seed: int = 0
    subset_seed: int = -1  # the draw of the train/test subsets (-1: seed); fix it to compare seeds on one subset
    output: Optional[str] = None  # None: the --resume folder, else runs/finetune
    resume: Any = None  # a run folder (or its train_state.pt) to continue; True: the output folder
    overwrite: bool = False
    checkpoint_every: int = 0  # also write the last checkpoint every N optimizer steps (0 = once per epoch)
    workers: int = 0
    threads: int = 0  # torch threads (0 = leave as is)
    device: str = 'auto'
    progress: bool = True
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit; for tests)
    dpp_trace_every: int = 0  # every N optimizer steps, DPP values and gradient sizes to dpp_trace.jsonl (0 = off)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> 'FinetuneConfig':
        """The config of a ``config.json`` (this version's or an earlier one's, :func:`upgrade_config`) or of a zoo
        recipe's ``finetune`` section.

        Raises:
            TypeError: a key that is no field, old or new (the message lists the valid ones).
            ValueError: an old value that has no meaning now, or an old and a new name with different values.
        """
        return cls(**_known_fields(upgrade_config(values)))

    def to_dict(self) -> Dict[str, Any]:
        """The fields as JSON values; a model passed as an ``nn.Module`` is recorded as ``'<module CLASS>'``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.model, nn.Module):
            out['model'] = f'<module {type(self.model).__name__}>'
        if out['input_size'] is not None:
            out['input_size'] = list(out['input_size'])
        return out


def amp_mode(amp: bool, amp_dtype: str = 'auto') -> str:
    """The precision request of :func:`dpp_surgery.precision.resolve_amp` (``'none'``, ``'auto'``, ``'bf16'``,
    ``'fp16'``) for timm's pair ``--amp``/``--no-amp`` and ``--amp-dtype``.

    Raises:
        ValueError: an unknown ``amp_dtype``.
    """
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)} (--amp-dtype), but got {amp_dtype!r}")
    return AMP_DTYPES[amp_dtype] if amp else 'none'


_OLD_AMP = {'none': (False, None), 'auto': (True, 'auto'), 'bf16': (True, 'bfloat16'), 'fp16': (True, 'float16')}


def upgrade_config(values: Dict[str, Any]) -> Dict[str, Any]:
    """``values`` (FinetuneConfig fields) with the names and values of earlier versions turned into today's.

    Renamed fields (:data:`RENAMED_FIELDS`: ``ema``, ``ema_decay``, ``label_smoothing``, ``accum_steps``,
    ``num_workers``, ``pretrained_file``, ``image_size``) take their new names; ``pretrained`` as a string
    (``'auto'``, ``'timm'``, ``'offline'``, ``'none'``) becomes the switch ``pretrained`` and ``pretrained_source``;
    ``amp`` as a string (``'auto'``, ``'none'``, ``'bf16'``, ``'fp16'``) becomes ``amp`` and ``amp_dtype``;
    ``resume=False`` becomes None. Other keys pass unchanged (unknown ones are for the caller to refuse).

    Raises:
        ValueError: an old and a new name of one field with different values, or an old value that has no meaning
            now; the message names the field and the values allowed.
    """
    out: Dict[str, Any] = {}
    for key, value in values.items():
        new = RENAMED_FIELDS.get(key, key)
        if new in out and out[new] != value:
            raise ValueError(f'{key} is the old name of {new}, and both are given with different values '
                             f'({out[new]!r} and {value!r}); give {new} only')
        out[new] = value
    pretrained = out.get('pretrained')
    if isinstance(pretrained, str):
        if pretrained not in PRETRAINED_SOURCES + ('none',):
            raise ValueError(f"pretrained must be true or false (the weights' source is pretrained_source: "
                             f"{', '.join(PRETRAINED_SOURCES)}), but got {pretrained!r}")
        out['pretrained'] = pretrained != 'none'
        if pretrained != 'none':
            out.setdefault('pretrained_source', pretrained)
    amp = out.get('amp')
    if isinstance(amp, str):
        if amp not in _OLD_AMP:
            raise ValueError(f"amp must be true or false, with amp_dtype one of {', '.join(AMP_DTYPES)} "
                             f'(--amp/--no-amp, --amp-dtype), but got amp={amp!r}')
        out['amp'], dtype = _OLD_AMP[amp]
        if dtype is not None:
            out.setdefault('amp_dtype', dtype)
    if out.get('resume') is False:
        out['resume'] = None
    return out


def _known_fields(values: Dict[str, Any]) -> Dict[str, Any]:
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    bad = [k for k in values if k not in names]
    if bad:
        raise TypeError(f'unknown finetune option(s) {bad}; valid: {", ".join(sorted(names))} (and the old names '
                        f'{", ".join(sorted(RENAMED_FIELDS))})')
    return values


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




@dataclass
class _Source:
    """Where a run's model comes from: ``kind`` is ``'name'`` (a timm model name), ``'checkpoint'`` (a dpp_surgery
    checkpoint, ``model`` the model it rebuilt) or ``'module'`` (``model`` the caller's module, never changed);
    ``label`` names it in messages."""
    kind: str
    label: str
    model: Optional[nn.Module] = None


_PATH_ENDINGS = ('.safetensors', '.pth', '.pt', '.bin', '.ckpt')
_HUB_PREFIXES = ('hf-hub:', 'hf_hub:', 'local-dir:')


def _check_module(module: Any, what: str) -> None:
    """``module`` can be fine-tuned (``what='model'``) or distilled from (``'teacher'``); a TypeError with the fix
    otherwise."""
    if not isinstance(module, nn.Module):
        raise TypeError(f'{what} must be an nn.Module, but got {type(module).__name__}')
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(f'{what} is wrapped in {type(module).__name__}; pass the model inside it ({what}.module): '
                        'finetune wraps it for DistributedDataParallel itself under torchrun')
    if hasattr(module, '_orig_mod'):
        raise TypeError(f'{what} is a torch.compile wrapper ({type(module).__name__}); pass the model it compiled '
                        f'({what}._orig_mod)')
    if what != 'model':
        return
    if not (hasattr(module, 'reset_classifier') and hasattr(module, 'num_classes')):
        raise TypeError(f'model must be a timm classification model (with num_classes and reset_classifier), but '
                        f'got {type(module).__name__}; create it with timm.create_model or dpp_surgery.create')
    # what save() records to rebuild it: refused here, not after the first epoch
    created = getattr(module, '_dpp_surgery_create', None)  # (checkpoint.record_creation)
    architecture = (getattr(module, 'pretrained_cfg', None) or {}).get('architecture')
    if created is None and not architecture:
        raise TypeError(f'model {type(module).__name__} has no pretrained_cfg architecture, so its checkpoints could '
                        'not be rebuilt; create it with dpp_surgery.create(name, ...) or timm.create_model')
    bad = [k for k in (created[1] if created else {}) if k not in ckpt.MODEL_KWARGS]
    if bad:
        raise TypeError(f'model {type(module).__name__} was created with kwargs {bad} that a checkpoint cannot '
                        f'record (allowed: {", ".join(ckpt.MODEL_KWARGS)}); create it without them')


def _model_source(model: Any) -> _Source:
    """``model`` (a :class:`FinetuneConfig` value) checked and told apart: an ``nn.Module``, an existing checkpoint
    file (loaded here, so that a bad one fails before any work), or a timm model name.

    Raises:
        TypeError: not a name, path or module; a wrapped module; a module that is no timm classification model.
        ValueError: a file that is no dpp_surgery checkpoint, a folder, an unknown name.
        FileNotFoundError: a checkpoint path that does not exist.
    """
    if isinstance(model, nn.Module):
        _check_module(model, 'model')
        return _Source('module', f'<module {type(model).__name__}>', model)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f'model must be a timm model name, a checkpoint path (a .safetensors written by dpp_surgery '
                        f'save, convert or finetune) or an nn.Module, but got {type(model).__name__} '
                        f"{short_repr(model)}; for example model='efficientnet_lite0'")
    import timm

    text = os.fspath(model)
    if text.startswith('<module '):
        raise ValueError(f'model {text!r} stands for an nn.Module that an earlier run was given in Python; pass that '
                         'module again: finetune(model=module, ...)')
    if os.path.isfile(text):
        try:
            loaded = ckpt.load(text)
        except ckpt.CheckpointError as e:
            raise ValueError(f'model {text} is not a checkpoint that dpp_surgery.load can read ({first_line(e)}); pass '
                             'a .safetensors written by dpp_surgery save, convert or finetune, or a timm model '
                             'name') from e
        return _Source('checkpoint', text, loaded)
    if text.startswith(_HUB_PREFIXES) or timm.is_model(text):
        return _Source('name', text)
    if os.path.isdir(text):
        raise ValueError(f'model {text} is a folder; pass a checkpoint in it ({os.path.join(text, BEST_FILE)} or '
                         f'{LAST_FILE}), or --resume {text} to continue that run')
    if os.sep in text or (os.altsep and os.altsep in text) or text.endswith(_PATH_ENDINGS):
        raise FileNotFoundError(f'model checkpoint {text} does not exist; pass an existing .safetensors written by '
                                'dpp_surgery save, convert or finetune, or a timm model name')
    raise ValueError(f'unknown model {text!r}: neither a timm model name (see timm.list_models()) nor an existing '
                     'checkpoint file')


def _needs_teacher(label: str) -> ValueError:
    return ValueError(f'distill=True (--distill) needs the unconverted model as teacher, but {label} is converted '
                      'already; pass teacher=<the unconverted model> (Python), fine-tune without distillation '
                      '(--no-distill), or start from the unconverted model')


def _pretrained_model(cfg: FinetuneConfig) -> nn.Module:
    """The timm model ``cfg.model`` (a name) with the weights ``cfg`` asks for: a ``pretrained_path`` file, the
    offline EfficientNet-Lite0 weights, timm's hub, or none (random init)."""
    name, path = cfg.model, cfg.pretrained_path
    if not cfg.pretrained and not path:
        return ckpt.create(name, pretrained=False)
    from ..models.weights import WEIGHTS_EXTRA_HINT, offline_weights_available

    # auto: the offline weights where they exist and their package (the 'weights' extra) is installed, else the hub
    auto_offline = cfg.pretrained_source == 'auto' and name == 'efficientnet_lite0' and offline_weights_available()
    offline = not path and (cfg.pretrained_source == 'offline' or auto_offline)
    if offline:
        if name != 'efficientnet_lite0':
            _offline_only(name)
        from ..models.weights import create_efficientnet_lite0
        model = create_efficientnet_lite0()
        return ckpt.record_creation(model, 'efficientnet_lite0')
    import timm

    kwargs = {}
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'--pretrained-path {path} does not exist; pass a file of weights for {name}')
        kwargs['pretrained_cfg_overlay'] = dict(file=path)
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        if path:
            raise RuntimeError(f'cannot load {path} into {name}: {e}') from e
        if name == 'efficientnet_lite0':
            raise RuntimeError(f'cannot download pretrained weights for {name} from the Hugging Face hub '
                               f'({type(e).__name__}). Offline, {WEIGHTS_EXTRA_HINT}, or use --pretrained-path PATH '
                               'or --no-pretrained') from e
        raise RuntimeError(
            f'cannot download pretrained weights for {name} from the Hugging Face hub ({type(e).__name__}). '
            'Offline, use --pretrained-path PATH, --no-pretrained, or --model efficientnet_lite0 '
            f'({WEIGHTS_EXTRA_HINT}).') from e
    return ckpt.record_creation(model, name)


def build_model(cfg: FinetuneConfig, num_classes: int, keep_head: bool = False,
                teacher: Optional[nn.Module] = None, source: Optional[_Source] = None):
    """The model to fine-tune and, for distillation, its teacher.

    Args:
        cfg: the run's config; ``cfg.model`` is a timm model name (created with the weights ``cfg`` asks for), the
            path of a dpp_surgery checkpoint, or an ``nn.Module`` (copied: the caller's module is never changed).
        num_classes: the classes of the head the model gets (unless ``keep_head``).
        keep_head: keep the model's own head (label-free distillation, or a model saved as it is).
        teacher: the teacher of a distillation (copied); default: a copy of the model before conversion, which a
            model converted already does not have.
        source: ``cfg.model`` as :func:`finetune` resolved it already (a checkpoint is loaded once).

    Returns:
        ``(model, teacher)``: the model, converted with ``cfg``'s policy if ``cfg.convert`` and it is not converted
        already (a converted model keeps its conversion); the teacher in eval mode, None without ``cfg.distill``.

    Raises:
        ValueError: distillation from a model converted already, without a teacher; see also :func:`_model_source`.
    """
    from ..surgery import convert

    cfg = _normalized(cfg)
    source = source or _model_source(cfg.model)
    if source.kind == 'name':
        model = _pretrained_model(cfg)
    elif source.kind == 'module':
        model = copy.deepcopy(source.model)
    else:
        model = source.model
    converted = is_converted(model)
    if not cfg.distill:
        teacher = None
    elif teacher is not None:
        teacher = copy.deepcopy(teacher).eval()
    elif converted:
        raise _needs_teacher(source.label)
    else:
        teacher = copy.deepcopy(model).eval()
    if not keep_head and model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    if cfg.convert and not converted:
        kwargs = conversion_kwargs(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            convert(model, input_size=(3, cfg.img_size, cfg.img_size), **kwargs)
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
    if cfg.operator is not None:
        kwargs['operator'] = cfg.operator
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
    decay, DPP parameters at ``lr * dpp_lr_scale`` (each group carries its own ``lr``; a model without DPP layers,
    fine-tuned unconverted, has no DPP group to scale)."""
    from timm.optim import create_optimizer_v2

    scale = cfg.dpp_lr_scale if dpp_parameters(model) else 1.0
    groups = param_groups(model, weight_decay=cfg.weight_decay, dpp_lr_scale=scale, lr=cfg.lr)
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
    # the model's source (_check_sources) and the teacher the caller gave
    source: Optional[_Source] = None
    given_teacher: Optional[nn.Module] = None

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


def finetune(cfg: Optional[FinetuneConfig] = None, *, teacher: Optional[nn.Module] = None,
             **kwargs) -> Dict[str, Any]:
    """Fine-tune a timm model, converted with DPP (or converted already); returns the final metrics.

    Args:
        cfg: the run's settings (default :class:`FinetuneConfig`).
        teacher: the model to distil from with ``distill=True``: needed when the model is converted already (a
            converted module or checkpoint), where no unconverted copy is at hand; copied, never changed.
        **kwargs: :class:`FinetuneConfig` fields that replace those of ``cfg`` (the names of earlier versions, such
            as ``image_size`` or ``ema``, too: :func:`upgrade_config`). ``model`` may be a timm model name, a
            checkpoint path or an ``nn.Module`` (copied: the module passed in is never changed; the fine-tuned
            model is in the output folder).

    Writes to ``cfg.output``: ``metrics.jsonl`` (one line per epoch), ``last.safetensors`` and
    ``best.safetensors`` (:func:`dpp_surgery.load` rebuilds them; their metadata records the image size),
    ``train_state.pt`` (optimizer, scheduler, EMA, position, RNG; loaded with ``weights_only=True``) and
    ``config.json``. Everything is checked before the output folder is touched: a run that fails its checks leaves it
    as it was.

    Progress goes to the module's logger (``logging``, info level, rank 0 only: precision, resume, checkpoints, one
    line per epoch; the ``dpp-surgery finetune`` command shows it on stderr) and, with ``cfg.progress``, to a tqdm
    bar per epoch.

    Raises:
        TypeError: an unknown option, or a model or teacher of the wrong kind (the message says what to pass).
        ValueError: an option out of range, a checkpoint that does not load, distillation from a converted model
            without a teacher, ...: the message names the problem and the fix.
        FileNotFoundError: a model path, data folder or ``resume`` folder that does not exist.
        FileExistsError: ``cfg.output`` holds a previous run, and neither ``resume`` nor ``overwrite`` is given.
    """
    cfg = _resolve_config(cfg, kwargs)
    source = _check_sources(cfg, teacher)
    _check_output(cfg)
    resumed = _read_train_state(cfg)
    run = _start(cfg)
    run.source, run.given_teacher = source, teacher
    _prepare_data(run)
    _prepare_model(run)
    _prepare_output(run)
    _prepare_optimizer(run)
    _wrap_distributed(run)
    state = _resume(run, resumed)
    _prepare_precision(run, state)
    metrics = _train_epochs(run)
    return _finish(run, metrics)


def _resolve_config(cfg: Optional[FinetuneConfig], kwargs: Dict[str, Any]) -> FinetuneConfig:
    """``cfg`` (default :class:`FinetuneConfig`) with the fields in ``kwargs`` replaced (old names read as
    :func:`upgrade_config` says), its aliases resolved (:func:`_normalized`), the output and resume folders
    settled, checked."""
    if cfg is None:
        cfg = FinetuneConfig()
    elif not isinstance(cfg, FinetuneConfig):
        raise TypeError(f'cfg must be a FinetuneConfig, but got {type(cfg).__name__}; pass FinetuneConfig(...) or '
                        'the options as keywords: finetune(model=..., epochs=...)')
    cfg = dataclasses.replace(cfg, **_known_fields(upgrade_config(kwargs)))
    cfg = _run_folder(_normalized(cfg))
    _check_config(cfg)
    return cfg


def _normalized(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with the values of earlier versions that a FinetuneConfig built by hand may hold (``pretrained``
    and ``amp`` as strings, ``resume=False``) read as :func:`upgrade_config` reads them, and ``input_size`` (3, N, N)
    turned into ``img_size`` N."""
    old = {k: getattr(cfg, k) for k in ('pretrained', 'amp') if isinstance(getattr(cfg, k), str)}
    changes = upgrade_config(old)
    if cfg.resume is False:
        changes['resume'] = None
    if cfg.input_size is not None:
        size = cfg.input_size
        if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) for v in size)
                and size[0] == 3 and size[1] == size[2] and size[1] >= 1):
            raise ValueError(f'input_size (--input-size C H W) must be 3 N N: the data comes as RGB images resized '
                             f'to a square, but got {short_repr(size)}; use --img-size N')
        changes.update(input_size=tuple(size), img_size=size[1])
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _run_folder(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with its output folder settled: ``resume`` (True: the output folder; a run folder or its
    ``train_state.pt``) becomes the run folder, where the resumed run goes on writing; ``output`` defaults to it,
    else to :data:`DEFAULT_OUTPUT`."""
    resume, output = cfg.resume, cfg.output
    if resume is None or resume == '':
        return dataclasses.replace(cfg, resume=None, output=output or DEFAULT_OUTPUT)
    if resume is True:
        folder = output or DEFAULT_OUTPUT
    elif isinstance(resume, (str, os.PathLike)):
        folder = os.fspath(resume)
        if os.path.isfile(folder):
            if os.path.basename(folder) != STATE_FILE:
                raise ValueError(f'--resume takes a run folder or its {STATE_FILE}, but got {folder}; to start a new '
                                 f'run from a checkpoint pass it as the model (--model {folder})')
            folder = os.path.dirname(folder) or '.'
        elif not os.path.isdir(folder):
            raise FileNotFoundError(f'--resume {folder} does not exist; pass the folder of an earlier finetune run '
                                    f'(it holds {STATE_FILE})')
    else:
        raise TypeError(f'resume must be a run folder (a path) or True (the output folder), but got '
                        f'{type(resume).__name__} {short_repr(resume)}')
    if output and os.path.abspath(output) != os.path.abspath(folder):
        raise ValueError(f'--resume continues the run in {folder}, where it writes, but --output is {output}; drop '
                         f'--output or pass --output {folder}')
    return dataclasses.replace(cfg, resume=folder, output=folder)


def _check_sources(cfg: FinetuneConfig, teacher: Optional[nn.Module]) -> _Source:
    """The model of ``cfg`` resolved (:func:`_model_source`: a checkpoint is loaded here), and what it and the
    ``teacher`` allow checked, before any work."""
    source = _model_source(cfg.model)
    if source.kind != 'name' and cfg.pretrained_path:
        raise ValueError(f'pretrained_path (--pretrained-path) holds weights for a timm model name, but the model is '
                         f'{source.label}, which has its weights; drop pretrained_path')
    if teacher is not None:
        if not cfg.distill:
            raise ValueError('teacher is used by distillation only; pass distill=True as well, or drop teacher')
        _check_module(teacher, 'teacher')
    elif cfg.distill and source.model is not None and is_converted(source.model):
        raise _needs_teacher(source.label)
    return source


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


def _check_output(cfg: FinetuneConfig) -> None:
    """The output folder can take the run: a previous run there is refused unless resumed or overwritten, and a
    resumed run has its training state. Reads only."""
    state_path = os.path.join(cfg.output, STATE_FILE)
    if cfg.resume and not os.path.exists(state_path):
        raise FileNotFoundError(f'--resume: no checkpoint in {cfg.output} ({STATE_FILE} missing); pass the folder '
                                'of a run that saved at least one checkpoint, or start a new run without --resume')
    if os.path.exists(state_path) and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(f'{cfg.output} holds a previous run; pass --resume {cfg.output} to continue it or '
                              '--overwrite to start over')
    if cfg.resume:
        _check_resumed_config(cfg)


# the options that make the training state: the model and its conversion, the data and its order, the optimizer.
# A resumed run must keep them (its train_state.pt holds their state); the others (epochs, max_steps, lr, test
# subset, threads, device, ...) may change.
RESUME_FIXED = ('model', 'pretrained', 'pretrained_source', 'pretrained_path', 'num_classes', 'convert', 'placement',
                'operator',
                'dpp_init', 'dpp_norm', 'data', 'img_size', 'train_subset', 'batch_size', 'grad_accum_steps', 'opt',
                'model_ema', 'distill', 'seed', 'subset_seed')


def _check_resumed_config(cfg: FinetuneConfig) -> None:
    """The resumed run folder's ``config.json`` (that run's options) against ``cfg`` in :data:`RESUME_FIXED`:
    ValueError naming the options that changed and the fix. Reads only."""
    path = os.path.join(cfg.output, 'config.json')
    if not os.path.exists(path):
        return  # (a folder of an earlier version without one: nothing to compare with)
    try:
        with open(path) as f:
            saved = FinetuneConfig.from_dict(json.load(f)).to_dict()
    except Exception as e:  # noqa: BLE001 - invalid JSON, unknown or ill-typed fields
        raise ValueError(f'--resume: {path} cannot be read ({type(e).__name__}: {first_line(e)}); restore it, or '
                         'start a new run without --resume') from e
    now = cfg.to_dict()
    changed = [f'{k} {short_repr(saved[k])} -> {short_repr(now[k])}' for k in RESUME_FIXED if saved[k] != now[k]]
    if changed:
        raise ValueError(f'--resume: the run in {cfg.output} started with other options ({path}): '
                         f'{"; ".join(changed)}; resume with the options of {path}, or start a new run in another '
                         '--output')


def _read_train_state(cfg: FinetuneConfig) -> Optional[dict]:
    """With ``cfg.resume``: the run folder's ``train_state.pt``, read with ``torch.load(weights_only=True)`` and its
    structure checked (the keys and kinds of value :func:`_save_state` writes); ValueError, one line naming the file,
    the problem and the fix, for a truncated, corrupted or foreign file. Reads only. None for a new run."""
    if not cfg.resume:
        return None
    path = os.path.join(cfg.output, STATE_FILE)
    fix = (f'restore {path} from a copy, or start the run over with --overwrite (or a new run in another '
           '--output)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and weights-only errors of every kind
        raise ValueError(f'--resume: {path} cannot be read ({type(e).__name__}: {first_line(e)}): it is truncated, '
                         f'corrupted or no training state of dpp_surgery finetune; {fix}') from e

    def bad(problem: str) -> ValueError:
        return ValueError(f'--resume: {path} is no training state of dpp_surgery finetune: {problem}; {fix}')

    if not isinstance(state, dict):
        raise bad(f'it holds a {type(state).__name__}, not a dict')
    missing = [k for k in _STATE_KINDS if k not in state]
    if missing:
        raise bad(f'it lacks {", ".join(missing)} (it has {short_repr(sorted(map(str, state)))})')
    for key, kinds in _STATE_KINDS.items():
        value = state[key]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise bad(f'{key} is a {type(value).__name__}')
        if key in ('epoch', 'batch', 'global_step') and value < 0:
            raise bad(f'{key} is {value}')
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state['model'].items()):
        raise bad('model is not a dict of named tensors')
    if not (isinstance(state['optimizer'].get('state'), dict) and isinstance(state['optimizer'].get('param_groups'),
                                                                             list)):
        raise bad('optimizer is not an optimizer state_dict (state, param_groups)')
    if not (state['ema'] is None or isinstance(state['ema'], dict)):
        raise bad(f'ema is a {type(state["ema"]).__name__}')
    if state['rng'].dtype != torch.uint8 or state['rng'].dim() != 1:
        raise bad(f'rng is a {state["rng"].dtype} tensor of shape {tuple(state["rng"].shape)}, not a CPU RNG state')
    if not math.isfinite(state['best_acc']):
        raise bad(f'best_acc is {state["best_acc"]}')
    return state


# train_state.pt's keys (_save_state) and the kinds of their values ('ema' and 'amp' checked apart or optional)
_STATE_KINDS = {'model': dict, 'optimizer': dict, 'scheduler': dict, 'epoch': int, 'batch': int, 'global_step': int,
                'best_acc': (int, float), 'rng': torch.Tensor, 'ema': (dict, type(None))}


def _prepare_output(run: _Run) -> None:
    """The output folder (checked by :func:`_check_output`): a new run writes ``config.json`` and starts a new
    metrics log (rank 0; the others wait for it)."""
    cfg, out = run.cfg, run.cfg.output
    if run.is_main:
        os.makedirs(out, exist_ok=True)
        if not cfg.resume:
            with open(os.path.join(out, 'config.json'), 'w') as f:
                json.dump(cfg.to_dict(), f, indent=1)
            for name in (METRICS_FILE, TRACE_FILE):
                if os.path.exists(os.path.join(out, name)):
                    os.unlink(os.path.join(out, name))
    if run.distributed:
        dist.barrier()


def _prepare_data(run: _Run) -> None:
    """Seeds every RNG, then the training and test subsets, their samplers on the ranks of a distributed run (each
    rank a share of the training set, dropping the rest), and the training batches per epoch."""
    cfg = run.cfg
    _seed_everything(cfg.seed)
    data = load_datasets(cfg.data, cfg.img_size)
    draw = cfg.seed if cfg.subset_seed < 0 else cfg.subset_seed
    run.train_set = subset(data.train, cfg.train_subset, draw)
    run.test_set = subset(data.test, cfg.test_subset, draw + 1)
    run.num_classes = data.num_classes
    if cfg.num_classes is not None:
        if cfg.num_classes < data.num_classes:
            raise ValueError(f'num_classes (--num-classes) {cfg.num_classes} is less than the data set\'s '
                             f'{data.num_classes} classes; pass at least {data.num_classes}, or leave it out')
        run.num_classes = cfg.num_classes
    if run.distributed:
        run.sampler = DistributedSampler(run.train_set, num_replicas=run.world, rank=run.rank, shuffle=True,
                                         seed=cfg.seed, drop_last=True)
        run.test_sampler = DistributedSampler(run.test_set, num_replicas=run.world, rank=run.rank, shuffle=False)
    run.per_epoch_batches = (len(run.sampler) if run.sampler else len(run.train_set)) // cfg.batch_size


def _prepare_model(run: _Run) -> None:
    """The model (:func:`build_model`: pretrained or given, converted, with a head for the data set's classes
    unless label-free distillation keeps it) and the teacher on the device, and the batch transform with the model's
    normalisation."""
    cfg = run.cfg
    run.keep_head = cfg.distill and cfg.distill_alpha >= 1.0
    model, teacher = build_model(cfg, run.num_classes, keep_head=run.keep_head, teacher=run.given_teacher,
                                 source=run.source)
    teacher_classes = getattr(teacher, 'num_classes', None)
    if cfg.distill and cfg.distill_alpha < 1.0 and teacher_classes not in (None, run.num_classes):
        raise ValueError(f'--distill with labels needs a data set with the teacher\'s {teacher_classes} classes '
                         f'(this one has {run.num_classes}); use --distill-alpha 1 to heal without labels')
    if run.keep_head and teacher_classes not in (None, model.num_classes):
        raise ValueError(f'label-free distillation (--distill-alpha 1) compares the model\'s {model.num_classes} '
                         f'classes with the teacher\'s, which has {teacher_classes}; give a teacher with the '
                         'model\'s classes')
    model.to(run.device)
    if teacher is not None:
        teacher.to(run.device)
    cfg_pre = getattr(model, 'pretrained_cfg', None) or {}
    run.model, run.teacher = model, teacher
    run.transform = BatchTransform(cfg.img_size, tuple(cfg_pre.get('mean', (0.5,) * 3)),
                                   tuple(cfg_pre.get('std', (0.5,) * 3)))


def _prepare_optimizer(run: _Run) -> None:
    """The optimizer (:func:`build_optimizer`), timm's scheduler stepped once per optimizer step, and the EMA of
    the weights if asked."""
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    cfg = run.cfg
    run.optimizer = build_optimizer(run.model, cfg)
    steps_per_epoch = max(1, run.per_epoch_batches // cfg.grad_accum_steps)
    run.scheduler, _ = create_scheduler_v2(run.optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                           warmup_epochs=cfg.warmup_epochs, updates_per_epoch=steps_per_epoch,
                                           step_on_epochs=False)
    run.ema = ModelEmaV3(run.model, decay=cfg.model_ema_decay) if cfg.model_ema else None


def _wrap_distributed(run: _Run) -> None:
    """The model that trains: wrapped in DistributedDataParallel on the ranks of a distributed run."""
    run.ddp_model = nn.parallel.DistributedDataParallel(run.model) if run.distributed else run.model


def _check_state_fits(run: _Run, state: dict) -> None:
    """The training state (structure checked by :func:`_read_train_state`) fits this run's model, EMA and optimizer:
    the same tensors by name, shape and kind of dtype, no NaN (no inf in DPP parameters), the same parameter groups;
    ValueError, one line naming the file, the problem and the fix. Reads only."""
    path = run.state_path
    fix = (f'resume with the options the run started with ({os.path.join(run.cfg.output, "config.json")}), or '
           f'start the run over with --overwrite')
    parts = [('model', run.model.state_dict())]
    if run.ema is not None and state['ema'] is not None:
        parts.append(('ema', run.ema.module.state_dict()))
    for part, reference in parts:
        saved = state[part]
        missing = [k for k in reference if k not in saved]
        unexpected = [k for k in saved if k not in reference]
        if missing or unexpected:
            raise ValueError(f'--resume: the {part} of {path} is not this run\'s model: {len(missing)} missing keys '
                             f'{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}; {fix}')
        for k, ref in reference.items():
            if tuple(saved[k].shape) != tuple(ref.shape):
                raise ValueError(f'--resume: the {part} of {path} is not this run\'s model: {k} has shape '
                                 f'{tuple(saved[k].shape)}, the model {tuple(ref.shape)}; {fix}')
        try:
            ckpt.check_tensor_values(saved, reference, f'--resume: the {part} of {path}',
                                     'the run diverged or the file was damaged; restart from an earlier copy of the '
                                     'run folder, or start over with --overwrite')
        except ckpt.CheckpointError as e:
            raise ValueError(str(e)) from e
    groups, saved_groups = run.optimizer.state_dict()['param_groups'], state['optimizer']['param_groups']
    if [len(g['params']) for g in groups] != [len(g.get('params', ())) if isinstance(g, dict) else -1
                                              for g in saved_groups]:
        raise ValueError(f'--resume: the optimizer of {path} has parameter groups of '
                         f'{[len(g.get("params", ())) if isinstance(g, dict) else "?" for g in saved_groups]} '
                         f'parameters, this run {[len(g["params"]) for g in groups]}; {fix}')
    for index, values in state['optimizer']['state'].items():
        for name, value in (values.items() if isinstance(values, dict) else ()):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and torch.isnan(value).any():
                raise ValueError(f'--resume: the optimizer of {path} holds NaN in {name} of parameter {index}: the '
                                 'run diverged or the file was damaged; restart from an earlier copy of the run '
                                 'folder, or start over with --overwrite')


def _resume(run: _Run, state: Optional[dict]) -> Optional[dict]:
    """With ``cfg.resume``: the weights, optimizer, scheduler, EMA, position and RNG of the last checkpoint
    (``state``, read by :func:`_read_train_state`) checked against the run (:func:`_check_state_fits`), then
    restored; returns that training state (None for a new run)."""
    if not run.cfg.resume:
        return None
    _check_state_fits(run, state)
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
                        num_workers=cfg.workers)
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
        if (b + 1) % cfg.grad_accum_steps == 0:
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
    loss_for_backward = loss / run.cfg.grad_accum_steps
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
                             shuffle=False, num_workers=cfg.workers)
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
                  metadata={'epoch': epoch + 1, 'test_accuracy': run.best_acc, 'amp': run.precision.to_dict(),
                            'img_size': run.cfg.img_size})


def _save_state(run: _Run, epoch: int, batch: int) -> None:
    """Rank 0: the last checkpoint and the training state that resumes at ``batch`` of ``epoch``."""
    if not run.is_main:
        return
    out = run.cfg.output
    ckpt.save(run.model, os.path.join(out, LAST_FILE), overwrite=True,
              metadata={'epoch': epoch, 'batch': batch, 'global_step': run.global_step,
                        'amp': run.precision.to_dict(), 'img_size': run.cfg.img_size})
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
    mode = amp_mode(cfg.amp, cfg.amp_dtype)
    if mode == 'auto' and state is not None and state.get('amp') in AMP_CHOICES:
        return AmpChoice(state['amp'], 'auto', 'kept from the start of the resumed run')

    def probe() -> Dict[str, float]:
        images = next(iter(DataLoader(train_set, batch_size=cfg.batch_size, shuffle=False)))[0]
        times = probe_cpu_bf16(model, transform(images.to(device)))
        none, bf16 = _reduce([times['none'], times['bf16']], device)
        return {'none': none, 'bf16': bf16}

    return resolve_amp(mode, device, probe=probe if device.type == 'cpu' else None)


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distillation term: the KL divergence from the teacher's softened distribution to the student's, per
    image, times ``temperature ** 2`` (so that its gradients keep their size across temperatures)."""
    T = temperature
    return F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(teacher_logits.float() / T, -1),
                    log_target=True, reduction='batchmean') * T * T


def _loss(cfg: FinetuneConfig, logits, y, teacher, x):
    if teacher is None:
        return F.cross_entropy(logits.float(), y, label_smoothing=cfg.smoothing)
    with torch.no_grad():
        t_logits = teacher(x)
    kl = distill_loss(logits, t_logits, cfg.distill_temperature)
    if cfg.distill_alpha >= 1.0:
        return kl
    ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.smoothing)
    return cfg.distill_alpha * kl + (1 - cfg.distill_alpha) * ce


def _check_config(cfg: FinetuneConfig) -> None:
    """The settings of ``cfg`` that need no file: ranges and choices (the model: :func:`_check_sources`)."""
    for name in ('epochs', 'batch_size', 'grad_accum_steps', 'img_size'):
        if getattr(cfg, name) < 1:
            raise ValueError(f'{name} must be >= 1, but got {getattr(cfg, name)}')
    if cfg.workers < 0:
        raise ValueError(f'workers (-j) must be >= 0 (0 = load in the main process), but got {cfg.workers}')
    if not cfg.lr > 0:
        raise ValueError(f'lr must be > 0, but got {cfg.lr}')
    if not 0 <= cfg.smoothing < 1:
        raise ValueError(f'smoothing must be in [0, 1), but got {cfg.smoothing}')
    if not 0 <= cfg.distill_alpha <= 1:
        raise ValueError(f'distill_alpha must be in [0, 1], but got {cfg.distill_alpha}')
    for name in ('pretrained', 'amp', 'convert', 'model_ema', 'distill'):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f'{name} must be True or False, but got {short_repr(getattr(cfg, name))}')
    amp_mode(cfg.amp, cfg.amp_dtype)  # an unknown amp_dtype fails here
    if cfg.pretrained_source not in PRETRAINED_SOURCES:
        raise ValueError(f"pretrained_source (--pretrained-source) must be one of {', '.join(PRETRAINED_SOURCES)}, "
                         f'but got {cfg.pretrained_source!r}')
    if cfg.num_classes is not None:
        if not (isinstance(cfg.num_classes, int) and cfg.num_classes >= 1):
            raise ValueError(f'num_classes must be a positive integer (or None: the data set\'s), but got '
                             f'{short_repr(cfg.num_classes)}')
        if cfg.distill and cfg.distill_alpha >= 1.0:
            raise ValueError('num_classes does not apply to label-free distillation (--distill-alpha 1), where the '
                             'model keeps its own head; drop num_classes')
    if cfg.dpp_trace_every < 0:
        raise ValueError(f'dpp_trace_every must be >= 0 (0 = off), but got {cfg.dpp_trace_every}')
    if (cfg.pretrained and cfg.pretrained_source == 'offline' and not cfg.pretrained_path
            and isinstance(cfg.model, str) and cfg.model != 'efficientnet_lite0'):
        _offline_only(cfg.model)  # (build_model checks it too, for direct callers)
    if cfg.convert:
        conversion_kwargs(cfg)  # a bad dpp_init or dpp_norm fails here, before any data or weights are loaded


def _offline_only(model: str) -> None:
    raise ValueError(f"--pretrained-source offline has weights for efficientnet_lite0 only, not {model}; use "
                     '--pretrained-source timm (hub) or --pretrained-path FILE')
