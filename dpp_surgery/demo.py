"""The main job, ``python -m dpp_surgery.demo`` (``make demo``).

Pools a real photo (scikit-learn's CC-BY ``china.jpg``) by 4x with two stages of 2x2/stride-2 pooling: max,
average, and each DPP variant at its initialisation, prints a table of how much detail each keeps, and
writes the pooled images side by side as a PNG.

Detail is measured as the mean gradient magnitude (sum of absolute horizontal and vertical differences) of
the pooled image, relative to average pooling, which blurs the most. ``in window`` checks that each output
lies between the min and max of its window, a property of DPP.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .bench import machine_description
from .layers import DPP2d, kernel_status
from .photos import SAMPLE_PHOTOS, load_photo

__all__ = ['main', 'pooling_methods']


def pooling_methods(channels: int = 3) -> Dict[str, torch.nn.Module]:
    """Max and average pooling and the DPP variants, each 2x2/stride 2."""
    methods: Dict[str, torch.nn.Module] = {
        'MaxPool2d': torch.nn.MaxPool2d(2),
        'AvgPool2d': torch.nn.AvgPool2d(2),
    }
    for guide in ('lite', 'full'):
        for reward in ('sym', 'asym'):
            methods[f'DPP {guide}-{reward}'] = DPP2d(channels, guide=guide, reward=reward)
    methods['DPP lite-asym, init=max'] = DPP2d(channels, reward='asym', init='max')
    methods['DPP lite-sym, norm=none'] = DPP2d(channels, norm='none')
    return methods


def _detail(img: torch.Tensor) -> float:
    dx = (img[..., :, 1:] - img[..., :, :-1]).abs().mean()
    dy = (img[..., 1:, :] - img[..., :-1, :]).abs().mean()
    return (dx + dy).item()


def _in_window(x: torch.Tensor, y: torch.Tensor) -> bool:
    lo = -F.max_pool2d(-x, 2)
    hi = F.max_pool2d(x, 2)
    tol = 1e-6
    return bool(((y >= lo - tol) & (y <= hi + tol)).all())


def _save_grid(images: Dict[str, torch.Tensor], path: str) -> None:
    from PIL import Image, ImageDraw

    tiles = []
    for name, img in images.items():
        arr = (img[0].clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        tile = Image.fromarray(arr).resize((arr.shape[1] * 3, arr.shape[0] * 3), Image.NEAREST)
        canvas = Image.new('RGB', (tile.width, tile.height + 18), 'white')
        canvas.paste(tile, (0, 18))
        ImageDraw.Draw(canvas).text((4, 3), name, fill='black')
        tiles.append(canvas)
    cols = 4
    rows = (len(tiles) + cols - 1) // cols
    w, h = tiles[0].size
    grid = Image.new('RGB', (cols * w, rows * h), 'white')
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * w, (i // cols) * h))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m dpp_surgery.demo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--photo', default='china.jpg', choices=SAMPLE_PHOTOS, help='which sample photo')
    parser.add_argument('--out', default='demo_out', help='folder for the PNG (default demo_out)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads (default 2)')
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        photo = load_photo(args.photo)
    except RuntimeError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1

    kernel_status()  # build the fused kernel before anything is timed
    with torch.no_grad():  # and pay the custom op's one-time set-up (it imports torch._dynamo)
        DPP2d(photo.shape[1])(photo[..., :8, :8])
    print(f'Pooling {args.photo} {tuple(photo.shape[-2:])} by 4x (two 2x2/stride-2 stages)')
    print(f'machine: {machine_description()}\n')
    results = {}
    rows = []
    for name, pool in pooling_methods(photo.shape[1]).items():
        with torch.no_grad():
            t0 = time.perf_counter()
            half = pool(photo)
            out = pool(half)
            ms = (time.perf_counter() - t0) * 1e3
        results[name] = out
        rows.append((name, tuple(out.shape[-2:]), ms, _detail(out), _in_window(photo, half) and _in_window(half, out)))
    base = next(r[3] for r in rows if r[0] == 'AvgPool2d')
    print('| method | output | ms | detail vs AvgPool2d | in window |')
    print('|---|---|---|---|---|')
    for name, shape, ms, detail, ok in rows:
        print(f'| {name} | {shape[0]}x{shape[1]} | {ms:.1f} | {detail / base:.3f} | {"yes" if ok else "NO"} |')
    # a detailed crop, enlarged, for the figure
    h, w = photo.shape[-2:]
    crop = {k: v[..., v.shape[-2] // 4: v.shape[-2] // 4 + 48, v.shape[-1] // 3: v.shape[-1] // 3 + 64]
            for k, v in results.items()}
    path = os.path.join(args.out, 'pooling.png')
    _save_grid(crop, path)
    print(f'\nwrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
