"""What converting buys and what it costs: ``python -m dpp_surgery.experiments {placement,heal,dpp-params}``.

* ``placement``: ImageNet EfficientNet-Lite0 (offline weights) fine-tuned on one fixed Fashion-MNIST subset with one
  budget, unconverted and converted with each placement (``block``, ``post``, ``pre``; ``pre`` is the FLOP-neutral
  policy: DPP first, then the conv at stride 1 on the smaller map), for every seed. Writes ``placement.md`` (test
  accuracy mean, std and per seed, GFLOPs, parameters, latency in PyTorch and onnxruntime, each policy paired by seed
  with the original, and the policy the numbers recommend per FLOP budget) and ``placement.json``; the DPP runs also
  trace their alpha, lambda and gradient sizes (:func:`dpp_surgery.training.finetune.dpp_trace`). ``--model
  resnet18`` runs the same grid with ResNet-18 trained from scratch.
* ``heal``: how fast a converted pretrained model comes back to its original's function under label-free
  distillation from the original, per placement: top-1 agreement and logit cosine with the original on views of real
  photos never used for healing, after 0, 100, 300 and 1000 steps. Heals on unlabeled images available offline
  (Fashion-MNIST and random crops of the other shipped photos). Writes ``heal.md``, ``heal.json`` and ``heal.png``.
* ``dpp-params``: why DPP's alpha and lambda move little in a fine-tune and what the natural remedies do: the
  placement budget with the block policy, per remedy (DPP learning-rate scale, init, norm) and seed; writes the
  accuracy, how far each layer's alpha and lambda moved, and the gradient of the DPP parameters against the rest
  (``dpp_params.md``, ``dpp_params.json``); a remedy that makes training diverge is reported as such.

Every results file is written atomically, and an existing one only with ``--overwrite``; the runs of one command go
one after the other (on 2 cores, one torch process at a time).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

from ..utils import atomic_write, write_text
from .records import add_img_size, precision_counts, refuse_overwrite

__all__ = ['PLACEMENT_POLICIES', 'HEAL_PHOTOS', 'EVAL_PHOTOS', 'placement', 'placement_table', 'recommendations',
           'heal', 'heal_table', 'dpp_params', 'dpp_params_table', 'PLACEMENT_MODELS', 'add_parsers']

PLACEMENT_FILES = ('placement.md', 'placement.json')
HEAL_FILES = ('heal.md', 'heal.json', 'heal.png')
DPP_PARAMS_FILES = ('dpp_params.md', 'dpp_params.json')
# policy name -> the placement convert() gets (None: the model is not converted)
PLACEMENT_POLICIES: Dict[str, Optional[str]] = {'original': None, 'block': 'block', 'post': 'post', 'pre': 'pre'}
# the models the placement experiment runs: name -> (finetune's --pretrained, how the table describes the start,
# the default output folder)
PLACEMENT_MODELS: Dict[str, Tuple[str, str, str]] = {
    'efficientnet_lite0': ('offline', 'ImageNet EfficientNet-Lite0 (offline weights), fine-tuned', 'results/placement'),
    'resnet18': ('none', 'ResNet-18 from scratch (random init), trained', 'results/placement_resnet18'),
}
# the FLOP ratio (converted / original) up to which a policy counts as FLOP-neutral
FLOP_NEUTRAL = 1.05
# the FLOP budgets the recommendation is given for (ratio to the original; inf = no limit)
FLOP_BUDGETS = (FLOP_NEUTRAL, 1.25, math.inf)
# photos that only ever serve as healing images, and those whose views measure agreement (never healed on)
HEAL_PHOTOS = ('brick', 'grass', 'gravel', 'moon', 'hubble_deep_field', 'immunohistochemistry', 'coins')
EVAL_PHOTOS = ('china.jpg', 'flower.jpg', 'astronaut', 'chelsea', 'coffee', 'rocket', 'camera', 'clock')
HEAL_STEPS = (0, 100, 300, 1000)
# remedy name -> the FinetuneConfig fields it changes from the placement experiment's DPP budget
DPP_REMEDIES: Dict[str, Dict[str, Any]] = {
    'lr-x10': {},  # the placement experiment's budget: DPP parameters at 10x the learning rate
    'lr-x1': {'dpp_lr_scale': 1.0},
    'lr-x100': {'dpp_lr_scale': 100.0},
    'lr-x300': {'dpp_lr_scale': 300.0},
    'lr-x1000': {'dpp_lr_scale': 1000.0},
    'init-1-3': {'dpp_init': '1,3'},  # alpha = 1, lambda = 3: a stronger reward of detail from the start
    'norm-none': {'dpp_norm': 'none'},
}
DEFAULT_REMEDIES = ('lr-x10', 'lr-x100', 'lr-x300', 'lr-x1000', 'init-1-3', 'norm-none')


def _check_common(args) -> None:
    """The arguments every study shares: positive counts, distinct seeds; stops before any work."""
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError('--seeds must not repeat a value')
    for name in ('threads', 'batch_size'):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f'--lr must be > 0, but got {args.lr}')


def _load() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, 'getloadavg') else None


def _command(args) -> str:
    return 'python -m dpp_surgery.experiments ' + shlex.join(args.argv)


def _record(args, **fields) -> Dict[str, Any]:
    from ..timing import machine_description

    return {'command': _command(args), 'machine': machine_description(),
            'args': {k: v for k, v in vars(args).items() if k not in ('func', 'argv')}, **fields}


def _write_record(args, record: Dict[str, Any], stem: str, table: str) -> None:
    write_text(os.path.join(args.output, f'{stem}.json'), json.dumps(record, indent=1) + '\n',
               overwrite=args.overwrite)
    write_text(os.path.join(args.output, f'{stem}.md'), table + '\n', overwrite=args.overwrite)
    print(table)


# ---------------------------------------------------------------------------------------------------------------
# placement

def _finetune_config(args, seed: int, output: str, **changes):
    from ..training.finetune import FinetuneConfig

    source = PLACEMENT_MODELS[args.model][0]
    fields = dict(model=args.model, pretrained=source != 'none', pretrained_source=source if source != 'none' else
                  'auto', img_size=args.image_size, train_subset=args.train_subset, test_subset=args.test_subset,
                  subset_seed=args.subset_seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  dpp_lr_scale=args.dpp_lr_scale, seed=seed, output=output, overwrite=True,
                  progress=not args.no_progress, threads=args.threads, dpp_trace_every=args.trace_every,
                  amp=args.amp != 'none', amp_dtype=AMP_DTYPE_OF.get(args.amp, 'auto'))
    fields.update(changes)
    return FinetuneConfig(**fields)


# a precision request (dpp_surgery.precision) -> timm's --amp-dtype that asks for it
AMP_DTYPE_OF = {'auto': 'auto', 'bf16': 'bfloat16', 'fp16': 'float16'}


def amp_flags(a: Dict[str, Any]) -> str:
    """The precision flags of a record's command line (``a``: its ``args``): ``--amp MODE`` in records of earlier
    versions, timm's ``--no-amp`` or ``--amp-dtype DTYPE`` in those that record ``amp_dtype``."""
    mode = a.get('amp') or 'auto'
    if 'amp_dtype' not in a:
        return f'--amp {mode}'
    return '--no-amp' if mode == 'none' else f'--amp-dtype {AMP_DTYPE_OF.get(mode, mode)}'


