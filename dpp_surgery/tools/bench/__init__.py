"""Benchmarks: ``python -m dpp_surgery.bench {layer,init,preserve,coverage,onnx,onnx-layer,runtimes,train} [options]``.

Every ratio is measured within one run on one machine; the machine is printed with the table. Targets are
reported as PASS/MISS lines, never asserted: timing on shared machines is noisy, so benchmarks are not tests.
``--record PATH`` writes the run's record (its measurements, command, machine, date and versions; see
:mod:`dpp_surgery.tools.bench.common`), from which the docs' results pages are made; ``--overwrite`` replaces one.
One module per benchmark: ``layer``, ``presets`` (init, preserve), ``coverage``, ``onnx_runtimes`` (onnx,
onnx-layer, runtimes), ``train``, ``triton_report``.

* ``layer``: median forward and forward+backward times of DPP2d variants against AvgPool2d(2,2),
  MaxPool2d(2,2) and MaxPool2d(3,2,1), in NCHW and channels_last, and the peak extra memory of a
  training step as a multiple of the input's bytes. ``--device cuda`` times the Triton kernels against the pools
  and the PyTorch path (eager and under torch.compile) in float32 and bfloat16 with CUDA events, and adds the
  forward's achieved memory bandwidth as a fraction of the GPU's peak. ``--compile`` (the default on CUDA) also
  times the PyTorch path under torch.compile for the Lite and the Full guide, each in the form it runs there for
  tiling windows (pooled for Lite, stacked for Full) and in the other form, with the ratio of the two.
* ``init``: how close each init preset is to average and max pooling, on random and real-photo input.
* ``onnx``: latency of original and converted resnet18/resnet50/efficientnet_lite0 in torch eager and onnxruntime
  (decomposed file, custom file with the native kernel, custom file run by its ONNX functions), the share of
  onnxruntime time in DPP2d nodes (onnxruntime's profiler), and each file's node count, the decomposition's nodes
  per DPP layer and the export times; then the portable custom-op library (``dpp-surgery ort-library``) against a
  ``-march=native`` build of it on the same custom files (``--no-portable`` skips it).
* ``onnx-layer``: one DPP layer (the ResNet stem's 3x3/s2/p1 and a 2x2 layer) in onnxruntime: the native kernel,
  the decomposition as written and split into channel groups, at batch 1 and 8, checked against PyTorch; then
  element-wise operators (Exp, Log, Pow, ...) alone on the layer's unfolded windows.
* ``runtimes``: the original's and the converted model's decomposed files in onnxruntime, OpenVINO and tract (and
  onnxruntime's custom file), checked against PyTorch: latency, decomposed / original against the FLOP ratio.
* ``train``: training-step time and images/s of original and converted resnet18/resnet50/efficientnet_lite0 in
  float32 and in the precision ``amp='auto'`` picks on this machine, with the converted / original time ratio
  next to the FLOP ratio.
* ``coverage``: plan + convert + forward + backward on one small model of every timm family.
* ``preserve``: how close a converted ImageNet EfficientNet-Lite0 stays to the original before any fine-tuning
  (top-1 agreement and logit cosine similarity on real photos), for each placement and init preset.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional

os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # keep the profiler's start/stop chatter out of the tables

import torch

from ...export.runtimes import RUNTIMES
from ...surgery.policy import OPERATORS
from .common import record_meta, roundtrip
from .coverage import bench_coverage
from .layer import LAYER_DTYPES, bench_layer, peak_training_memory, render_layer
from .onnx_runtimes import (ONNX_MODELS, bench_onnx, bench_onnx_layer, bench_runtimes, render_onnx, render_onnx_layer,
                            render_runtimes)
from .presets import bench_init, bench_preserve, photo_views, preservation, render_init, render_preserve
from .train import TRAIN_MODELS, bench_train, render_train
from .triton_report import bench_triton_report, render_triton_report

__all__ = ['main', 'build_parser', 'RENDERERS', 'render', 'peak_training_memory', 'photo_views', 'preservation']

# subcommand -> the function that writes its Markdown from its record (coverage writes its CSV and prints as it goes)
RENDERERS: Dict[str, Callable[[dict], str]] = {
    'layer': render_layer, 'init': render_init, 'preserve': render_preserve, 'onnx': render_onnx,
    'onnx-layer': render_onnx_layer, 'runtimes': render_runtimes, 'train': render_train,
    'triton-report': render_triton_report,
}


def render(record: dict) -> str:
    """The Markdown of a benchmark's record (as ``python -m dpp_surgery.bench`` printed it), by its renderer."""
    name = record.get('benchmark')
    if name not in RENDERERS:
        raise ValueError(f'not a benchmark record with tables: benchmark {name!r}; known: {", ".join(RENDERERS)}')
    return RENDERERS[name](record)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m dpp_surgery.bench', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2, help='torch intra-op threads (default 2)')
    parser.add_argument('--record', '--json', dest='record', metavar='PATH',
                        help="also write the run's record (JSON: measurements, command, machine, date, versions) to "
                             'PATH, from which the docs are made (results/bench/NAME.json in this repository)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --record file')
    sub = parser.add_subparsers(dest='command', required=True)
    _add_layer_parsers(sub)
    _add_onnx_parsers(sub)
    _add_train_parsers(sub)
    return parser


