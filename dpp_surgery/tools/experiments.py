"""Measured results: ``python -m dpp_surgery.experiments {fashion-mnist,paper}``.

* ``fashion-mnist``: fine-tunes ImageNet EfficientNet-Lite0 (offline weights) on Fashion-MNIST twice per seed with
  the same budget, unconverted and converted with the default policy, and writes the test accuracies as a Markdown
  table and JSON.
* ``paper``: the paper-style comparison. One small residual network (:mod:`dpp_surgery.zoo.smallnet`) is trained
  from scratch on Fashion-MNIST once per downsampling variant (strided conv, max, average, the four DPP variants)
  and seed, with the same budget for all; writes the test error (mean and spread over seeds), parameters and train
  time per epoch as ``paper.md`` and the per-run results as ``paper.json``. ``paper.md`` ends with findings computed
  from the runs: the ranking, and every variant against max and average pooling paired by seed.
* ``paper-table``: regenerates ``paper.md`` from ``paper.json`` (no training).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from typing import Dict, List, Optional

from ..utils import atomic_write, write_text
from .records import add_img_size, paired_differences, read_record, refuse_overwrite, t95

__all__ = ['main', 'build_parser', 'paper', 'paper_table', 'paired_differences', 'read_record', 'refuse_overwrite',
           't95']

PAPER_FILES = ('paper.md', 'paper.json')
# Fashion-MNIST training-set mean and std of the pixel values in [0, 1]
_FASHION_MEAN, _FASHION_STD = 0.2860, 0.3530
# --opt value -> how the table names it (timm's 'sgd' is SGD with Nesterov momentum)
_OPT_NAMES = {'sgd': 'SGD (Nesterov momentum 0.9)', 'adamw': 'AdamW'}


FASHION_FILES = ('fashion_mnist.md', 'fashion_mnist.json')


def fashion_mnist(args) -> dict:
    from ..timing import machine_description
    from ..training.finetune import FinetuneConfig, finetune

    refuse_overwrite(args.output, FASHION_FILES, args.overwrite)
    runs = []
    for seed in args.seeds:
        for converted in (False, True):
            name = f"{'dpp' if converted else 'original'}_seed{seed}"
            cfg = FinetuneConfig(
                model='efficientnet_lite0', pretrained_source='offline', convert=converted, img_size=args.image_size,
                train_subset=args.train_subset, test_subset=args.test_subset, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, dpp_lr_scale=args.dpp_lr_scale, seed=seed,
                output=os.path.join(args.output, name), overwrite=True, progress=not args.no_progress,
                threads=args.threads)
            print(f'== {name}', file=sys.stderr, flush=True)
            metrics = finetune(cfg)
            runs.append({'seed': seed, 'converted': converted, 'test_accuracy': metrics['test_accuracy'],
                         'best_test_accuracy': metrics['best_test_accuracy'],
                         'images_per_second': metrics['images_per_second'], 'amp': metrics['amp'],
                         'precision': metrics['precision']})
    command = 'python -m dpp_surgery.experiments fashion-mnist ' + ' '.join(sys.argv[2:] if len(sys.argv) > 2 else [])
    record = {'runs': runs, 'args': {k: v for k, v in vars(args).items() if k not in ('func', 'argv')},
              'machine': machine_description(), 'command': command.strip()}
    table = fashion_mnist_table(record)
    write_text(os.path.join(args.output, 'fashion_mnist.json'), json.dumps(record, indent=1) + '\n',
                 overwrite=args.overwrite)
    write_text(os.path.join(args.output, 'fashion_mnist.md'), table + '\n', overwrite=args.overwrite)
    print(table)
    return {'runs': runs}


def fashion_mnist_table(record: Dict[str, object]) -> str:
    """The markdown table of an ``experiments fashion-mnist`` record, with the precision each run trained in."""
    from ..training.precision import PRECISION_NAMES

    a, runs = record['args'], record['runs']
    lines = [f"Fine-tuning ImageNet EfficientNet-Lite0 on Fashion-MNIST ({a['train_subset'] or 60000} training "
             f"images, {a['epochs']} epoch(s), {a['image_size']} px, batch {a['batch_size']}, SGD lr {a['lr']}, "
             f"cosine; test on {a['test_subset'] or 10000} test images), seeds {', '.join(map(str, a['seeds']))}.",
             f"Command: `{record['command']}`", f"Machine: {record['machine']}.",
             'Precision: `--amp auto`, decided per run (bfloat16 autocast only where the CPU has it natively and a '
             'probe of the model measured it faster).', '',
             '| model | test accuracy per seed | mean | spread (max-min) | train images/s | trained in (per seed) |',
             '|---|---|---|---|---|---|']
    for converted in (False, True):
        mine = [r for r in runs if r['converted'] == converted]
        accs = [r['test_accuracy'] for r in mine]
        speed = statistics.mean(r['images_per_second'] for r in mine)
        label = 'converted (default policy)' if converted else 'original'
        ran = ', '.join(PRECISION_NAMES[r['amp']] for r in mine)
        lines.append(f"| {label} | {', '.join(f'{100 * x:.2f}%' for x in accs)} | {100 * statistics.mean(accs):.2f}% "
                     f"| {100 * (max(accs) - min(accs)):.2f} | {speed:.1f} | {ran} |")
    return '\n'.join(lines)


def _check_paper_args(args) -> None:
    from ..models.smallnet import DOWNSAMPLE_VARIANTS

    bad = [v for v in args.variants if v not in DOWNSAMPLE_VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {', '.join(bad)}; available: {', '.join(DOWNSAMPLE_VARIANTS)}")
    if len(set(args.variants)) != len(args.variants) or len(set(args.seeds)) != len(args.seeds):
        raise ValueError('--variants and --seeds must not repeat a value')
    for name in ('epochs', 'batch_size', 'threads'):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}")
    for name in ('train_subset', 'test_subset'):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 = the whole set), but got "
                             f'{getattr(args, name)}')
    if not args.lr > 0 or args.weight_decay < 0:
        raise ValueError(f'--lr must be > 0 and --weight-decay >= 0, but got {args.lr} and {args.weight_decay}')
    refuse_overwrite(args.output, PAPER_FILES, args.overwrite)


def _fashion_tensors(train_subset: int, test_subset: int):
    """Normalised float (N, 1, 28, 28) train/test images and labels; the subsets are fixed (not per seed)."""
    import torch

    from ..training.data import load_datasets

    data = load_datasets()

    def pick(ds, n: int, seed: int):
        images, labels = ds.images[:, :1], ds.labels  # the IDX loader repeats grey to 3 channels
        if n and n < len(labels):
            idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
            images, labels = images[idx], labels[idx]
        return (images.float() / 255.0 - _FASHION_MEAN) / _FASHION_STD, labels.clone()

    return pick(data.train, train_subset, 0), pick(data.test, test_subset, 1)


def _train_one(variant: str, seed: int, train, test, args) -> Dict[str, object]:
    """Train one :class:`~dpp_surgery.zoo.smallnet.SmallResNet` from scratch; returns its results."""
    import torch
    import torch.nn.functional as F
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from ..layers import DPP2d, param_groups
    from ..training.finetune import dpp_stats
    from ..models.smallnet import create_smallnet

    torch.manual_seed(seed)  # the same seed gives every variant the same conv, norm and head initialisation
    model = create_smallnet(variant, in_chans=1, num_classes=10)
    params = sum(p.numel() for p in model.parameters())
    opt_kwargs = {'momentum': 0.9} if args.opt == 'sgd' else {}
    optimizer = create_optimizer_v2(param_groups(model, weight_decay=args.weight_decay, lr=args.lr), opt=args.opt,
                                    lr=args.lr, weight_decay=args.weight_decay, **opt_kwargs)
    x_train, y_train = train
    steps_per_epoch = len(y_train) // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f'--train-subset {len(y_train)} is smaller than --batch-size {args.batch_size}')
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=args.epochs,
                                       updates_per_epoch=steps_per_epoch, step_on_epochs=False)
    epoch_seconds, train_losses, step = [], [], 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        bar = None
        if not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=steps_per_epoch, desc=f'{variant} seed {seed} epoch {epoch + 1}/{args.epochs}',
                       unit='batch', leave=False)
        loss_sum, t0 = 0.0, time.perf_counter()
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            loss_sum += loss.item()
            if bar is not None:
                bar.update(1)
        epoch_seconds.append(time.perf_counter() - t0)
        train_losses.append(loss_sum / steps_per_epoch)
        if bar is not None:
            bar.close()
    model.eval()
    x_test, y_test = test
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y_test), 1000):
            logits = model(x_test[i:i + 1000])
            loss_sum += F.cross_entropy(logits, y_test[i:i + 1000], reduction='sum').item()
            correct += (logits.argmax(-1) == y_test[i:i + 1000]).sum().item()
    return {'variant': variant, 'seed': seed, 'params': params,
            'dpp_params': sum(p.numel() for m in model.modules() if isinstance(m, DPP2d) for p in m.parameters()),
            'test_error': 100.0 * (1 - correct / len(y_test)), 'test_loss': loss_sum / len(y_test),
            'train_loss_per_epoch': train_losses, 'epoch_seconds': epoch_seconds,
            'dpp': dpp_stats(model)}


def _spread(values: List[float]) -> str:
    return f'{statistics.stdev(values):.2f}' if len(values) > 1 else 'n/a'


# the baselines every other variant is compared with, seed by seed, in the findings
_BASELINES = ('max', 'avg')
def _findings(runs: List[dict], variants: List[str]) -> List[str]:
    """Sentences computed from the runs: the ranking and each variant against max and average pooling."""
    means = {v: statistics.mean(r['test_error'] for r in runs if r['variant'] == v) for v in variants}
    ranking = sorted(variants, key=means.get)
    lines = ['Findings (computed from the runs above):',
             '- Ranking by mean test error, lowest first: ' + ', '.join(f'{v} ({means[v]:.2f}%)' for v in ranking)
             + '.']
    baselines = [b for b in _BASELINES if b in variants]
    # every variant against each baseline; a pair of baselines once
    pairs = [(v, b) for v in variants for b in baselines
             if v != b and not (v in baselines and baselines.index(v) < baselines.index(b))]
    if not pairs:
        return lines
    diffs = {pair: paired_differences(runs, *pair) for pair in pairs}
    if any(d is None for d in diffs.values()):
        return lines + ['- One seed only: no spread, so no difference between variants can be told apart from seed '
                        'noise; run more seeds.']
    verdicts: Dict[str, List[str]] = {}
    for (variant, baseline), d in diffs.items():
        word = ('lower' if d['mean'] < 0 else 'higher') if d['resolved'] else 'not resolved'
        verdicts.setdefault(word, []).append(f"{variant} vs {baseline} {d['mean']:+.2f} +/- {d['se']:.2f}")
    seeds = min(d['seeds'] for d in diffs.values())
    lines.append(f'- Paired by seed (difference of test error in points +/- its standard error over {seeds} '
                 f'seeds; resolved = a two-sided paired t-test at 95% tells it from zero, |t| > '
                 f'{t95(seeds - 1):.2f}):')
    for word, text in (('lower', 'resolved, lower error'), ('higher', 'resolved, higher error'),
                       ('not resolved', 'not resolved (within seed noise)')):
        if word in verdicts:
            lines.append(f'  - {text}: ' + '; '.join(verdicts[word]) + '.')
    dpp = [v for v in variants if v.startswith('dpp_')]
    better = [v for v in dpp if all(diffs[v, b]['resolved'] and diffs[v, b]['mean'] < 0 for b in baselines)]
    if dpp and baselines:
        lines.append(f'- DPP variants with a resolved lower error than both {" and ".join(baselines)} pooling: '
                     + (', '.join(better) if better else 'none at this budget') + '.')
    return lines


def paper_table(record: Dict[str, object]) -> str:
    """``paper.md`` from a ``paper.json`` record: the setting, the table and the computed findings."""
    runs, args = record['runs'], record['args']
    n_train, n_test = runs[0]['n_train'], runs[0]['n_test']
    lines = [
        'Downsampling comparison in one small residual network (stem, 3 stages of 2 BasicBlocks, widths 16/32/64, '
        'two 2x downsampling steps; only the downsampling operator differs), trained from scratch on Fashion-MNIST.',
        f"Budget, the same for every run: {n_train} training images (a fixed subset), {args['epochs']} epoch(s), "
        f"batch {args['batch_size']}, {_OPT_NAMES[args['opt']]} lr {args['lr']}, weight decay "
        f"{args['weight_decay']} (none on biases, norms and DPP parameters), cosine schedule per step, no "
        f"augmentation; test error on {n_test} test images after the last epoch; seeds "
        f"{', '.join(map(str, args['seeds']))} (a seed fixes the initialisation and the batch order, the same for "
        'every variant).',
        f"Command: `{record['command']}`",
        f"Machine: {record['machine']}. Total wall time {record['wall_seconds']:.0f} s"
        + ('.' if record.get('load_average_1min') is None else
           f"; mean 1-minute load average after each run {record['load_average_1min']:.1f} (the time column counts "
           'whatever else ran on the machine).'),
        '',
        '| downsampling | params | test error % (mean) | std | min-max | per seed | train s/epoch |',
        '|---|---|---|---|---|---|---|',
    ]
    for variant in args['variants']:
        rs = [r for r in runs if r['variant'] == variant]
        errs = [r['test_error'] for r in rs]
        secs = statistics.mean(s for r in rs for s in r['epoch_seconds'])
        lines.append(f"| {variant} | {rs[0]['params']:,} | {statistics.mean(errs):.2f} | {_spread(errs)} | "
                     f"{min(errs):.2f}-{max(errs):.2f} | {', '.join(f'{e:.2f}' for e in errs)} | {secs:.1f} |")
    lines += [''] + _findings(runs, args['variants'])
    return '\n'.join(lines)


def paper_table_cmd(args) -> dict:
    """Regenerate ``paper.md`` from the ``paper.json`` next to it (no training)."""
    record = read_record(os.path.join(args.output, 'paper.json'), 'paper', args.output)
    table = paper_table(record)
    # paper.md is derived from paper.json, so regenerating it replaces it
    write_text(os.path.join(args.output, 'paper.md'), table + '\n', overwrite=True)
    print(table)
    return record


def paper(args) -> dict:
    """Train every variant for every seed with one budget and write ``paper.md`` and ``paper.json``."""
    import torch

    from ..timing import machine_description

    _check_paper_args(args)
    torch.set_num_threads(args.threads)
    machine = machine_description()
    train, test = _fashion_tensors(args.train_subset, args.test_subset)
    runs, t_start = [], time.perf_counter()
    loads = []
    for seed in args.seeds:  # seeds outermost: load drift on a shared machine spreads over all variants
        for variant in args.variants:
            print(f'== {variant} seed {seed}', file=sys.stderr, flush=True)
            result = _train_one(variant, seed, train, test, args)
            result.update(n_train=len(train[1]), n_test=len(test[1]))
            if hasattr(os, 'getloadavg'):
                loads.append(os.getloadavg()[0])
            print(f"   test error {result['test_error']:.2f}%, {statistics.mean(result['epoch_seconds']):.1f} s/epoch",
                  file=sys.stderr, flush=True)
            runs.append(result)
    wall = time.perf_counter() - t_start
    command = 'python -m dpp_surgery.experiments ' + shlex.join(args.argv)
    record = {'runs': runs, 'args': {k: v for k, v in vars(args).items() if k not in ('func', 'argv')},
              'command': command, 'machine': machine, 'wall_seconds': wall,
              # the time column means little on a busy machine: record how busy it was
              'load_average_1min': statistics.mean(loads) if loads else None}
    table = paper_table(record)
    write_text(os.path.join(args.output, 'paper.json'), json.dumps(record, indent=1) + '\n',
                 overwrite=args.overwrite)
    write_text(os.path.join(args.output, 'paper.md'), table + '\n', overwrite=args.overwrite)
    print(table)
    return record


# the studies whose table study-table regenerates -> the stem of their files
STUDY_STEMS = {'placement': 'placement', 'heal': 'heal', 'dpp-params': 'dpp_params', 'versus': 'versus'}


def _study_tables() -> Dict[str, tuple]:
    """study -> (the stem of its files, the table of its record)."""
    from .conversion_study import dpp_params_table, heal_table, placement_table
    from .versus_study import versus_table

    tables = {'placement': placement_table, 'heal': heal_table, 'dpp-params': dpp_params_table,
              'versus': versus_table}
    return {study: (STUDY_STEMS[study], tables[study]) for study in STUDY_STEMS}


def study_table(args) -> dict:
    """Regenerate a study's Markdown table (and heal's figure) from the JSON record in ``--output``, no training:
    the table is derived from the record, so it is replaced."""
    from .conversion_study import heal_figure

    stem, make = _study_tables()[args.study]
    src = os.path.join(args.output, f'{stem}.json')
    record = read_record(src, args.study, args.output)
    try:
        table = make(record)
        figure = heal_figure(record) if args.study == 'heal' else None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise ValueError(f'{src} is not a record of `experiments {args.study}` ({type(e).__name__}: {e}); rerun '
                         f'`python -m dpp_surgery.experiments {args.study} --output {args.output}`') from None
    if figure is not None:
        atomic_write(os.path.join(args.output, 'heal.png'), lambda tmp: figure.savefig(tmp, dpi=100, format='png'),
                     overwrite=True)
    write_text(os.path.join(args.output, f'{stem}.md'), table + '\n', overwrite=True)
    print(table)
    return record


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m dpp_surgery.experiments`` (its commands and the conversion study's)."""
    parser = argparse.ArgumentParser(prog='python -m dpp_surgery.experiments', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('fashion-mnist', help='original vs converted EfficientNet-Lite0 fine-tuned on Fashion-MNIST')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--train-subset', type=int, default=10000)
    p.add_argument('--test-subset', type=int, default=2000)
    p.add_argument('--epochs', type=int, default=1)
    add_img_size(p, 64)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=0.02)
    p.add_argument('--dpp-lr-scale', type=float, default=10.0)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--output', default='results/fashion_mnist')
    p.add_argument('--overwrite', action='store_true', help='replace fashion_mnist.md/json in --output')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=fashion_mnist)

    from ..models.smallnet import DOWNSAMPLE_VARIANTS
    p = sub.add_parser('paper', help='downsampling variants in one small ResNet trained from scratch on Fashion-MNIST')
    p.add_argument('--variants', nargs='+', default=list(DOWNSAMPLE_VARIANTS), choices=DOWNSAMPLE_VARIANTS,
                   metavar='VARIANT', help=f"downsampling variants (default: all: {', '.join(DOWNSAMPLE_VARIANTS)})")
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4],
                   help='seeds (default 0 to 4: a paired t-test over seeds needs a few to resolve anything)')
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--train-subset', type=int, default=10000, help='training images (0 = all 60000)')
    p.add_argument('--test-subset', type=int, default=0, help='test images (0 = all 10000)')
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('--opt', default='sgd', choices=['sgd', 'adamw'],
                   help="timm optimizer: 'sgd' (Nesterov momentum 0.9, the default) or 'adamw'")
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--weight-decay', type=float, default=1e-4)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--output', default='zoo/paper')
    p.add_argument('--overwrite', action='store_true', help='replace paper.md/paper.json in --output')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=paper)
    p = sub.add_parser('paper-table', help='regenerate paper.md (table and findings) from paper.json, no training')
    p.add_argument('--output', default='zoo/paper', help='folder holding paper.json (default zoo/paper)')
    p.set_defaults(func=paper_table_cmd)
    from .conversion_study import add_parsers
    from .versus_study import add_parser
    add_parsers(sub)
    add_parser(sub)
    p = sub.add_parser('study-table', help="regenerate a study's Markdown table (heal: and its figure) from its "
                                           'JSON record, no training')
    p.add_argument('study', choices=list(STUDY_STEMS))
    p.add_argument('--output', required=True, help='the folder holding the JSON record (for example results/heal)')
    p.set_defaults(func=study_table)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    from ..cli import upgrade_argv
    from ..training.finetune import amp_mode

    args = parser.parse_args(upgrade_argv(list(sys.argv[1:] if argv is None else argv)))
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if isinstance(getattr(args, 'amp', None), bool):  # --amp/--no-amp, --amp-dtype: the request the records keep
        args.amp = amp_mode(args.amp, args.amp_dtype)
    from ..utils import run_command

    def run(a: argparse.Namespace) -> int:
        a.func(a)  # the commands return their record; success is 0
        return 0

    return run_command(run, args, 'dpp_surgery.experiments')


if __name__ == '__main__':
    sys.exit(main())
