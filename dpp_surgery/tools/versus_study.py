"""DPP against the downsampling a user would pick instead: ``python -m dpp_surgery.experiments versus``.

Two settings, each with its own budget (:data:`SETTINGS`), every arm trained once per seed on Fashion-MNIST:

* ``resnet18``: ResNet-18 from scratch; the original, and DPP, BlurPool (timm's ``BlurPool2d``), average and max
  pooling at ``pre`` (DPP's best placement there, FLOP-neutral), and S3DPP at ``pre``.
* ``efficientnet_lite0``: ImageNet EfficientNet-Lite0 (offline weights) fine-tuned; the original, and DPP, BlurPool,
  average and max pooling at ``block`` and at ``post`` (the two DPP placements that did not lose), and S3DPP at
  ``block``.

Per run: the test accuracy, the shift consistency (the share of test images whose top-1 class is the same under two
random shifts of up to ``--max-shift`` px, as antialiased-cnns measures it), and the accuracy on the test set
degraded by downscaling (to 1/``--downscale`` of the side and back) and by Gaussian noise (``--noise-std`` of the
pixel range). Per arm: GFLOPs, parameters, and latency in PyTorch and onnxruntime.

The study can be stopped and continued: ``versus.json`` in ``--output`` is rewritten after each finished run and
each arm's costs, and running the same command again runs only what is missing (a run that was cut off starts
over). Each run's folder (``runs/SETTING/ARM_seedN``) keeps its final and best weights and its metrics; the
optimizer state goes when the run ends. Another budget in the same folder is refused: continue with the same
options, or choose another ``--output``, or pass ``--overwrite`` to start over. ``versus.md`` (the tables, paired
differences with a Holm correction, and findings computed from them) is rewritten with the record;
``experiments study-table versus`` regenerates it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..utils import write_text
from .records import precision_counts

__all__ = ['SETTINGS', 'Arm', 'versus', 'versus_table', 'holm', 't_test_p', 'add_parser']

VERSUS_FILES = ('versus.json', 'versus.md')
# the record's format; a record of another version is not continued
VERSUS_VERSION = 1
# a record larger than this is no record of this study (read as data, never without bound)
MAX_RECORD_BYTES = 16 << 20
ALPHA = 0.05


@dataclass(frozen=True)
class Arm:
    """One way of downsampling in a setting: ``operator`` at ``placement`` (both None: the original)."""
    name: str
    operator: Optional[str] = None
    placement: Optional[str] = None

    @property
    def converted(self) -> bool:
        return self.operator is not None


def _arms(placements: Tuple[str, ...], s3dpp_at: str) -> Tuple[Arm, ...]:
    arms = [Arm('original')]
    for placement in placements:
        arms += [Arm(f'{op}-{placement}', op, placement) for op in ('dpp', 'blur', 'avg', 'max')]
    return tuple(arms + [Arm(f's3dpp-{s3dpp_at}', 's3dpp', s3dpp_at)])


@dataclass(frozen=True)
class Setting:
    model: str
    pretrained: str  # finetune's pretrained source; 'none' = random init
    describe: str
    arms: Tuple[Arm, ...]
    budget: Dict[str, Any]


# the budgets: ResNet-18 from scratch long enough for the original to pass 88% (at 32 px to keep it affordable; at
# 15,000 images it fell just short); EfficientNet-Lite0 with the placement study's budget, so that its numbers compare
SETTINGS: Dict[str, Setting] = {
    'resnet18': Setting('resnet18', 'none', 'ResNet-18 from scratch (random init), trained', _arms(('pre',), 'pre'),
                        {'train_subset': 20000, 'epochs': 3, 'img_size': 32, 'batch_size': 64, 'lr': 0.05}),
    'efficientnet_lite0': Setting('efficientnet_lite0', 'offline',
                                  'ImageNet EfficientNet-Lite0 (offline weights), fine-tuned',
                                  _arms(('block', 'post'), 'block'),
                                  {'train_subset': 3000, 'epochs': 2, 'img_size': 64, 'batch_size': 32, 'lr': 0.02}),
}
# the budget keys a command-line option may replace for every setting (tests use tiny budgets)
BUDGET_FLAGS = ('train_subset', 'epochs', 'img_size', 'batch_size', 'lr')


# ---------------------------------------------------------------------------------------------------------------
# statistics

def t_test_p(t: float, dof: int) -> float:
    """Two-sided p-value of Student's t with ``dof`` (integer >= 1) degrees of freedom, from the closed forms for
    integer degrees of freedom (Abramowitz and Stegun 26.7.3 and 26.7.4)."""
    if dof < 1:
        raise ValueError(f'dof must be >= 1, but got {dof}')
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(dof))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if dof % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2.4/(3.5) cos^4 + ...)), dof - 3 in the last power
        term, total = 1.0, 1.0 if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = (2 / math.pi) * (theta + s * math.cos(theta) * total)
    else:  # even: sin (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ...), dof - 2 in the last power
        term, total = 1.0, 1.0
        for k in range(1, dof // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = s * total
    return min(1.0, max(0.0, 1.0 - inside))


def holm(p_values: Dict[str, float]) -> Dict[str, float]:
    """Holm's step-down adjusted p-values of a family of comparisons (a comparison is resolved at level ``ALPHA``
    when its adjusted p-value is below it)."""
    order = sorted(p_values, key=p_values.get)
    m, adjusted, running = len(order), {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        adjusted[key] = running
    return adjusted


def _paired(runs: List[dict], arm: str, baseline: str) -> Optional[Dict[str, float]]:
    """Test-accuracy difference ``arm - baseline`` in points over the seeds both ran, paired by seed: mean, standard
    error, t, and the unadjusted two-sided p-value. None with fewer than two common seeds."""
    acc = {(r['arm'], r['seed']): 100.0 * r['test_accuracy'] for r in runs}
    seeds = sorted(s for (a, s) in acc if a == arm and (baseline, s) in acc)
    if len(seeds) < 2:
        return None
    diffs = [acc[(arm, s)] - acc[(baseline, s)] for s in seeds]
    mean, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    t = mean / se if se > 0 else (math.copysign(math.inf, mean) if mean else 0.0)
    return {'mean': mean, 'se': se, 't': t, 'seeds': len(seeds), 'p': t_test_p(t, len(seeds) - 1)}


def comparisons(record: Dict[str, Any], setting: str) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """Every comparison of one setting's table, paired by seed, with Holm's correction over all of them: each
    converted arm against the original, and each arm that is not DPP against DPP at the same placement."""
    runs = [r for r in record['runs'] if r['setting'] == setting]
    arms = {a['name']: a for a in record['plan']['settings'][setting]['arms']}
    pairs = [(name, 'original') for name, a in arms.items() if a['operator']]
    pairs += [(name, f"dpp-{a['placement']}") for name, a in arms.items()
              if a['operator'] not in (None, 'dpp') and f"dpp-{a['placement']}" in arms]
    found = {pair: _paired(runs, *pair) for pair in pairs}
    found = {pair: d for pair, d in found.items() if d is not None}
    adjusted = holm({f'{a}|{b}': d['p'] for (a, b), d in found.items()})
    for (a, b), d in found.items():
        d['p_holm'] = adjusted[f'{a}|{b}']
        d['resolved'] = d['p_holm'] < ALPHA
        d['family'] = len(found)
    return found


# ---------------------------------------------------------------------------------------------------------------
# the degraded test sets

def degraded_views(budget: Dict[str, Any], eval_cfg: Dict[str, Any], test_subset: int, subset_seed: int):
    """The test images the fine-tune tests on (the same draw), in pixel values [0, 1] at the training size: clean,
    two shifted views (each image padded with the background and cropped at an offset of up to ``max_shift`` px,
    drawn per image and view with a fixed generator), downscaled and restored, and with Gaussian noise; and the
    labels. Every arm and seed sees the same views."""
    import torch
    import torch.nn.functional as F

    from ..training.data import load_datasets
    from ..training.finetune import subset

    test = subset(load_datasets().test, test_subset, subset_seed + 1)
    idx = getattr(test, 'indices', None)
    base = test.dataset if idx is not None else test
    images = base.images[idx] if idx is not None else base.images
    labels = base.labels[idx] if idx is not None else base.labels
    size, shift = budget['img_size'], eval_cfg['max_shift']
    clean = F.interpolate(images.float() / 255.0, size=(size, size), mode='bilinear', align_corners=False,
                          antialias=True)
    g = torch.Generator().manual_seed(eval_cfg['view_seed'])
    padded = F.pad(clean, (shift,) * 4)  # Fashion-MNIST's background is 0
    shifted = []
    for _ in range(2):
        offsets = torch.randint(0, 2 * shift + 1, (len(clean), 2), generator=g)
        shifted.append(torch.stack([padded[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(offsets.tolist())]))
    small = max(1, round(size / eval_cfg['downscale']))
    down = F.interpolate(F.interpolate(clean, size=(small, small), mode='bilinear', align_corners=False,
                                       antialias=True), size=(size, size), mode='bilinear', align_corners=False)
    noisy = (clean + eval_cfg['noise_std'] * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    return {'clean': clean, 'shift_a': shifted[0], 'shift_b': shifted[1], 'downscaled': down, 'noisy': noisy}, labels


def _predict(model, x, mean, std, batch: int = 500):
    import torch

    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model((x[i:i + batch] - m) / s).argmax(-1))
    return torch.cat(out)


def robustness(model, views: Dict[str, Any], labels) -> Dict[str, float]:
    """Accuracy on the clean, downscaled and noisy views and the shift consistency of ``model`` (eval, float32)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    mean, std = tuple(cfg.get('mean', (0.5,) * 3)), tuple(cfg.get('std', (0.5,) * 3))
    model.eval()
    pred = {k: _predict(model, x, mean, std) for k, x in views.items()}
    return {'clean_accuracy': (pred['clean'] == labels).float().mean().item(),
            'shift_consistency': (pred['shift_a'] == pred['shift_b']).float().mean().item(),
            'downscaled_accuracy': (pred['downscaled'] == labels).float().mean().item(),
            'noisy_accuracy': (pred['noisy'] == labels).float().mean().item()}


