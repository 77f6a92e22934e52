"""Measured fine-tuning results: ``python -m dpp_surgery.experiments fashion-mnist``.

Fine-tunes ImageNet EfficientNet-Lite0 (offline weights) on Fashion-MNIST twice per seed with the same budget,
unconverted and converted with the default policy, and writes the test accuracies as a Markdown table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import List, Optional

__all__ = ['main']


def fashion_mnist(args) -> dict:
    from .bench import machine_description
    from .train import FinetuneConfig, finetune

    runs = []
    for seed in args.seeds:
        for converted in (False, True):
            name = f"{'dpp' if converted else 'original'}_seed{seed}"
            cfg = FinetuneConfig(
                model='efficientnet_lite0', pretrained='offline', convert=converted, image_size=args.image_size,
                train_subset=args.train_subset, test_subset=args.test_subset, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, dpp_lr_scale=args.dpp_lr_scale, seed=seed,
                output=os.path.join(args.output, name), overwrite=True, progress=not args.no_progress,
                threads=args.threads)
            print(f'== {name}', file=sys.stderr, flush=True)
            metrics = finetune(cfg)
            runs.append({'seed': seed, 'converted': converted, 'test_accuracy': metrics['test_accuracy'],
                         'best_test_accuracy': metrics['best_test_accuracy'],
                         'images_per_second': metrics['images_per_second']})
    command = 'python -m dpp_surgery.experiments fashion-mnist ' + ' '.join(sys.argv[2:] if len(sys.argv) > 2 else [])
    lines = [f'Fine-tuning ImageNet EfficientNet-Lite0 on Fashion-MNIST ({args.train_subset or 60000} training '
             f'images, {args.epochs} epoch(s), {args.image_size} px, batch {args.batch_size}, SGD lr {args.lr}, '
             f'cosine; test on {args.test_subset or 10000} test images), seeds {", ".join(map(str, args.seeds))}.',
             f'Command: `{command.strip()}`', f'Machine: {machine_description()}.', '',
             '| model | test accuracy per seed | mean | spread (max-min) | train images/s |', '|---|---|---|---|---|']
    for converted in (False, True):
        accs = [r['test_accuracy'] for r in runs if r['converted'] == converted]
        speed = statistics.mean(r['images_per_second'] for r in runs if r['converted'] == converted)
        label = 'converted (default policy)' if converted else 'original'
        lines.append(f"| {label} | {', '.join(f'{100 * a:.2f}%' for a in accs)} | {100 * statistics.mean(accs):.2f}% "
                     f"| {100 * (max(accs) - min(accs)):.2f} | {speed:.1f} |")
    table = '\n'.join(lines)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, 'fashion_mnist.md'), 'w') as f:
        f.write(table + '\n')
    with open(os.path.join(args.output, 'fashion_mnist.json'), 'w') as f:
        json.dump({'runs': runs, 'args': {k: v for k, v in vars(args).items() if k != 'func'},
                   'machine': machine_description()}, f, indent=1)
    print(table)
    return {'runs': runs}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m dpp_surgery.experiments', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('fashion-mnist', help='original vs converted EfficientNet-Lite0 fine-tuned on Fashion-MNIST')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--train-subset', type=int, default=10000)
    p.add_argument('--test-subset', type=int, default=2000)
    p.add_argument('--epochs', type=int, default=1)
    p.add_argument('--image-size', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=0.02)
    p.add_argument('--dpp-lr-scale', type=float, default=10.0)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--output', default='results/fashion_mnist')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=fashion_mnist)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