def _read_trace(folder: str) -> List[dict]:
    from ..training.finetune import TRACE_FILE

    path = os.path.join(folder, TRACE_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fine_tune(cfg, variant: str) -> Dict[str, Any]:
    """One fine-tune; its results with the DPP trace it wrote."""
    from ..training.finetune import finetune

    print(f'== {variant} seed {cfg.seed}', file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    metrics = finetune(cfg)
    seconds = time.perf_counter() - t0
    acc = metrics['test_accuracy']
    print(f'   test accuracy {100 * acc:.2f}%, {seconds:.0f} s', file=sys.stderr, flush=True)
    return {'variant': variant, 'seed': cfg.seed, 'test_accuracy': acc, 'test_error': 100.0 * (1 - acc),
            'test_count': metrics['test_count'], 'images_per_second': metrics['images_per_second'],
            'amp': metrics['amp'], 'seconds': seconds, 'load_average_1min': _load(), 'dpp': metrics['dpp'],
            'trace': _read_trace(cfg.output)}


def _policy_costs(args) -> Dict[str, Dict[str, Any]]:
    """GFLOPs (at the training size and at the latency size) and parameters of every policy, and its latency
    (batch ``--latency-batch`` at ``--latency-size`` px) in PyTorch eager and onnxruntime (custom kernel and
    decomposed), each converted policy timed interleaved with the original in one run."""
    import torch

    from ..zoo.runner import measure_cost, measure_latency
    from ..models.weights import create_efficientnet_lite0
    from ..surgery import ConversionPolicy, convert

    if args.model == 'efficientnet_lite0':
        original = create_efficientnet_lite0().eval()
    else:  # trained from scratch: random weights, the cost and the timings do not depend on them
        import timm

        torch.manual_seed(0)
        original = timm.create_model(args.model).eval()
    costs: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.policies:
            placement = PLACEMENT_POLICIES[name]
            model = copy.deepcopy(original)
            policy = ConversionPolicy(placement=placement or 'block')
            if placement is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter('ignore')
                    convert(model, input_size=(3, args.image_size, args.image_size), placement=placement)
            entry: Dict[str, Any] = {'placement': placement}
            for key, size in (('train', args.image_size), ('latency', args.latency_size)):
                cost = measure_cost(original, model, policy, (3, size, size)) if placement else None
                base = measure_cost(original, original, policy, (3, size, size))['gflops']['unconverted'] \
                    if placement is None else cost['gflops']['unconverted']
                gflops = cost['gflops']['converted'] if placement else base
                entry[f'gflops_{key}'] = gflops
                entry[f'flop_ratio_{key}'] = gflops / base
            entry['params'] = sum(p.numel() for p in model.parameters())
            if placement is not None:
                print(f'== latency: {name}', file=sys.stderr, flush=True)
                torch.manual_seed(0)
                entry['latency'] = measure_latency(
                    original, model.eval(), {'threads': args.threads, 'batch_size': args.latency_batch,
                                             'image_size': args.latency_size}, os.path.join(work, name),
                    args.latency_repeat)
            costs[name] = entry
    return costs


def _check_placement_args(args) -> None:
    _check_common(args)
    bad = [p for p in args.policies if p not in PLACEMENT_POLICIES]
    if bad or len(set(args.policies)) != len(args.policies) or 'original' not in args.policies:
        raise ValueError(f"--policies takes distinct names of {', '.join(PLACEMENT_POLICIES)} and must include "
                         f"'original' (every policy is compared with it), but got {' '.join(args.policies)}")
    for name in ('epochs', 'image_size', 'latency_size', 'latency_batch', 'latency_repeat'):
        if getattr(args, name) < 1:
            flag = '--img-size' if name == 'image_size' else f"--{name.replace('_', '-')}"
            raise ValueError(f'{flag} must be >= 1, but got {getattr(args, name)}')
    for name in ('train_subset', 'test_subset', 'subset_seed', 'trace_every'):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, but got {getattr(args, name)}")


def placement(args) -> Dict[str, Any]:
    """Every policy of ``--policies`` for every seed with one budget; writes ``placement.md`` and ``.json``."""
    if args.output is None:
        args.output = PLACEMENT_MODELS[args.model][2]
    _check_placement_args(args)
    refuse_overwrite(args.output, PLACEMENT_FILES, args.overwrite)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    costs = _policy_costs(args)
    runs = []
    for seed in args.seeds:  # seeds outermost: load drift on a shared machine spreads over all policies
        for name in args.policies:
            placement_name = PLACEMENT_POLICIES[name]
            cfg = _finetune_config(args, seed, os.path.join(args.output, 'runs', f'{name}_seed{seed}'),
                                   convert=placement_name is not None, placement=placement_name,
                                   dpp_trace_every=args.trace_every if placement_name else 0)
            runs.append(_fine_tune(cfg, name))
    record = _record(args, policies=costs, runs=runs, wall_seconds=time.perf_counter() - t0)
    _write_record(args, record, 'placement', placement_table(record))
    return record


def _load_note(record: Dict[str, Any]) -> str:
    loads = [r['load_average_1min'] for r in record['runs'] if r.get('load_average_1min') is not None]
    return f'; mean 1-minute load average after each run {statistics.mean(loads):.1f}' if loads else ''


def _precision_note(record: Dict[str, Any], key: str) -> str:
    """The precision every run trained in, per ``key`` (variant or placement): ``--amp auto`` decides it per run
    by timing a probe step in both, so close timings can go either way."""
    counts = precision_counts(record['runs'], key)
    if not counts:
        return ''
    why = (f' (`{amp_flags(record["args"])}` times a probe step in both per run, so where they are close it can go '
           'either way)' if record['args'].get('amp', 'auto') == 'auto' else '')
    return f'Precision per run{why}: {counts}.'


def _acc(values: List[float]) -> str:
    return ', '.join(f'{100 * v:.2f}' for v in values)


def _std(values: List[float]) -> Optional[float]:
    return statistics.stdev(values) if len(values) > 1 else None


def recommendations(record: Dict[str, Any]) -> List[str]:
    """Per FLOP budget, the policy with the highest mean test accuracy among those within it, and whether its
    difference from the original is told apart from seed noise (paired by seed)."""
    from .records import paired_differences

    runs, policies = record['runs'], record['policies']
    means = {name: statistics.mean(r['test_accuracy'] for r in runs if r['variant'] == name) for name in policies}
    lines = []
    for budget in FLOP_BUDGETS:
        fit = [n for n in policies if policies[n]['flop_ratio_train'] <= budget]
        best = max(fit, key=means.get)
        what = 'no FLOP limit' if budget == math.inf else f'a FLOP budget of {budget:.2f}x the original'
        d = paired_differences(runs, best, 'original') if best != 'original' else None
        if best == 'original':
            verdict = 'no policy within it has a higher mean accuracy than the unconverted model'
        elif d is None:
            verdict = 'one seed only, so not told apart from seed noise'
        else:
            verdict = (f"{-d['mean']:+.2f} points against the original over {d['seeds']} seeds, "
                       + ('resolved' if d['resolved'] else 'not resolved (within seed noise)'))
        lines.append(f'- With {what}: **{best}** ({100 * means[best]:.2f}% mean, '
                     f"{policies[best]['flop_ratio_train']:.2f}x FLOPs): {verdict}.")
    return lines


def latency_cells(entry: Dict[str, Any], original_ms: Dict[str, Optional[float]]) -> List[str]:
    lat = entry.get('latency')
    if lat is None:  # the original: the medians of its timings interleaved with each converted policy
        return [f'{v:.2f}' if v is not None else 'n/a' for v in original_ms.values()]
    cells = []
    pairs = ((lat['torch_ms']['converted'], lat['torch_ms']['unconverted']),
             (lat['onnxruntime_ms']['converted'].get('custom'), lat['onnxruntime_ms']['unconverted']),
             (lat['onnxruntime_ms']['converted'].get('decomposed'), lat['onnxruntime_ms']['unconverted']))
    for ms, base in pairs:
        cells.append('failed' if ms is None else f'{ms:.2f} ({ms / base:.2f}x)' if base else f'{ms:.2f}')
    return cells


def placement_table(record: Dict[str, Any]) -> str:
    """``placement.md`` from a ``placement.json`` record."""
    from .records import paired_differences, t95

    a, runs, policies = record['args'], record['runs'], record['policies']
    lat = [p['latency'] for p in policies.values() if p.get('latency')]
    original_ms = {
        'torch': statistics.median(x['torch_ms']['unconverted'] for x in lat) if lat else None,
        'custom': statistics.median(x['onnxruntime_ms']['unconverted'] for x in lat
                                    if x['onnxruntime_ms']['unconverted']) if lat else None}
    original_ms['decomposed'] = original_ms['custom']  # the original has no DPP node: one file serves both
    seeds = ', '.join(map(str, a['seeds']))
    lines = [
        f"Placement policies for {PLACEMENT_MODELS[a.get('model', 'efficientnet_lite0')][1]} on Fashion-MNIST with "
        f"one budget for all: {a['train_subset'] or 60000} training images (one fixed subset, drawn with seed "
        f"{a['subset_seed']}), {a['epochs']} epoch(s) at {a['image_size']} px, batch {a['batch_size']}, SGD "
        f"(Nesterov momentum 0.9) lr {a['lr']} (DPP parameters x{a['dpp_lr_scale']:g}), cosine per step, label "
        f"smoothing 0.1, `{amp_flags(a)}`; test accuracy on {a['test_subset'] or 10000} test images "
        f'after the last epoch; seeds {seeds} (a seed fixes the batch order and the new layers, the same for every '
        'policy).',
        f"Command: `{record['command']}`",
        f"Machine: {record['machine']}. Wall time {record['wall_seconds'] / 60:.0f} min{_load_note(record)}.",
        f"GFLOPs per image at {a['image_size']} px (training) and {a['latency_size']} px: torch's FlopCounterMode of "
        "the original plus plan()'s estimate of each change. Latency: median ms at batch "
        f"{a['latency_batch']}, {a['latency_size']} px, {a['threads']} threads, each policy interleaved with the "
        'original in one run (ratio to it in brackets); onnxruntime runs the custom-node file with the native kernel '
        'and the decomposed file.', '',
        f"| policy | GFLOPs {a['image_size']} px | GFLOPs {a['latency_size']} px | params | PyTorch ms | "
        'onnxruntime custom ms | onnxruntime decomposed ms | test accuracy % mean | std | per seed | '
        'vs original (points, paired) | train img/s |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for name, entry in policies.items():
        accs = [r['test_accuracy'] for r in runs if r['variant'] == name]
        std = _std(accs)
        if name == 'original':
            paired = '-'
        else:
            d = paired_differences(runs, name, 'original')
            paired = 'n/a (one seed)' if d is None else (
                f"{-d['mean']:+.2f} +/- {d['se']:.2f}" + (' (resolved)' if d['resolved'] else ''))
        speed = statistics.mean(r['images_per_second'] for r in runs if r['variant'] == name)
        neutral = ' (FLOP-neutral)' if name != 'original' and entry['flop_ratio_train'] <= FLOP_NEUTRAL else ''
        lines.append(
            f"| {name}{neutral} | {entry['gflops_train']:.4f} ({entry['flop_ratio_train']:.2f}x) | "
            f"{entry['gflops_latency']:.3f} ({entry['flop_ratio_latency']:.2f}x) | {entry['params']:,} | "
            + ' | '.join(latency_cells(entry, original_ms))
            + f" | {100 * statistics.mean(accs):.2f} | {'n/a' if std is None else f'{100 * std:.2f}'} | "
            f'{_acc(accs)} | {paired} | {speed:.1f} |')
    n = min(sum(1 for r in runs if r['variant'] == v) for v in policies)
    lines += ['', 'Paired: accuracy difference from the original in points, mean +/- standard error over the seeds '
              'both ran; resolved = a two-sided paired t-test at 95% tells it from zero'
              + (f' (|t| > {t95(n - 1):.2f} for {n} seeds).' if n > 1 else '.'),
              _precision_note(record, 'variant'),
              '', 'Recommendation, computed from the table:', ''] + recommendations(record)
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------------
# heal

def _heal_images(args, mean, std):
    """The unlabeled healing images, normalised like the model's input: ``--heal-fashion`` Fashion-MNIST training
    images (grey repeated to 3 channels) and ``--heal-crops`` random crops (with flips) of each healing photo, all at
    ``--heal-size`` px."""
    import torch
    import torch.nn.functional as F

    from .photos import load_photo
    from ..training.data import load_datasets

    size, g = args.heal_size, torch.Generator().manual_seed(0)
    parts = []
    if args.heal_fashion:
        ds = load_datasets().train
        idx = torch.randperm(len(ds.labels), generator=g)[:args.heal_fashion]
        grey = ds.images[idx].float() / 255.0
        parts.append(F.interpolate(grey, size=(size, size), mode='bilinear', antialias=True, align_corners=False))
    for name in HEAL_PHOTOS[:args.heal_photos]:
        img = load_photo(name)
        h, w = img.shape[-2:]
        for _ in range(args.heal_crops):
            side = int(torch.randint(min(size, h, w), min(h, w) + 1, (1,), generator=g))
            top = int(torch.randint(0, h - side + 1, (1,), generator=g))
            left = int(torch.randint(0, w - side + 1, (1,), generator=g))
            crop = F.interpolate(img[..., top:top + side, left:left + side], size=(size, size), mode='bilinear',
                                 antialias=True, align_corners=False)
            parts.append(crop.flip(-1) if torch.rand((), generator=g) < 0.5 else crop)
    x = torch.cat(parts).clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _eval_views(args, mean, std):
    from .bench import photo_views

    return photo_views(args.eval_size, mean, std, names=EVAL_PHOTOS)


def _heal_one(original, placement_name: str, seed: int, images, views, args) -> Dict[str, Any]:
    """Convert a copy of ``original`` with ``placement_name`` and distil it from ``original`` on ``images`` for
    ``max(--steps)`` steps; agreement on ``views`` at every step of ``--steps``."""
    import torch

    from .bench import preservation
    from ..surgery import convert
    from ..training.finetune import FinetuneConfig, build_optimizer, distill_loss
    from ..training.precision import probe_cpu_bf16, resolve_amp

    torch.manual_seed(seed)
    model = copy.deepcopy(original)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        convert(model, input_size=(3, args.heal_size, args.heal_size), placement=placement_name)
    # AdamW: with the norms frozen, SGD's steps at fine-tuning rates wreck the pretrained function in one step
    # (gradients of the point-wise convs 5x their weights' norm); Adam's steps do not scale with the gradient
    cfg = FinetuneConfig(opt='adamw', lr=args.lr, dpp_lr_scale=args.dpp_lr_scale, weight_decay=0.0,
                         distill_temperature=args.temperature)
    optimizer = build_optimizer(model, cfg)
    for group in optimizer.param_groups:  # a constant learning rate: lr_scale applied once, as timm's schedulers do
        group['lr'] = args.lr * group.get('lr_scale', 1.0)
    g = torch.Generator().manual_seed(seed)
    first = images[torch.randperm(len(images), generator=g)[:args.batch_size]]
    precision = resolve_amp(args.amp, torch.device('cpu'), probe=lambda: probe_cpu_bf16(model, first))
    amp = precision.dtype
    curve, step, t0 = [], 0, time.perf_counter()
    steps = sorted(set(args.steps))

    def measure() -> None:
        row = {'step': step, **preservation(original, model, views), 'seconds': time.perf_counter() - t0}
        curve.append(row)
        print(f"   {placement_name} seed {seed} step {step}: agreement {100 * row['top1_agreement']:.1f}%, "
              f"cosine {row['logit_cosine']:.4f}", file=sys.stderr, flush=True)

    order = torch.randperm(len(images), generator=g)
    pos = 0
    for target in steps:
        while step < target:
            if pos + args.batch_size > len(order):
                order, pos = torch.randperm(len(images), generator=g), 0
            x = images[order[pos:pos + args.batch_size]]
            pos += args.batch_size
            model.train()
            if args.norm_stats == 'frozen':
                for m in model.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.eval()
            with torch.autocast('cpu', dtype=amp or torch.float32, enabled=amp is not None):
                with torch.no_grad():
                    t_logits = original(x)
                loss = distill_loss(model(x), t_logits, cfg.distill_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        measure()
    return {'placement': placement_name, 'seed': seed, 'curve': curve, 'amp': precision.amp,
            'precision': precision.description, 'load_average_1min': _load()}


def _check_heal_args(args) -> None:
    _check_common(args)
    if args.eval_size is None:
        args.eval_size = args.heal_size
    from ..surgery.policy import PLACEMENTS

    bad = [p for p in args.placements if p not in PLACEMENTS]
    if bad or len(set(args.placements)) != len(args.placements):
        raise ValueError(f"--placements takes distinct names of {', '.join(PLACEMENTS)}, but got "
                         f"{' '.join(args.placements)}")
    if not args.steps or min(args.steps) < 0 or len(set(args.steps)) != len(args.steps):
        raise ValueError(f'--steps takes distinct step counts >= 0, but got {args.steps}')
    for name in ('heal_size', 'eval_size'):
        if getattr(args, name) < 32:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 32 px, but got {getattr(args, name)}")
    if not 0 <= args.heal_photos <= len(HEAL_PHOTOS):
        raise ValueError(f'--heal-photos must be in [0, {len(HEAL_PHOTOS)}], but got {args.heal_photos}')
    if args.heal_fashion < 0 or args.heal_crops < 0 or args.heal_fashion + args.heal_photos * args.heal_crops \
            < args.batch_size:
        raise ValueError('the healing set (--heal-fashion images plus --heal-photos x --heal-crops crops) must hold '
                         f'at least one batch of {args.batch_size}')
    if not args.temperature > 0:
        raise ValueError(f'--temperature must be > 0, but got {args.temperature}')
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise RuntimeError("heal's figure needs matplotlib: pip install 'dpp_surgery[demo]'") from e


def heal(args) -> Dict[str, Any]:
    """Heal every placement for every seed; writes ``heal.md``, ``heal.json`` and ``heal.png``."""
    _check_heal_args(args)
    refuse_overwrite(args.output, HEAL_FILES, args.overwrite)
    import torch

    from ..models.weights import LITE0_MEAN, LITE0_STD, create_efficientnet_lite0

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    original = create_efficientnet_lite0().eval()
    images = _heal_images(args, LITE0_MEAN, LITE0_STD)
    views = _eval_views(args, LITE0_MEAN, LITE0_STD)
    runs = []
    for seed in args.seeds:
        for placement_name in args.placements:
            print(f'== heal {placement_name} seed {seed}', file=sys.stderr, flush=True)
            runs.append(_heal_one(original, placement_name, seed, images, views, args))
    record = _record(args, runs=runs, heal_images=len(images), eval_views=len(views),
                     heal_photos=list(HEAL_PHOTOS[:args.heal_photos]), eval_photos=list(EVAL_PHOTOS),
                     wall_seconds=time.perf_counter() - t0)
    figure = heal_figure(record)
    atomic_write(os.path.join(args.output, 'heal.png'), lambda tmp: figure.savefig(tmp, dpi=100, format='png'),
                 overwrite=args.overwrite)
    _write_record(args, record, 'heal', heal_table(record))
    return record


def _curves(record: Dict[str, Any]) -> Dict[str, Dict[int, Dict[str, List[float]]]]:
    """placement -> step -> {'top1_agreement': [per seed], 'logit_cosine': [per seed]}."""
    out: Dict[str, Dict[int, Dict[str, List[float]]]] = {}
    for run in record['runs']:
        for row in run['curve']:
            cell = out.setdefault(run['placement'], {}).setdefault(row['step'], {'top1_agreement': [],
                                                                                  'logit_cosine': []})
            cell['top1_agreement'].append(row['top1_agreement'])
            cell['logit_cosine'].append(row['logit_cosine'])
    return out


def heal_table(record: Dict[str, Any]) -> str:
    """``heal.md`` from a ``heal.json`` record."""
    a = record['args']
    curves = _curves(record)
    steps = sorted({s for c in curves.values() for s in c})
    lines = [
        'Healing a converted ImageNet EfficientNet-Lite0 (offline weights) by label-free distillation from the '
        f"unconverted model (KL divergence of the logits at temperature {a['temperature']:g}; AdamW at a constant "
        f"lr {a['lr']:g} (DPP parameters x{a['dpp_lr_scale']:g}), no weight decay, batch "
        f"{a['batch_size']} at {a['heal_size']} px, normalisation statistics {a['norm_stats']}, "
        f"`{amp_flags(a)}`).",
        f"Healing images (unlabeled, offline): {record['heal_images']} = {a['heal_fashion']} Fashion-MNIST training "
        f"images and {a['heal_crops']} random crops of each of {', '.join(record['heal_photos'])}.",
        f"Measured on {record['eval_views']} views ({len(record['eval_photos'])} photos never used for healing: "
        f"{', '.join(record['eval_photos'])}; centre and corner crops and their mirror images) at {a['eval_size']} "
        f"px: top-1 agreement and mean logit cosine similarity with the unconverted model. Seeds "
        f"{', '.join(map(str, a['seeds']))} (mean, and min-max over seeds where more than one).",
        f"Command: `{record['command']}`",
        f"Machine: {record['machine']}. Wall time {record['wall_seconds'] / 60:.0f} min{_load_note(record)}.", '',
        '| placement | ' + ' | '.join(f'agreement after {s} steps' for s in steps) + ' | '
        + ' | '.join(f'cosine after {s}' for s in steps) + ' |',
        '|---|' + '---|' * (2 * len(steps))]

    def cell(values: List[float], scale: float, fmt: str) -> str:
        text = f'{scale * statistics.mean(values):{fmt}}'
        if len(values) > 1:
            text += f' ({scale * min(values):{fmt}}-{scale * max(values):{fmt}})'
        return text

    for name, curve in curves.items():
        agree = [cell(curve[s]['top1_agreement'], 100, '.1f') + '%' if s in curve else 'n/a' for s in steps]
        cos = [cell(curve[s]['logit_cosine'], 1, '.4f') if s in curve else 'n/a' for s in steps]
        lines.append(f'| {name} | ' + ' | '.join(agree) + ' | ' + ' | '.join(cos) + ' |')
    secs = statistics.mean(r['curve'][-1]['seconds'] / max(r['curve'][-1]['step'], 1) for r in record['runs'])
    lines += ['', f'One healing step took {secs:.2f} s on average (with the teacher and the measurements).',
              _precision_note(record, 'placement')]
    return '\n'.join(lines)


def heal_figure(record: Dict[str, Any]):
    """Agreement and logit cosine against healing steps, one line per placement (a matplotlib Figure)."""
    from matplotlib.figure import Figure

    curves = _curves(record)
    fig = Figure(figsize=(11, 4.2), layout='constrained')
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], 'top1_agreement', 'top-1 agreement with the original (%)'),
                           (axes[1], 'logit_cosine', 'logit cosine similarity with the original')):
        scale = 100 if key == 'top1_agreement' else 1
        for name, curve in curves.items():
            steps = sorted(curve)
            ys = [scale * statistics.mean(curve[s][key]) for s in steps]
            ax.plot(steps, ys, marker='o', label=name)
            if any(len(curve[s][key]) > 1 for s in steps):
                ax.fill_between(steps, [scale * min(curve[s][key]) for s in steps],
                                [scale * max(curve[s][key]) for s in steps], alpha=0.2)
        ax.set_xscale('symlog', linthresh=100)
        ax.set_xlabel('healing steps (symlog scale)')
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(title='placement', fontsize=8)
    fig.suptitle('Converted EfficientNet-Lite0 healed by label-free distillation, on photos never healed on')
    return fig


# ---------------------------------------------------------------------------------------------------------------
# dpp-params

def _check_dpp_params_args(args) -> None:
    _check_placement_args(argparse.Namespace(**{**vars(args), 'policies': ['original'], 'latency_size': 1,
                                                'latency_batch': 1, 'latency_repeat': 1}))
    bad = [r for r in args.remedies if r not in DPP_REMEDIES]
    if bad or len(set(args.remedies)) != len(args.remedies):
        raise ValueError(f"--remedies takes distinct names of {', '.join(DPP_REMEDIES)}, but got "
                         f"{' '.join(args.remedies)}")
    if args.trace_every < 1:
        raise ValueError(f'--trace-every must be >= 1 here (the study reads the trace), but got {args.trace_every}')


def dpp_params(args) -> Dict[str, Any]:
    """Every remedy of ``--remedies`` for every seed (block placement, the placement budget); writes
    ``dpp_params.md`` and ``.json``."""
    _check_dpp_params_args(args)
    refuse_overwrite(args.output, DPP_PARAMS_FILES, args.overwrite)
    import torch

    from ..layers import NonFiniteParameterError

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = []
    for seed in args.seeds:
        for name in args.remedies:
            cfg = _finetune_config(args, seed, os.path.join(args.output, 'runs', f'{name}_seed{seed}'),
                                   convert=True, placement='block', **DPP_REMEDIES[name])
            try:
                runs.append(_fine_tune(cfg, name))
            except NonFiniteParameterError as e:  # a remedy that makes training diverge is a result of the study
                runs.append(_diverged(cfg, name, e))
    record = _record(args, runs=runs, remedies={n: DPP_REMEDIES[n] for n in args.remedies},
                     wall_seconds=time.perf_counter() - t0)
    _write_record(args, record, 'dpp_params', dpp_params_table(record))
    return record


def _diverged(cfg, variant: str, error: Exception) -> Dict[str, Any]:
    """The record of a run stopped by non-finite DPP parameters: no accuracy; the trace up to the divergence."""
    trace = _read_trace(cfg.output)
    print(f'   diverged: {error}', file=sys.stderr, flush=True)
    return {'variant': variant, 'seed': cfg.seed, 'diverged': True, 'error': str(error), 'test_accuracy': None,
            'test_error': None, 'load_average_1min': _load(), 'trace': trace,
            'last_finite_step': trace[-1]['step'] if trace else None}


def _movement(run: Dict[str, Any]) -> Dict[str, float]:
    """How far the run's alpha and lambda moved: the largest |log(value / start)| over layers (of the channel mean,
    min and max), from the first and last trace lines."""
    first, last = run['trace'][0]['dpp'], run['trace'][-1]['dpp']
    if not first:
        return {'alpha': math.nan, 'lambda': math.nan}
    out = {}
    for key in ('alpha', 'lambda'):
        out[key] = max(abs(math.log(last[layer][f'{key}{e}'] / first[layer][f'{key}{e}']))
                       for layer in first for e in ('', '_min', '_max'))
    return out


def _grad_ratio(run: Dict[str, Any]) -> Dict[str, float]:
    """Median over the trace of the RMS gradient of theta_alpha / theta_lambda (over layers) divided by the RMS
    gradient of every other parameter."""
    out = {}
    for key in ('theta_alpha', 'theta_lambda'):
        ratios = []
        for line in run['trace']:
            grads = [v[f'grad_{key}'] for v in line['dpp'].values() if v[f'grad_{key}'] is not None]
            if grads and line['grad_other']:
                ratios.append(math.sqrt(statistics.mean(g * g for g in grads)) / line['grad_other'])
        out[key] = statistics.median(ratios) if ratios else math.nan
    return out


def dpp_params_table(record: Dict[str, Any]) -> str:
    """``dpp_params.md`` from a ``dpp_params.json`` record."""
    from .records import paired_differences

    a, runs = record['args'], record['runs']
    base = next((n for n, c in record['remedies'].items() if not c), None)  # the budget unchanged
    lines = [
        'What DPP\'s parameters learn in a fine-tune: ImageNet EfficientNet-Lite0 converted with the block placement, '
        f"fine-tuned with the placement experiment's budget ({a['train_subset']} training images of one fixed "
        f"subset, {a['epochs']} epochs at {a['image_size']} px, batch {a['batch_size']}, SGD lr {a['lr']}, DPP lr x"
        f"{a['dpp_lr_scale']:g} unless the remedy changes it), per remedy and seed "
        f"({', '.join(map(str, a['seeds']))}); test accuracy on {a['test_subset']} test images.",
        'Moved: the largest |ln(end / start)| of alpha and of lambda over the DPP layers (channel mean, min and max) '
        '(0.1 = 10%). Gradient ratio: the RMS gradient of theta_alpha (theta_lambda) over the DPP layers divided by '
        f"the RMS gradient of every other parameter, median over the trace (every {a['trace_every']} steps); the "
        'update a step makes is that times the learning-rate scale.',
        f"Command: `{record['command']}`",
        f"Machine: {record['machine']}. Wall time {record['wall_seconds'] / 60:.0f} min{_load_note(record)}.", '',
        f'| remedy | changes | test accuracy % mean | per seed | vs {base or "the budget"} (points, paired) | '
        'alpha moved | '
        'lambda moved | grad ratio theta_alpha | grad ratio theta_lambda |', '|---|---|---|---|---|---|---|---|---|']
    finished = [r for r in runs if not r.get('diverged')]
    for name in record['remedies']:
        mine = [r for r in finished if r['variant'] == name]
        lost = [r for r in runs if r['variant'] == name and r.get('diverged')]
        accs = [r['test_accuracy'] for r in mine]
        moved = [_movement(r) for r in mine if r['trace']]
        ratio = [_grad_ratio(r) for r in mine if r['trace']]
        if name == base or base is None:
            paired = '-'
        else:
            d = paired_differences(finished, name, base)
            paired = 'n/a (fewer than two seeds)' if d is None else (
                f"{-d['mean']:+.2f} +/- {d['se']:.2f}" + (' (resolved)' if d['resolved'] else ''))
        changes = ', '.join(f'{k}={v}' for k, v in record['remedies'][name].items()) or 'none (the budget)'
        if lost:
            steps = sorted({r['last_finite_step'] for r in lost if r['last_finite_step'] is not None})
            note = (f"diverged in {len(lost)} of {len(lost) + len(mine)} seeds (non-finite DPP parameters after "
                    f"step {', '.join(map(str, steps)) or '0'} of the trace)")
            if not mine:
                lines.append(f"| {name} | {changes} | {note} | - | - | - | - | - | - |")
                continue
            paired += f'; {note}'

        def mean_of(rows, key):
            return f"{statistics.mean(r[key] for r in rows):.3g}" if rows else 'n/a'

        lines.append(f"| {name} | {changes} | {100 * statistics.mean(accs):.2f} | {_acc(accs)} | {paired} | "
                     f"{mean_of(moved, 'alpha')} | {mean_of(moved, 'lambda')} | {mean_of(ratio, 'theta_alpha')} | "
                     f"{mean_of(ratio, 'theta_lambda')} |")
    return '\n'.join(lines + ['', _precision_note(record, 'variant'), ''] + _layer_lines(record))


def _layer_lines(record: Dict[str, Any]) -> List[str]:
    """Per remedy and DPP layer: alpha and lambda at the start and the end of training (channel mean [min, max],
    averaged over seeds)."""
    lines = ['Per layer, at the first and the last trace line: channel mean [min, max], averaged over the seeds.', '',
             '| remedy | DPP layer | alpha start | alpha end | lambda start | lambda end |', '|---|---|---|---|---|---|']
    for name in record['remedies']:
        mine = [r for r in record['runs'] if r['variant'] == name and r['trace'] and not r.get('diverged')]
        if not mine:
            continue
        for layer in mine[0]['trace'][0]['dpp']:
            def cell(index: int, key: str) -> str:
                vals = [statistics.mean(r['trace'][index]['dpp'][layer][f'{key}{e}'] for r in mine)
                        for e in ('', '_min', '_max')]
                return f'{vals[0]:.3f} [{vals[1]:.3f}, {vals[2]:.3f}]'
            lines.append(f'| {name} | {layer} | {cell(0, "alpha")} | {cell(-1, "alpha")} | {cell(0, "lambda")} | '
                         f'{cell(-1, "lambda")} |')
    return lines


# ---------------------------------------------------------------------------------------------------------------
# command line

def add_amp(p: argparse.ArgumentParser) -> None:
    """timm's ``--amp``/``--no-amp`` and ``--amp-dtype`` (auto or bfloat16: the studies run on CPUs);
    :func:`dpp_surgery.tools.experiments.main` turns them into the precision request ``args.amp`` that the records
    keep."""
    from ..cli import add_amp_arguments

    add_amp_arguments(p, dtypes=('auto', 'bfloat16'),
                      amp_help='mixed precision for every run, in the dtype of --amp-dtype; --no-amp: float32, to '
                               'repeat a run exactly (default on)',
                      dtype_help='auto: bfloat16 where the CPU has it natively and a probe step ran faster in it '
                                 '(decided per run); bfloat16: bfloat16 autocast (default auto)')


def _add_budget(p: argparse.ArgumentParser, output: Optional[str]) -> None:
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    p.add_argument('--train-subset', type=int, default=3000, help='training images (one fixed subset; 0 = all)')
    p.add_argument('--test-subset', type=int, default=2000, help='test images (0 = all 10000)')
    p.add_argument('--subset-seed', type=int, default=0, help='the draw of the subsets, the same for every run')
    p.add_argument('--epochs', type=int, default=2)
    add_img_size(p, 64)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=0.02)
    p.add_argument('--dpp-lr-scale', type=float, default=10.0)
    p.add_argument('--trace-every', type=int, default=25, help='DPP trace every N steps (0 = off)')
    p.add_argument('--threads', type=int, default=2)
    add_amp(p)
    p.add_argument('--output', default=output, help='results folder' + (f' (default {output})' if output else
                                                                          ' (default: by --model)'))
    p.add_argument('--overwrite', action='store_true', help='replace the results files in --output')
    p.add_argument('--no-progress', action='store_true')


