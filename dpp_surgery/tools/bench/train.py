"""``bench train``: training-step time of original and converted models."""
from __future__ import annotations

import os
import sys
from typing import Callable, List

os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # keep the profiler's start/stop chatter out of the tables

import torch
import torch.nn.functional as F

from ...timing import device_description, interleaved_medians
from .common import check, checks_text

TRAIN_MODELS = ('resnet18', 'resnet50', 'efficientnet_lite0')


# 'auto' may not be slower than float32 by more than this (timing noise of one run on a shared machine)
AMP_NOISE = 0.05


# converted / original training-step time may exceed the FLOP ratio by at most this factor
TRAIN_FLOP_SLACK = 1.1


def _train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp_dtype) -> Callable[[], None]:
    from ...layers import param_groups

    opt = torch.optim.SGD(param_groups(model, weight_decay=1e-4, lr=1e-3), momentum=0.9)

    def step():
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_train(args) -> dict:
    """Training-step time of original and converted models, in float32 and in the precision ``amp`` picks (for
    ``auto`` on a CPU with native bfloat16: the probe that ``finetune`` runs, per model).

    The record: ``machine``, ``precisions`` (``'MODEL original|converted AMP'`` -> what amp chose and why),
    ``rows`` (one per model and amp request: the precision each model ran as, ms, img/s, time and FLOP ratios,
    GFLOPs) and ``checks``. Sets ``args.amp`` (the requests timed, float32's ``'none'`` first) where missing."""
    import copy
    import warnings

    import timm

    from ...training.precision import probe_cpu_bf16, resolve_amp
    from ...surgery import ConversionPolicy, convert
    from ...zoo.runner import measure_cost

    from ...training.finetune import AMP_DTYPES

    device = torch.device(args.device)
    size, batch = args.size, args.batch
    if not hasattr(args, 'amp'):  # --amp/--no-amp and --amp-dtype: the precision requests to time, float32 first
        args.amp = ['none'] + ([AMP_DTYPES[d] for d in dict.fromkeys(args.amp_dtype)] if args.amp_on else [])
    rows, choices = [], {}
    for name in args.models:
        torch.manual_seed(0)
        models = {'original': timm.create_model(name, num_classes=10).train()}
        models['converted'] = copy.deepcopy(models['original'])
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            convert(models['converted'], input_size=(3, size, size))
        cost = measure_cost(models['original'], models['converted'], ConversionPolicy(), (3, size, size))  # (CPU)
        flop_ratio = cost['gflops']['converted'] / cost['gflops']['unconverted']
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        models = {k: m.to(device, memory_format=fmt) for k, m in models.items()}
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch,), device=device)
        fns = {}
        for amp in args.amp:
            for which, model in models.items():
                probe = (lambda m=model: probe_cpu_bf16(m, x)) if device.type == 'cpu' else None
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter('always')
                    choice = resolve_amp(amp, device, probe=probe)
                for w in caught[:1]:
                    print(f'note: {w.message}', file=sys.stderr)
                choices[(name, which, amp)] = choice
                print(f'{name} {which} amp {amp}: {choice.description}', file=sys.stderr)
                fns[(which, amp)] = _train_step_fn(model, x, y, choice.dtype)
        times = interleaved_medians(fns, args.repeat, warmup=2, device=device)
        for amp in args.amp:
            t_orig, t_conv = times[('original', amp)], times[('converted', amp)]
            rows.append({'model': name, 'amp': amp, 'original_precision': choices[(name, 'original', amp)].amp,
                         'converted_precision': choices[(name, 'converted', amp)].amp, 'original_ms': t_orig,
                         'converted_ms': t_conv, 'original_img_s': batch / t_orig * 1e3,
                         'converted_img_s': batch / t_conv * 1e3, 'time_ratio': t_conv / t_orig,
                         'flop_ratio': flop_ratio, 'gflops': cost['gflops']})
            print(f'  {rows[-1]}', file=sys.stderr)
    return {'machine': device_description(device),
            'precisions': {f'{n} {w} {a}': c.to_dict() for (n, w, a), c in choices.items()},
            'rows': rows, 'checks': _train_checks(rows, args.models, args.amp)}


def _precision_name(amp: str) -> str:
    """The dtype an amp choice ('none', 'bf16', 'fp16') computes in, for tables."""
    from ...training.precision import PRECISION_NAMES
    return PRECISION_NAMES.get(amp, amp)


def _train_checks(rows: List[dict], models: List[str], amps: List[str]) -> List[dict]:
    """The targets of a run's rows: ``auto`` no slower than float32 (within :data:`AMP_NOISE`), where both were
    timed, and every converted / original time within :data:`TRAIN_FLOP_SLACK` of the FLOP ratio."""
    checks = []
    if 'auto' in amps and 'none' in amps:
        by = {(r['model'], r['amp']): r for r in rows}
        for name in models:
            auto, fp32 = by[(name, 'auto')], by[(name, 'none')]
            for which in ('original', 'converted'):
                a, f = auto[f'{which}_ms'], fp32[f'{which}_ms']
                checks.append(check(f'{name} {which}: auto ({_precision_name(auto[which + "_precision"])}) {a:.0f} ms '
                                    f'<= float32 {f:.0f} ms (+{100 * AMP_NOISE:.0f}% noise margin)',
                                    a <= f * (1 + AMP_NOISE)))
    for r in rows:
        checks.append(check(f"{r['model']} {r['amp']}: converted / original time {r['time_ratio']:.2f}x <= "
                            f"{TRAIN_FLOP_SLACK} x FLOP ratio {r['flop_ratio']:.2f}",
                            r['time_ratio'] <= TRAIN_FLOP_SLACK * r['flop_ratio']))
    return checks


def render_train(record: dict) -> str:
    """The Markdown of a ``bench train`` record: what was timed and how, the machine, the table, the targets."""
    s = record['settings']
    device = str(s['device']).split(':')[0]
    lines = [f"Training step (forward, backward, SGD step; median ms of {s['repeat']} interleaved runs), batch "
             f"{s['batch']}, {s['size']} px, {s['threads']} threads, {device}"
             f"{', channels_last' if s.get('channels_last') else ''}, random init, default policy. \"ran as\": the "
             'precision that amp chose for that model (auto: bfloat16 only where the CPU has it natively and a probe '
             "of the model measured it faster). GFLOPs: torch's FlopCounterMode of the original, plus the changes "
             'plan() estimates at the replaced sites.',
             '', f"Measured on: {record['machine']}.", '',
             '| model | amp | original ran as | original ms | original img/s | converted ran as | converted ms | '
             'converted img/s | converted / original time | FLOP ratio | time ratio / FLOP ratio |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in record['rows']:
        lines.append(f"| {r['model']} | {r['amp']} | {_precision_name(r['original_precision'])} | "
                     f"{r['original_ms']:.0f} | {r['original_img_s']:.0f} | "
                     f"{_precision_name(r['converted_precision'])} | {r['converted_ms']:.0f} | "
                     f"{r['converted_img_s']:.0f} | {r['time_ratio']:.2f}x | {r['flop_ratio']:.2f} | "
                     f"{r['time_ratio'] / r['flop_ratio']:.2f} |")
    if record['checks']:
        lines += ['', checks_text(record['checks'])]
    return '\n'.join(lines)