# ---------------------------------------------------------------------------------------------------------------
# runs and costs

def _budget(args, setting: Setting) -> Dict[str, Any]:
    budget = dict(setting.budget)
    for key in BUDGET_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            budget[key] = value
    return budget


def _plan(args) -> Dict[str, Any]:
    """What the record measures, from the arguments; a record is continued only where this is the same."""
    plan = {'version': VERSUS_VERSION, 'settings': {}, 'test_subset': args.test_subset,
            'subset_seed': args.subset_seed, 'dpp_lr_scale': args.dpp_lr_scale, 'amp': args.amp,
            'eval': {'max_shift': args.max_shift, 'downscale': args.downscale, 'noise_std': args.noise_std,
                     'view_seed': 0},
            'latency': {'image_size': args.latency_size, 'batch_size': args.latency_batch,
                        'repeat': args.latency_repeat, 'threads': args.threads}}
    for name in args.settings:
        s = SETTINGS[name]
        arms = [a for a in s.arms if not args.arms or a.name in args.arms or a.name == 'original']
        plan['settings'][name] = {'model': s.model, 'pretrained': s.pretrained, 'describe': s.describe,
                                  'budget': _budget(args, s),
                                  'arms': [{'name': a.name, 'operator': a.operator, 'placement': a.placement}
                                           for a in arms]}
    return plan