def add_parsers(sub) -> None:
    """The ``placement``, ``heal`` and ``dpp-params`` subcommands of ``python -m dpp_surgery.experiments``."""
    from ..surgery.policy import PLACEMENTS

    p = sub.add_parser('placement', help='original and every placement of EfficientNet-Lite0 fine-tuned with one '
                                         'budget: accuracy, GFLOPs, parameters, latency')
    _add_budget(p, None)
    p.add_argument('--model', choices=list(PLACEMENT_MODELS), default='efficientnet_lite0',
                   help='efficientnet_lite0: fine-tuned from its offline ImageNet weights (output default '
                        'results/placement); resnet18: trained from scratch (results/placement_resnet18)')
    p.add_argument('--policies', nargs='+', default=list(PLACEMENT_POLICIES), metavar='POLICY',
                   help=f"policies (default all: {', '.join(PLACEMENT_POLICIES)})")
    p.add_argument('--latency-size', type=int, default=224)
    p.add_argument('--latency-batch', type=int, default=1)
    p.add_argument('--latency-repeat', type=int, default=20)
    p.set_defaults(func=placement)

    p = sub.add_parser('heal', help='agreement with the original after label-free distillation, per placement')
    p.add_argument('--placements', nargs='+', default=list(PLACEMENTS), metavar='PLACEMENT')
    p.add_argument('--seeds', type=int, nargs='+', default=[0], help='seeds (each fixes a batch order)')
    p.add_argument('--steps', type=int, nargs='+', default=list(HEAL_STEPS), help='measure after these steps')
    p.add_argument('--heal-size', type=int, default=96, help='healing images in px')
    p.add_argument('--eval-size', type=int, help='measuring views in px (default: --heal-size)')
    p.add_argument('--heal-fashion', type=int, default=4000, help='Fashion-MNIST images in the healing set')
    p.add_argument('--heal-photos', type=int, default=len(HEAL_PHOTOS), help='healing photos used (of '
                                                                             f"{', '.join(HEAL_PHOTOS)})")
    p.add_argument('--heal-crops', type=int, default=300, help='random crops per healing photo')
    p.add_argument('--norm-stats', choices=['frozen', 'train'], default='frozen',
                   help="batch-norm running statistics while healing: 'frozen' keeps the pretrained ones (the "
                        "healing images are not the photos the model serves), 'train' updates them")
    p.add_argument('-b', '--batch-size', type=int, default=8, help='images per healing step (the norms are frozen, so '
                                                                     'a small batch is enough)')
    p.add_argument('--lr', type=float, default=1e-4, help='AdamW learning rate, constant')
    p.add_argument('--dpp-lr-scale', type=float, default=10.0)
    p.add_argument('--temperature', type=float, default=2.0)
    p.add_argument('--threads', type=int, default=2)
    add_amp(p)
    p.add_argument('--output', default='results/heal')
    p.add_argument('--overwrite', action='store_true', help='replace heal.md/json/png in --output')
    p.set_defaults(func=heal)

    p = sub.add_parser('dpp-params', help="what DPP's alpha and lambda learn, and the remedies (block placement)")
    _add_budget(p, 'results/dpp_params')
    p.add_argument('--remedies', nargs='+', default=list(DEFAULT_REMEDIES), metavar='REMEDY',
                   help=f"remedies, of {', '.join(DPP_REMEDIES)} (default {' '.join(DEFAULT_REMEDIES)}); lr-xN: DPP "
                        "parameters at N times the learning rate, init-1-3: alpha = 1, lambda = 3 at conversion, "
                        "norm-none: no window normalisation")
    p.set_defaults(func=dpp_params, model='efficientnet_lite0')