# bench train's --amp of earlier versions took the precisions to time: value -> its --amp-dtype (none: float32,
# which is always timed)
_OLD_TRAIN_AMP = {'none': None, 'auto': 'auto', 'bf16': 'bfloat16', 'fp16': 'float16'}


def _upgrade_train_argv(argv: List[str]) -> List[str]:
    """``argv`` with bench train's ``--amp none auto bf16 ...`` of earlier versions rewritten as today's flags
    (``--amp-dtype auto bfloat16``, or ``--no-amp`` for ``--amp none``)."""
    if 'train' not in argv or '--amp' not in argv:
        return argv
    i = argv.index('--amp')
    j = i + 1
    while j < len(argv) and argv[j] in _OLD_TRAIN_AMP:
        j += 1
    if j == i + 1:
        return argv
    dtypes = [_OLD_TRAIN_AMP[v] for v in argv[i + 1:j] if _OLD_TRAIN_AMP[v]]
    return argv[:i] + (['--amp-dtype', *dtypes] if dtypes else ['--no-amp']) + argv[j:]


def main(argv: Optional[List[str]] = None) -> int:
    argv = _upgrade_train_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        print(f'error: --threads must be >= 1, but got {args.threads}', file=sys.stderr)
        return 2
    if args.record and os.path.exists(args.record) and not args.overwrite:  # before hours of measuring
        print(f'error: {args.record} exists; pass --overwrite to replace it', file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    meta = record_meta(argv)
    result = args.func(args)
    settings = {k: v for k, v in vars(args).items() if k not in ('func', 'record', 'overwrite', 'command')}
    record = roundtrip({'benchmark': args.command, 'meta': meta, 'settings': settings, **result})
    if args.command in RENDERERS:
        print(RENDERERS[args.command](record))
    if args.record:
        from ...utils import write_text
        write_text(args.record, json.dumps(record, indent=1) + '\n', overwrite=args.overwrite)
        print(f'wrote {args.record}', file=sys.stderr)
    return 0



def _add_layer_parsers(sub) -> None:
    """The subcommands of the layer: layer, init, preserve, coverage."""
    p = sub.add_parser('layer', help='speed and memory of DPP2d against max/average pooling')
    p.add_argument('--shape', type=int, nargs=4, metavar=('N', 'C', 'H', 'W'),
                   help='input shape (default 32 64 56 56 on the CPU, 32 256 56 56 on CUDA)')
    p.add_argument('--repeat', type=int, default=20, help='timed runs per measurement (default 20)')
    p.add_argument('--inner', type=int, help='calls per timed run (default 1 on the CPU, 10 on CUDA)')
    p.add_argument('--device', default='cpu', help='cpu or cuda (default cpu)')
    p.add_argument('--dtypes', nargs='+', choices=list(LAYER_DTYPES),
                   help='input dtypes (default float32 on the CPU, float32 bfloat16 on CUDA)')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='also time the PyTorch path under torch.compile (default: on CUDA only)')
    p.add_argument('--no-memory', action='store_true', help='skip the memory measurement')
    p.set_defaults(func=bench_layer)
    p = sub.add_parser('init', help='closeness of the init presets to average and max pooling')
    p.set_defaults(func=bench_init)
    p = sub.add_parser('preserve', help='how close converted EfficientNet-Lite0 stays to the original, per placement')
    p.add_argument('--size', type=int, default=224, help='input size (default 224)')
    p.set_defaults(func=bench_preserve)
    p = sub.add_parser('coverage', help='plan + convert + forward + backward on one small model of every timm family')
    p.add_argument('--size', type=int, default=96, help='input size for models without a fixed one (default 96)')
    p.add_argument('--csv', default='results/coverage.csv', help='CSV output path (default results/coverage.csv)')
    p.add_argument('--families', nargs='*', help='only these timm families (module names)')
    p.add_argument('--per-family', type=int, default=2,
                   help='models per family: the smallest of each architecture line, up to this many (default 2)')
    p.add_argument('--no-export', action='store_true', help='skip the ONNX export and parity columns')
    p.add_argument('--operator', choices=OPERATORS,
                   help="convert with this operator at every site (default: the policy's, dpp)")
    p.add_argument('--export-timeout', type=float, default=300,
                   help='seconds per model and mode for the export and its check before it counts as failed '
                        '(default 300)')
    p.set_defaults(func=bench_coverage)