def _read(path: str) -> Dict[str, Any]:
    rerun = 'run `python -m dpp_surgery.experiments versus` with --overwrite to start over, or another --output'
    if os.path.getsize(path) > MAX_RECORD_BYTES:
        raise ValueError(f'{path} is over {MAX_RECORD_BYTES >> 20} MiB, larger than any record of this study; {rerun}')
    with open(path) as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path} is not valid JSON ({e}); {rerun}') from None
    if not isinstance(record, dict) or not isinstance(record.get('plan'), dict) or \
            not isinstance(record['plan'].get('settings'), dict) or not isinstance(record.get('runs'), list) or \
            not isinstance(record.get('costs'), dict) or not isinstance(record.get('sittings'), list):
        raise ValueError(f'{path} is not a record of `experiments versus`; {rerun}')
    return record


def _start(args, plan: Dict[str, Any]) -> Dict[str, Any]:
    """The record to continue (the one in ``--output`` if it measured the same), or a new one; either way with this
    sitting (command, machine, start) added."""
    from ..timing import machine_description

    sitting = {'command': _command(args), 'machine': machine_description(),
               'started': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
    path = os.path.join(args.output, 'versus.json')
    if not os.path.exists(path) or args.overwrite:
        return {'plan': plan, 'sittings': [sitting], 'runs': [], 'costs': {}}
    record = _read(path)
    old = record['plan']
    differs = _differences(old, plan)
    if differs:
        raise ValueError(f'{path} records a study with other options (they differ in {differs}); run the command it '
                         'records to continue it, pass --overwrite to start over, or choose another --output')
    for name, setting in plan['settings'].items():  # a setting or arm not run before joins the record
        mine = old['settings'].setdefault(name, setting)
        known = {a['name'] for a in mine['arms']} | {a['name'] for a in setting['arms']}
        mine['arms'] = [{'name': a.name, 'operator': a.operator, 'placement': a.placement}
                        for a in SETTINGS[name].arms if a.name in known]
    record['sittings'].append(sitting)
    return record


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    """The options in which two plans differ, where both measure something (arms and settings may be added)."""
    diff = [k for k in sorted(set(old) | set(new)) if k != 'settings' and old.get(k) != new.get(k)]
    for name in sorted(set(old.get('settings') or {}) & set(new['settings'])):
        a, b = old['settings'][name], new['settings'][name]
        diff += [f'settings.{name}.{k}' for k in sorted(set(a) | set(b)) if k != 'arms' and a.get(k) != b.get(k)]
    return ', '.join(diff)


def _command(args) -> str:
    import shlex

    return 'python -m dpp_surgery.experiments ' + shlex.join(args.argv)


def _save(args, record: Dict[str, Any]) -> None:
    """Rewrite the record and its table (the record is this study's own file, so it is replaced at each step)."""
    record['wall_seconds'] = sum(r['seconds'] for r in record['runs'])
    write_text(os.path.join(args.output, 'versus.json'), json.dumps(record, indent=1) + '\n', overwrite=True)
    write_text(os.path.join(args.output, 'versus.md'), versus_table(record) + '\n', overwrite=True)


def _finetune_config(args, plan: Dict[str, Any], setting: str, arm: Dict[str, Any], seed: int, output: str):
    from ..training.finetune import FinetuneConfig
    from .conversion_study import AMP_DTYPE_OF

    s, b = plan['settings'][setting], plan['settings'][setting]['budget']
    return FinetuneConfig(
        model=s['model'], pretrained=s['pretrained'] != 'none',
        pretrained_source=s['pretrained'] if s['pretrained'] != 'none' else 'auto', img_size=b['img_size'],
        train_subset=b['train_subset'], test_subset=plan['test_subset'], subset_seed=plan['subset_seed'],
        epochs=b['epochs'], batch_size=b['batch_size'], lr=b['lr'], dpp_lr_scale=plan['dpp_lr_scale'], seed=seed,
        output=output, overwrite=True, progress=not args.no_progress, threads=args.threads,
        convert=arm['operator'] is not None, placement=arm['placement'], operator=arm['operator'],
        amp=plan['amp'] != 'none', amp_dtype=AMP_DTYPE_OF.get(plan['amp'], 'auto'))


def _run(args, plan: Dict[str, Any], setting: str, arm: Dict[str, Any], seed: int, views) -> Dict[str, Any]:
    """One fine-tune, then its final model on the degraded test sets. The run folder keeps the weights and metrics
    but not the optimizer state (twice the model's size): a run cut off starts over, so the state is never read."""
    from ..checkpoint import load
    from ..training.finetune import LAST_FILE, STATE_FILE, finetune

    folder = os.path.join(args.output, 'runs', setting, f"{arm['name']}_seed{seed}")
    cfg = _finetune_config(args, plan, setting, arm, seed, folder)
    print(f"== {setting} {arm['name']} seed {seed}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    metrics = finetune(cfg)
    seconds = time.perf_counter() - t0
    os.remove(os.path.join(folder, STATE_FILE))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = load(os.path.join(folder, LAST_FILE))
    measured = robustness(model, *views)
    print(f"   test accuracy {100 * metrics['test_accuracy']:.2f}%, shift consistency "
          f"{100 * measured['shift_consistency']:.1f}%, {seconds:.0f} s", file=sys.stderr, flush=True)
    return {'setting': setting, 'arm': arm['name'], 'seed': seed, 'test_accuracy': metrics['test_accuracy'],
            'test_count': metrics['test_count'], 'images_per_second': metrics['images_per_second'],
            'amp': metrics['amp'], 'precision': metrics['precision'], 'seconds': seconds,
            'load_average_1min': os.getloadavg()[0] if hasattr(os, 'getloadavg') else None, **measured}


def _base_model(setting: Dict[str, Any]):
    """The setting's model as it starts, with a 10-class head (costs and timings do not depend on its weights)."""
    import torch

    if setting['model'] == 'efficientnet_lite0':
        from ..models.weights import create_efficientnet_lite0

        model = create_efficientnet_lite0()
        model.reset_classifier(10)
        return model.eval()
    import timm

    torch.manual_seed(0)
    return timm.create_model(setting['model'], num_classes=10).eval()


def _cost(plan: Dict[str, Any], setting: str, arm: Dict[str, Any]) -> Dict[str, Any]:
    """GFLOPs at the training size and the latency size, parameters, and (converted arms) latency in PyTorch and
    onnxruntime interleaved with the original in one run."""
    import torch

    from ..zoo.runner import measure_cost, measure_latency
    from ..surgery import ConversionPolicy, convert

    s, lat = plan['settings'][setting], plan['latency']
    original = _base_model(s)
    model = copy.deepcopy(original)
    policy = ConversionPolicy(placement=arm['placement'] or 'block', operator=arm['operator'] or 'dpp')
    size = s['budget']['img_size']
    if arm['operator'] is not None:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            convert(model, input_size=(3, size, size), policy=policy)
    entry: Dict[str, Any] = {'params': sum(p.numel() for p in model.parameters())}
    for key, side in (('train', size), ('latency', lat['image_size'])):
        cost = measure_cost(original, model, policy, (3, side, side))
        gflops = cost['gflops']['converted'] if arm['operator'] else cost['gflops']['unconverted']
        entry[f'gflops_{key}'] = gflops
        entry[f'flop_ratio_{key}'] = gflops / cost['gflops']['unconverted']
    if arm['operator'] is not None:
        print(f"== latency: {setting} {arm['name']}", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as work:
            entry['latency'] = measure_latency(original, model.eval(), {
                'threads': lat['threads'], 'batch_size': lat['batch_size'], 'image_size': lat['image_size']},
                work, lat['repeat'])
    return entry


def _check_args(args) -> None:
    """Every option in range, before any work."""
    names = {arm.name for s in SETTINGS.values() for arm in s.arms}
    unknown = [a for a in args.arms or () if a not in names]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(sorted(names))}")
    for name in ('settings', 'seeds'):
        if len(set(getattr(args, name))) != len(getattr(args, name)):
            raise ValueError(f'--{name} must not repeat a value')
    for name in ('epochs', 'batch_size', 'latency_size', 'latency_batch', 'latency_repeat', 'downscale', 'threads'):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, but got {value}")
    for name in ('train_subset', 'test_subset', 'subset_seed', 'max_shift'):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, but got {value}")
    if args.lr is not None and not args.lr > 0 or not args.dpp_lr_scale > 0:
        raise ValueError(f'--lr and --dpp-lr-scale must be > 0, but got {args.lr} and {args.dpp_lr_scale}')
    if not 0 <= args.noise_std <= 1:
        raise ValueError(f'--noise-std is a share of the pixel range, in [0, 1], but got {args.noise_std}')
    if args.img_size is not None and args.img_size < 16:
        raise ValueError(f'--img-size must be >= 16 px, but got {args.img_size}')


def versus(args) -> Dict[str, Any]:
    """Run every missing (setting, arm, seed) and every missing arm's costs, recording each as it finishes."""
    _check_args(args)
    plan = _plan(args)
    record = _start(args, plan)  # before any work: a record of other options stops the command here
    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    done = {(r['setting'], r['arm'], r['seed']) for r in record['runs']}
    for setting, s in plan['settings'].items():
        views = None
        for seed in args.seeds:  # seeds outermost: load drift on a shared machine spreads over every arm
            for arm in s['arms']:
                if (setting, arm['name'], seed) in done:
                    continue
                if views is None:
                    views = degraded_views(s['budget'], plan['eval'], plan['test_subset'], plan['subset_seed'])
                record['runs'].append(_run(args, plan, setting, arm, seed, views))
                _save(args, record)
        for arm in s['arms']:  # after the runs: the first runs tell early whether the budget is right
            key = f"{setting}/{arm['name']}"
            if key not in record['costs'] and not args.skip_costs:
                record['costs'][key] = _cost(plan, setting, arm)
                _save(args, record)
    _save(args, record)
    print(versus_table(record))
    return record


# ---------------------------------------------------------------------------------------------------------------
# the table

def _mean(values: List[float]) -> Optional[float]:
    return statistics.mean(values) if values else None


def _median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _pct(value: Optional[float], digits: int = 2) -> str:
    return 'n/a' if value is None else f'{100 * value:.{digits}f}'


def _diff(d: Optional[Dict[str, Any]]) -> str:
    if d is None:
        return '-'
    verdict = f"p = {d['p_holm']:.3f}, " + ('resolved' if d['resolved'] else 'not resolved')
    return f"{d['mean']:+.2f} +/- {d['se']:.2f} ({verdict})"


def _latency(cost: Optional[Dict[str, Any]], original: Dict[str, Optional[float]]) -> List[str]:
    from .conversion_study import latency_cells

    if not cost:
        return ['n/a'] * 3
    return latency_cells(cost, original)


def _original_latency(costs: List[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    lat = [c['latency'] for c in costs if c.get('latency')]
    torch_ms = [x['torch_ms']['unconverted'] for x in lat]
    ort_ms = [x['onnxruntime_ms']['unconverted'] for x in lat if x['onnxruntime_ms']['unconverted']]
    med = statistics.median
    return {'torch': med(torch_ms) if torch_ms else None, 'custom': med(ort_ms) if ort_ms else None,
            'decomposed': med(ort_ms) if ort_ms else None}


def _setting_table(record: Dict[str, Any], name: str) -> List[str]:
    s, plan = record['plan']['settings'][name], record['plan']
    b = s['budget']
    runs = [r for r in record['runs'] if r['setting'] == name]
    found = comparisons(record, name)
    costs = {a['name']: record['costs'].get(f"{name}/{a['name']}") for a in s['arms']}
    original_ms = _original_latency([c for c in costs.values() if c])
    seeds = sorted({r['seed'] for r in runs})
    lines = [f"### {s['describe']}", '',
             f"{b['train_subset'] or 60000} training images (one fixed subset), {b['epochs']} epoch(s) at "
             f"{b['img_size']} px, batch {b['batch_size']}, SGD (Nesterov momentum 0.9) lr {b['lr']} (DPP parameters "
             f"x{plan['dpp_lr_scale']}), cosine per step, label smoothing 0.1; test on {plan['test_subset'] or 10000} "
             f"test images after the last epoch; seeds {', '.join(map(str, seeds)) or 'none yet'}.", '',
             '| arm | placement | GFLOPs | params | PyTorch ms | onnxruntime custom ms | onnxruntime decomposed ms '
             '| train img/s (median) | test accuracy % (std) | vs original, points | vs DPP, points '
             '| shift consistency % | downscaled accuracy % | noisy accuracy % | seeds |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for arm in s['arms']:
        mine = [r for r in runs if r['arm'] == arm['name']]
        accs = [r['test_accuracy'] for r in mine]
        cost = costs[arm['name']]
        gflops = (f"{cost['gflops_train']:.4f} ({cost['flop_ratio_train']:.2f}x)" if cost else 'n/a')
        params = f"{cost['params']:,}" if cost else 'n/a'
        std = f' ({100 * statistics.stdev(accs):.2f})' if len(accs) > 1 else ''
        vs_dpp = found.get((arm['name'], f"dpp-{arm['placement']}"))
        lines.append(
            f"| {arm['name']} | {arm['placement'] or '-'} | {gflops} | {params} | "
            + ' | '.join(_latency(cost, original_ms) if arm['operator'] else
                         [f'{v:.2f}' if v is not None else 'n/a' for v in original_ms.values()])
            + f" | {_median([r['images_per_second'] for r in mine]) or 0:.1f} | {_pct(_mean(accs))}{std} | "
            f"{_diff(found.get((arm['name'], 'original')))} | {_diff(vs_dpp)} | "
            f"{_pct(_mean([r['shift_consistency'] for r in mine]), 1)} | "
            f"{_pct(_mean([r['downscaled_accuracy'] for r in mine]))} | "
            f"{_pct(_mean([r['noisy_accuracy'] for r in mine]))} | {len(mine)} |")
    family = next(iter(found.values()))['family'] if found else 0
    lines += ['', f'Paired by seed: test-accuracy difference in points, mean +/- standard error; p from a two-sided '
                  f"paired t-test, Holm-adjusted over the {family} comparisons of this table; resolved = adjusted "
                  f'p < {ALPHA}.', ''] + _conditions(runs, plan.get('amp')) + [
                  ''] + _findings(record, name, found)
    return lines


def _conditions(runs: List[Dict[str, Any]], amp: Optional[str]) -> List[str]:
    """The precision every run trained in, per arm, and how busy the machine was after each run."""
    why = (' (`--amp auto` decides per run by timing a probe step in both, so where they are close it can go either '
           'way)' if amp == 'auto' else '')
    lines = [f'Precision per run{why}: {precision_counts(runs, "arm")}.']
    loads = [r['load_average_1min'] for r in runs if r.get('load_average_1min') is not None]
    if loads:
        lines.append(f'1-minute load average after each run: median {statistics.median(loads):.1f}, highest '
                     f'{max(loads):.1f}; other work on the machine slows a run\'s training img/s, hence its median '
                     'over seeds.')
    return lines


def _findings(record: Dict[str, Any], name: str, found) -> List[str]:
    """Sentences computed from the table: the best arm, and each comparison that is resolved."""
    runs = [r for r in record['runs'] if r['setting'] == name]
    arms = [a['name'] for a in record['plan']['settings'][name]['arms']]
    means = {a: statistics.mean(r['test_accuracy'] for r in runs if r['arm'] == a)
             for a in arms if any(r['arm'] == a for r in runs)}
    if not means:
        return ['No runs yet.']
    best = max(means, key=means.get)
    lines = ['Findings (computed from the table):', '',
             f'- Highest mean test accuracy: **{best}** ({100 * means[best]:.2f}%).']
    better = [f'{a} vs {b} {d["mean"]:+.2f}' for (a, b), d in found.items() if d['resolved'] and d['mean'] > 0]
    worse = [f'{a} vs {b} {d["mean"]:+.2f}' for (a, b), d in found.items() if d['resolved'] and d['mean'] < 0]
    open_ = [f'{a} vs {b}' for (a, b), d in found.items() if not d['resolved']]
    lines.append('- Resolved gains: ' + ('; '.join(better) if better else 'none') + '.')
    lines.append('- Resolved losses: ' + ('; '.join(worse) if worse else 'none') + '.')
    lines.append('- Not resolved: ' + ('; '.join(open_) if open_ else 'none') + '.')
    return lines


def versus_table(record: Dict[str, Any]) -> str:
    """``versus.md`` from a ``versus.json`` record."""
    plan = record['plan']
    e, lat = plan['eval'], plan['latency']
    sittings = record['sittings']
    commands = list(dict.fromkeys(s['command'] for s in sittings))
    machines = list(dict.fromkeys(s['machine'] for s in sittings))
    lines = ['DPP against other downsampling at the same places, trained on Fashion-MNIST.',
             'Command: ' + ', then '.join(f'`{c}`' for c in commands) + f' ({len(sittings)} sitting(s)).',
             f"Machine: {'; '.join(machines)}. Training time in all {record.get('wall_seconds', 0) / 60:.0f} min.",
             f"Shift consistency: the share of test images whose top-1 class is the same under two random shifts of "
             f"up to {e['max_shift']} px (the image padded with its background). Downscaled: each test image "
             f"resized to 1/{e['downscale']} of its side and back. Noisy: Gaussian noise of std {e['noise_std']} of "
             'the pixel range, clipped. GFLOPs per image at the training size (ratio to the original): torch\'s '
             "FlopCounterMode of the original plus plan()'s estimate of each change. Latency: median ms at batch "
             f"{lat['batch_size']}, {lat['image_size']} px, {lat['threads']} threads, each arm interleaved with the "
             'original in one run (ratio to it); onnxruntime runs the custom-node file with the native kernel and '
             'the decomposed file (the same graph where the arm has no DPP layer).', '']
    for name in plan['settings']:
        lines += _setting_table(record, name) + ['']
    return '\n'.join(lines).rstrip()


# ---------------------------------------------------------------------------------------------------------------
# command line

def add_parser(sub) -> None:
    """The ``versus`` subcommand of ``python -m dpp_surgery.experiments``."""
    from .conversion_study import add_amp

    p = sub.add_parser('versus', help='DPP against BlurPool, average and max pooling and S3DPP at the same places; '
                                      'resumable')
    p.add_argument('--settings', nargs='+', choices=list(SETTINGS), default=list(SETTINGS),
                   help='which settings (default both)')
    p.add_argument('--arms', nargs='+', metavar='ARM',
                   help='only these arms besides the original (default all of each setting)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    p.add_argument('--test-subset', type=int, default=2000, help='test images (0 = all 10000)')
    p.add_argument('--subset-seed', type=int, default=0, help='the draw of the subsets, the same for every run')
    for key, kind in (('train_subset', int), ('epochs', int), ('batch_size', int), ('lr', float)):
        p.add_argument(f"--{key.replace('_', '-')}", type=kind, help="replaces every setting's budget value (default "
                                                                   'the setting\'s: see SETTINGS)')
    p.add_argument('--img-size', dest='img_size', type=int, help="replaces every setting's image size")
    p.add_argument('--dpp-lr-scale', type=float, default=10.0)
    p.add_argument('--max-shift', type=int, default=4, help='shift consistency: shifts of up to N px (default 4)')
    p.add_argument('--downscale', type=int, default=2, help='the degraded test set: 1/N of the side and back')
    p.add_argument('--noise-std', type=float, default=0.1, help='the noisy test set: noise std in pixel range')
    p.add_argument('--latency-size', type=int, default=224)
    p.add_argument('--latency-batch', type=int, default=1)
    p.add_argument('--latency-repeat', type=int, default=20)
    p.add_argument('--skip-costs', action='store_true', help='train only; the costs are measured on a later run')
    p.add_argument('--threads', type=int, default=2)
    add_amp(p)
    p.add_argument('--output', default='results/versus')
    p.add_argument('--overwrite', action='store_true', help='start over, replacing versus.json/md in --output')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=versus)