def _add_onnx_parsers(sub) -> None:
    """The subcommands of the ONNX runtimes: onnx, onnx-layer, runtimes."""
    p = sub.add_parser('onnx', help='latency in torch eager and onnxruntime (decomposed, custom kernel), DPP share')
    p.add_argument('--models', nargs='+', default=list(ONNX_MODELS), help='timm models (default: %(default)s)')
    p.add_argument('--batches', type=int, nargs='+', default=[1, 8], help='batch sizes (default 1 8)')
    p.add_argument('--size', type=int, default=224, help='input size (default 224)')
    p.add_argument('--repeat', type=int, default=10, help='timed runs per measurement (default 10)')
    p.add_argument('--portable', action=argparse.BooleanOptionalAction, default=True,
                   help='also time the portable onnxruntime custom-op library (dpp-surgery ort-library) against a '
                        '-march=native build of it (default: on)')
    p.set_defaults(func=bench_onnx)
    p = sub.add_parser('onnx-layer', help='one DPP layer in onnxruntime: native kernel, decomposition, channel '
                                          'groups, element-wise operators')
    p.add_argument('--stem', type=int, nargs=2, default=[64, 112], metavar=('C', 'SIZE'),
                   help='channels and input size of the 3x3/s2/p1 layer (default 64 112: the ResNet stem)')
    p.add_argument('--tile', type=int, nargs=2, default=[128, 56], metavar=('C', 'SIZE'),
                   help='channels and input size of the 2x2 layer (default 128 56)')
    p.add_argument('--groups', type=int, nargs='+', default=[4, 8],
                   help='channel groups to split each layer into (default 4 8; divisors of the channels)')
    p.add_argument('--batches', type=int, nargs='+', default=[1, 8], help='batch sizes (default 1 8)')
    p.add_argument('--repeat', type=int, default=15, help='timed runs per measurement (default 15)')
    p.set_defaults(func=bench_onnx_layer)
    p = sub.add_parser('runtimes', help='the decomposed file in onnxruntime, OpenVINO and tract: latency against the '
                                        'original, checked against PyTorch')
    p.add_argument('--models', nargs='+', default=list(ONNX_MODELS), help='timm models (default: %(default)s)')
    p.add_argument('--runtimes', nargs='+', default=list(RUNTIMES), choices=RUNTIMES,
                   help='runtimes (default: %(default)s)')
    p.add_argument('--batches', type=int, nargs='+', default=[1, 8], help='batch sizes (default 1 8)')
    p.add_argument('--size', type=int, default=224, help='input size (default 224)')
    p.add_argument('--repeat', type=int, default=10, help='timed runs per measurement (default 10)')
    p.set_defaults(func=bench_runtimes)


def _add_train_parsers(sub) -> None:
    """The subcommands of training and the GPU kernels: train, triton-report."""
    p = sub.add_parser('train', help='training-step time of original and converted models, float32 and amp auto')
    p.add_argument('--models', nargs='+', default=list(TRAIN_MODELS), help='timm models (default: %(default)s)')
    p.add_argument('--img-size', dest='size', type=int, default=64, metavar='N', help='input size (default 64)')
    p.add_argument('--size', dest='size', type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument('-b', '--batch-size', dest='batch', type=int, default=32, help='batch size (default 32)')
    p.add_argument('--batch', dest='batch', type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument('--repeat', type=int, default=5, help='timed steps per measurement (default 5)')
    p.add_argument('--amp', dest='amp_on', action=argparse.BooleanOptionalAction, default=True,
                   help='also time mixed precision, in each dtype of --amp-dtype; --no-amp: float32 only (default '
                        'on; float32 is always timed)')
    p.add_argument('--amp-dtype', nargs='+', default=['auto'], choices=['auto', 'float16', 'bfloat16'],
                   help="autocast dtypes to time besides float32: auto (bfloat16 on a CPU only where it is native "
                        'and a probe of the model measured it faster; bfloat16, else float16, on GPU), float16, '
                        'bfloat16 (default auto)')
    p.add_argument('--device', default='cpu', help='device: cpu or cuda (default cpu)')
    p.add_argument('--channels-last', action='store_true', help='models and input in channels_last')
    p.set_defaults(func=bench_train)
    p = sub.add_parser('triton-report', help='registers, spills, shared memory and occupancy of the Triton kernels, '
                                             'compiled for sm_90/sm_80 without a GPU')
    p.add_argument('--arch', type=int, nargs='+', default=[90, 80], choices=[80, 90],
                   help='compute capabilities to compile for (default 90 80)')
    p.add_argument('--full', action='store_true',
                   help='every specialization (all norms and float16 too; default: norm mean, float32 and bfloat16)')
    p.add_argument('--covering', action='store_true', help='only a covering subset (what the default tests compile)')
    p.add_argument('--channels', type=int, default=256, help='channels the launcher tiles for (default 256)')
    p.add_argument('--jobs', type=int, default=1, help='compile in this many processes (default 1)')
    p.set_defaults(func=bench_triton_report)