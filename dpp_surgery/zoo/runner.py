"""The zoo runner: ``python -m dpp_surgery.zoo {list,run,table}``.

* ``run NAME``: fine-tunes the recipe's architecture twice with the same budget, unconverted and converted (the
  registered ``<arch>_dpp`` model, so with the recipe's weights and policy), then measures both fine-tuned models:
  test accuracy, parameters, GFLOPs and latency (batch 1, 224 px, 2 threads by default) in PyTorch eager and in
  onnxruntime for every export mode of :data:`dpp_surgery.export.SUPPORTED_MODES`. The results (with the command
  line, the machine and the date) go to ``OUTPUT/NAME.json``, a copy of the recipe with its ``results`` section
  filled in; the recipe in the zoo folder itself is written only with ``--write`` (or when ``--output`` is the zoo
  folder). ``--quick`` runs a tiny smoke-test budget.
* ``table``: regenerates ``zoo/README.md`` from the recipes (and appends ``zoo/paper/paper.md`` if it exists), and the
  results block of the documentation's zoo page, ``docs/results/zoo.md`` (between :data:`README_BEGIN` and
  :data:`README_END`), if it has one.
* ``list``: the recipes and whether they have results.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..utils import first_line, write_text
from .registry import Recipe, default_zoo_dir, get_recipe, load_recipes, pretrained_tag, register_recipe

__all__ = ['run_recipe', 'render_table', 'render_readme_block', 'write_table', 'write_results', 'main',
           'QUICK_FINETUNE', 'DEFAULT_OUTPUT']

DEFAULT_OUTPUT = os.path.join('runs', 'zoo')
# the smoke-test budget of --quick: a few optimizer steps on tiny subsets, few timed runs
QUICK_FINETUNE = {'train_subset': 64, 'test_subset': 64, 'img_size': 32, 'batch_size': 16, 'epochs': 1,
                  'max_steps': 2}
QUICK_REPEAT = 3
README = 'README.md'
# the documentation page, next to the zoo folder, that holds the zoo's results block
RESULTS_PAGE = os.path.join('docs', 'results', 'zoo.md')
PAPER_MD = os.path.join('paper', 'paper.md')
_NOT_RUN = 'not run'


# ---------------------------------------------------------------------------------------------------------------
# running a recipe

def _init_description(recipe: Recipe) -> str:
    if recipe.random_init:
        return 'random init (ImageNet weights unavailable offline)'
    if recipe.weight_source == 'offline':
        return 'ImageNet (offline weights)'
    return "ImageNet (timm's weights)"


def _finetune_configs(recipe: Recipe, quick: bool, work_dir: str, threads: int, progress: bool):
    """FinetuneConfigs of the unconverted and the converted run, identical but for the model."""
    from ..training.finetune import FinetuneConfig

    settings = dict(recipe.finetune)
    if quick:
        settings.update(QUICK_FINETUNE)
    pretrained = settings.pop('pretrained', True)
    source = settings.pop('pretrained_source', 'auto')
    common = dict(settings, data=recipe.data.get('path'), convert=False, overwrite=True, progress=progress,
                  threads=threads, pretrained=pretrained)
    unconverted = FinetuneConfig(model=recipe.architecture, pretrained_source=source,
                                 output=os.path.join(work_dir, 'unconverted'), **common)
    # the registered <arch>_dpp model: the recipe's original weights (through timm) converted with its policy
    converted = FinetuneConfig(model=recipe.name, pretrained_source='timm', output=os.path.join(work_dir, 'converted'),
                               **common)
    return unconverted, converted


def _site_flops_delta(model: nn.Module, policy, input_size: Tuple[int, int, int]) -> Tuple[int, int]:
    """FLOPs that conversion adds (plan's estimates at its sites) and the number of replaced sites. Pools are not
    counted by torch's FLOP counter, so a replaced pool adds its DPP FLOPs and removes nothing."""
    from ..surgery import plan

    p = plan(model, input_size=input_size, policy=policy)
    delta = 0
    for site in p.to_replace:
        counted_before = 0 if site.kind in ('max_pool', 'avg_pool', 'global_pool') else site.flops_before
        delta += site.flops_after - counted_before
    return delta, len(p.to_replace)


def measure_cost(unconverted: nn.Module, converted: nn.Module, policy, input_size: Tuple[int, int, int]) -> dict:
    """Parameters of both models and their GFLOPs for one image of ``input_size``.

    GFLOPs: torch's FlopCounterMode (convolutions and matrix products, a multiply-add counted as 2) of the
    unconverted model; for the converted one, plus the change that :func:`dpp_surgery.plan` estimates at the
    replaced sites (DPP at ``DPP_FLOPS_PER_ELEMENT`` per window element, block convs measured at stride 1).
    """
    from ..surgery.plan import flops_of

    base = flops_of(unconverted, (1, *input_size), torch.float32, torch.device('cpu'))
    delta, replaced = _site_flops_delta(unconverted, policy, input_size)
    return {
        'params': {'unconverted': sum(p.numel() for p in unconverted.parameters()),
                   'converted': sum(p.numel() for p in converted.parameters())},
        'gflops': {'unconverted': base / 1e9, 'converted': (base + delta) / 1e9, 'input_size': list(input_size)},
        'replaced_sites': replaced,
    }


def measure_latency(unconverted: nn.Module, converted: nn.Module, settings: Dict[str, int], work_dir: str,
                    repeat: int) -> dict:
    """Median latency (ms) of both models in PyTorch eager and in onnxruntime.

    PyTorch runs are timed first, interleaved (unconverted, converted, ...); then the onnxruntime sessions,
    interleaved among themselves, so that no onnxruntime thread pool is alive while PyTorch is timed. The
    unconverted model is exported once (it has no DPP layer, so every mode writes the same graph); the converted
    model once per mode of ``SUPPORTED_MODES``. A mode whose export or session fails is recorded with its error
    instead of a time. The ONNX files have a fixed input shape (the timed one).
    """
    from ..timing import interleaved_medians
    from ..export.onnx import SUPPORTED_MODES, export_onnx, onnx_session

    threads = settings['threads']
    torch.set_num_threads(threads)
    # timings on a busy machine mean little (and 2 OpenMP threads on 2 busy cores stall): record the load
    load_average = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
    x = torch.randn(settings['batch_size'], 3, settings['image_size'], settings['image_size'],
                    generator=torch.Generator().manual_seed(0))
    models = {'unconverted': unconverted.eval(), 'converted': converted.eval()}
    with torch.no_grad():
        refs = {k: m(x) for k, m in models.items()}

    def torch_fn(model: nn.Module) -> Callable[[], object]:
        def fn():
            with torch.no_grad():
                return model(x)
        return fn

    torch_ms = interleaved_medians({k: torch_fn(m) for k, m in models.items()}, repeat)
    fns: Dict[str, Callable[[], object]] = {}
    errors: Dict[str, str] = {}
    max_rel_error: Dict[str, float] = {}
    targets = [('unconverted', SUPPORTED_MODES[0])] + [('converted', mode) for mode in SUPPORTED_MODES]
    os.makedirs(work_dir, exist_ok=True)
    for which, mode in targets:
        key = 'unconverted' if which == 'unconverted' else f'converted/{mode}'
        path = os.path.join(work_dir, f'{which}_{mode}.onnx')
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # exporter chatter; failures raise
                export_onnx(models[which], path, mode=mode, example_input=x, dynamic=False, overwrite=True)
            session = onnx_session(path, threads=threads, spin=False)  # timed in turn
            feed = {session.get_inputs()[0].name: x.numpy()}
            out = torch.from_numpy(session.run(None, feed)[0])
        except Exception as e:  # noqa: BLE001 - recorded per mode; the other modes still run
            first = first_line(e, '')
            errors[key] = f'{type(e).__name__}: {first}'[:300]
            continue
        ref = refs[which]
        max_rel_error[key] = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        fns[key] = (lambda s=session, f=feed: s.run(None, f))
    ort_ms = interleaved_medians(fns, repeat) if fns else {}
    result = {
        **settings, 'repeat': repeat, 'load_average_1min': load_average,
        'torch_ms': torch_ms,
        'onnxruntime_ms': {'unconverted': ort_ms.get('unconverted'),
                           'converted': {mode: ort_ms.get(f'converted/{mode}') for mode in SUPPORTED_MODES}},
        'onnx_max_rel_error': max_rel_error,
        'errors': errors,
    }
    if 'custom' in SUPPORTED_MODES:
        from ..native.ort_kernel import ort_kernel_status
        status = ort_kernel_status()
        # what ran the custom nodes: the native kernel, or the decomposition the file carries
        result['custom_mode_kernel'] = 'native' if status['loaded'] else f'decomposition ({status["error"]})'
    return result


def write_results(recipe: Recipe, results: Dict[str, Any], path: str) -> str:
    """Write ``recipe`` with ``results`` as its results section to ``path`` (JSON, atomically); returns ``path``."""

    data = copy.deepcopy(recipe.raw)
    data['results'] = results
    write_text(path, json.dumps(data, indent=2) + '\n', overwrite=True)
    return path


def _same_dir(a: str, b: str) -> bool:
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def run_recipe(
        name: str,
        zoo_dir: Optional[str] = None,
        quick: bool = False,
        output: str = DEFAULT_OUTPUT,
        write: bool = False,
        work_dir: Optional[str] = None,
        threads: int = 2,
        progress: bool = True,
        command: Optional[str] = None,
        reuse: bool = False,
) -> Dict[str, Any]:
    """Run recipe ``name`` (see the module docstring) and return its results section.

    Args:
        name: recipe name (``<arch>_dpp``).
        zoo_dir: the recipes' folder (default :func:`~dpp_surgery.zoo.registry.default_zoo_dir`).
        quick: the tiny smoke-test budget (:data:`QUICK_FINETUNE`, few timed runs) instead of the recipe's.
        output: folder for ``NAME.json`` (the recipe with results). When it is the zoo folder, that file is the
            recipe itself.
        write: also write the results into the recipe in ``zoo_dir``.
        work_dir: folder for the fine-tuning runs and ONNX files (default ``OUTPUT/NAME``, or ``runs/zoo/NAME``
            when ``output`` is the zoo folder).
        threads: torch threads for fine-tuning.
        progress: show progress bars.
        command: the command line recorded with the results (default: this process's).
        reuse: take the accuracy of a finished fine-tuning run with the same settings in ``work_dir`` instead of
            fine-tuning again (to re-measure cost and latency, for example on a quiet machine).
    """
    zoo_dir = zoo_dir or default_zoo_dir()
    recipe = get_recipe(name, zoo_dir)
    register_recipe(recipe)
    if threads < 1:
        raise ValueError(f'threads must be >= 1, but got {threads}')
    os.makedirs(output, exist_ok=True)
    output_is_zoo = _same_dir(output, zoo_dir)
    if work_dir is None:
        work_dir = os.path.join(DEFAULT_OUTPUT if output_is_zoo else output, name)
    if command is None:
        command = 'python -m dpp_surgery.zoo ' + shlex.join(sys.argv[1:])
    previous_threads = torch.get_num_threads()
    try:
        return _run(recipe, quick, output, output_is_zoo, write, work_dir, threads, progress, command, reuse)
    finally:
        torch.set_num_threads(previous_threads)


# FinetuneConfig fields that do not change what a run computes (only how it is shown or how fast it goes)
_NON_RESULT_FIELDS = ('progress', 'overwrite', 'resume', 'threads', 'workers')


def _finished_run(cfg) -> Optional[Dict[str, Any]]:
    """The final metrics of a finished fine-tuning run with the same settings in ``cfg.output``, else None (a
    ``config.json`` of an earlier version is read with its old names, :func:`upgrade_config`)."""
    from ..training.finetune import upgrade_config

    try:
        with open(os.path.join(cfg.output, 'config.json')) as f:
            previous = upgrade_config(json.load(f))
        with open(os.path.join(cfg.output, 'metrics.jsonl')) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, AttributeError):  # (json.JSONDecodeError is a ValueError)
        return None
    current = cfg.to_dict()
    same = all(previous.get(k) == v for k, v in current.items() if k not in _NON_RESULT_FIELDS)
    done = lines and (lines[-1]['epoch'] == cfg.epochs or (cfg.max_steps and lines[-1]['step'] >= cfg.max_steps))
    if not same or not done or not os.path.isfile(os.path.join(cfg.output, 'last.safetensors')):
        return None
    return lines[-1]


def _run(recipe: Recipe, quick: bool, output: str, output_is_zoo: bool, write: bool, work_dir: str, threads: int,
         progress: bool, command: str, reuse: bool) -> Dict[str, Any]:
    from ..version import __version__
    from ..checkpoint import load
    from ..timing import machine_description
    from ..training.finetune import finetune

    name = recipe.name
    t0 = time.time()
    torch.set_num_threads(threads)
    cfg_u, cfg_c = _finetune_configs(recipe, quick, work_dir, threads, progress)
    metrics, reused = {}, {}
    for label, cfg in (('unconverted', cfg_u), ('converted', cfg_c)):
        previous = _finished_run(cfg) if reuse else None
        reused[label] = previous is not None
        if previous is not None:
            print(f'== {name}: reusing the finished fine-tuning run in {cfg.output}', file=sys.stderr, flush=True)
            metrics[label] = previous
            continue
        print(f'== {name}: fine-tuning the {label} model ({cfg.model})', file=sys.stderr, flush=True)
        metrics[label] = finetune(cfg)
    models = {label: load(os.path.join(cfg.output, 'last.safetensors')) for label, cfg in
              (('unconverted', cfg_u), ('converted', cfg_c))}
    settings = recipe.latency_settings()
    input_size = (3, settings['image_size'], settings['image_size'])
    print(f'== {name}: parameters, GFLOPs and latency at {input_size}', file=sys.stderr, flush=True)
    cost = measure_cost(models['unconverted'], models['converted'], recipe.conversion_policy(), input_size)
    latency = measure_latency(models['unconverted'], models['converted'], settings, os.path.join(work_dir, 'onnx'),
                              QUICK_REPEAT if quick else settings['repeat'])
    effective = cfg_c.to_dict()
    budget = {k: effective[k] for k in ('img_size', 'train_subset', 'test_subset', 'epochs', 'batch_size', 'lr',
                                        'dpp_lr_scale', 'opt', 'sched', 'amp', 'amp_dtype', 'seed', 'max_steps',
                                        'threads')}
    results = {
        'command': command,
        'machine': machine_description(),  # after the latency runs: their thread count
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
        'quick': quick,
        'init': _init_description(recipe),
        'data': recipe.data['name'],
        'finetune': budget,
        'accuracy': {k: metrics[k]['test_accuracy'] for k in metrics},
        'test_images': metrics['converted']['test_count'],
        'train_images_per_second': {k: metrics[k]['images_per_second'] for k in metrics},
        'finetune_reused': reused,
        **cost,
        'latency': latency,
        'wall_seconds': time.time() - t0,
        'dpp_surgery_version': __version__,
    }
    out_path = write_results(recipe, results, os.path.join(output, f'{name}.json'))
    print(f'wrote {out_path}', file=sys.stderr)
    if write and not output_is_zoo:
        print(f'wrote {write_results(recipe, results, recipe.path)}', file=sys.stderr)
    return results


# ---------------------------------------------------------------------------------------------------------------
# the table

def _pct(v: Optional[float]) -> str:
    return '-' if v is None else f'{100 * v:.2f}%'


def _ms(v: Optional[float]) -> str:
    return 'failed' if v is None else f'{v:.1f}'


def _budget(recipe: Recipe, results: Optional[dict]) -> str:
    ft = results['finetune'] if results else {**recipe.finetune}
    train = ft.get('train_subset') or 'all'
    test = ft.get('test_subset') or 'all'
    text = (f"{recipe.data['name']}: {train} train / {test} test images, {ft.get('epochs', 1)} epoch(s), "
            f"{ft.get('img_size', ft.get('image_size', 64))} px")  # (image_size: results of earlier versions)
    if results and results.get('quick'):
        text += f" (--quick smoke test, {ft.get('max_steps')} steps)"
    return text


def _load_note(latency: dict) -> str:
    load = latency.get('load_average_1min')
    return '' if load is None else f'; load average {load:.1f} while timing'


def _row(recipe: Recipe) -> List[str]:
    r = recipe.results
    policy = 'default' if not recipe.policy else json.dumps(recipe.policy, separators=(',', ':'))
    head = [f'`{recipe.name}`', f'`{recipe.architecture}`', policy, r['init'] if r else _init_description(recipe),
            _budget(recipe, r)]
    if not r:
        return head + [_NOT_RUN] * 2 + ['-'] * 6
    lat = r['latency']
    ort = lat['onnxruntime_ms']
    ort_dpp = ', '.join(f'{mode} {_ms(v)}' for mode, v in ort['converted'].items())
    if lat.get('custom_mode_kernel', 'native') != 'native':
        ort_dpp += ' (custom: no native kernel, its decomposition ran)'
    return head + [
        _pct(r['accuracy']['unconverted']), _pct(r['accuracy']['converted']),
        f"{r['params']['unconverted'] / 1e6:.2f} / {r['params']['converted'] / 1e6:.2f}",
        f"{r['gflops']['unconverted']:.3f} / {r['gflops']['converted']:.3f}",
        f"{_ms(lat['torch_ms']['unconverted'])} / {_ms(lat['torch_ms']['converted'])}",
        f"{_ms(ort['unconverted'])} / {ort_dpp}",
        r['machine'] + _load_note(lat), f"`{r['command']}`",
    ]


def _results_lines(recipes: Dict[str, Recipe], paper_md: Optional[str], heading: str) -> List[str]:
    """The model table, how it is measured, the recipes' notes, and the paper-style experiment (``heading`` is the
    Markdown level of its title)."""
    header = ['model', 'timm architecture', 'policy', 'init', 'data and budget', 'accuracy original',
              'accuracy DPP', 'params M (orig / DPP)', 'GFLOPs (orig / DPP)', 'PyTorch ms (orig / DPP)',
              'onnxruntime ms (orig / DPP per mode)', 'machine', 'command']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for recipe in recipes.values():
        lines.append('| ' + ' | '.join(c.replace('|', '/') for c in _row(recipe)) + ' |')
    lines += [
        '',
        'How the columns are measured:',
        '- accuracy: top-1 on the test images after fine-tuning the original and the converted model with the same '
        'budget, seed and settings (the recipe\'s `finetune` section); "init" is where both start from.',
        '- params: all parameters with the fine-tuned head. GFLOPs for one image at the timed size: torch\'s '
        'FlopCounterMode (convolutions and matrix products; a multiply-add is 2 FLOPs; pooling and element-wise '
        'ops are not counted) of the original; for DPP, plus the change `dpp_surgery.plan` estimates at the '
        'replaced sites (DPP at 10 FLOPs per window element, converted blocks counted at stride 1).',
        '- latency: median of interleaved runs (batch, size and threads from the recipe\'s `latency` section: '
        'batch 1, 224 px, 2 threads), the fine-tuned models in PyTorch eager and in onnxruntime (CPU) for every '
        'export mode; the original has no DPP layer, so it is exported once. "failed" means that mode could not '
        'export or run (the error is in the recipe\'s results). The machine column gives the 1-minute load average '
        'while timing: with other processes running, timings of 2 threads on 2 cores mean little.',
    ]
    notes = [(r.name, r.notes) for r in recipes.values() if r.notes]
    if notes:
        lines += ['', 'Notes:']
        lines += [f'- `{name}`: {note}' for name, note in notes]
    if paper_md is not None:
        lines += ['', f'{heading} Paper-style experiment', '', paper_md.rstrip('\n')]
    return lines


def render_table(recipes: Dict[str, Recipe], paper_md: Optional[str] = None) -> str:
    """The zoo's README: one table over ``recipes``, then the paper-style experiment if given."""
    lines = [
        '# dpp_surgery model zoo',
        '',
        'Generated by `python -m dpp_surgery.zoo table` from the recipes in this folder; do not edit by hand. Every '
        'figure comes from `python -m dpp_surgery.zoo run NAME --write` (the command and machine of each row are in '
        'the table) or, for the paper-style experiment, `python -m dpp_surgery.experiments paper`.',
        '',
        'Each recipe `<arch>_dpp.json` is a timm model once `dpp_surgery` is imported:',
        '',
        '```python',
        'import timm, dpp_surgery',
        "model = timm.create_model('efficientnet_lite0_dpp', pretrained=True)   # original weights, converted",
        "model = timm.create_model('efficientnet_lite0_dpp', pretrained=True,",
        "                          pretrained_cfg_overlay=dict(file='best.safetensors'))  # a converted checkpoint",
        '```',
        '',
    ]
    tagged = [f'`{r.name}.{pretrained_tag(r)}`' for r in recipes.values() if pretrained_tag(r)]
    if tagged:
        lines += [
            "`pretrained=True` gives the original architecture's weights converted to DPP, not fine-tuned with DPP; "
            "their timm tag says so (`timm.list_models('*_dpp', pretrained=True)`): " + ', '.join(tagged) + '. The '
            'accuracies below are those of models fine-tuned by `run`.',
            '',
        ]
    return '\n'.join(lines + _results_lines(recipes, paper_md, '##')) + '\n'


# the block of the zoo's documentation page (RESULTS_PAGE) that `table` keeps equal to the zoo's results; the
# markers of every generated block of the docs (`python -m dpp_surgery.tools.docs_results` writes this one too)
README_BEGIN = '<!-- BEGIN generated: zoo -->'
README_END = '<!-- END generated: zoo -->'


def render_readme_block(recipes: Dict[str, Recipe], paper_md: Optional[str] = None) -> str:
    """What goes between :data:`README_BEGIN` and :data:`README_END` in the zoo's documentation page."""
    return '\n'.join([README_BEGIN, ''] + _results_lines(recipes, paper_md, '###') + ['', README_END])


def _replace_block(text: str, block: str, path: str) -> str:
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f'{path} has no zoo results block; add the two lines {README_BEGIN!r} and {README_END!r} '
                         'where the tables should go')
    return text[:begin] + block + text[end + len(README_END):]


def write_table(zoo_dir: Optional[str] = None, output: Optional[str] = None,
                readme: Optional[str] = None) -> str:
    """Regenerate ``ZOO/README.md`` (or ``output``) from the recipes; returns the path written.

    ``readme``: also replace the zoo results block of this Markdown file (the docs' ``results/zoo.md``).
    """

    zoo_dir = zoo_dir or default_zoo_dir()
    recipes = load_recipes(zoo_dir)
    paper_path = os.path.join(zoo_dir, PAPER_MD)
    paper = None
    if os.path.isfile(paper_path):
        with open(paper_path) as f:
            paper = f.read()
    path = output or os.path.join(zoo_dir, README)
    readme_text = None
    if readme is not None:  # checked before anything is written
        with open(readme) as f:
            readme_text = _replace_block(f.read(), render_readme_block(recipes, paper), readme)
    write_text(path, render_table(recipes, paper), overwrite=True)
    if readme_text is not None:
        write_text(readme, readme_text, overwrite=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# command line

def _cmd_list(args) -> int:
    recipes = load_recipes(args.zoo)
    if not recipes:
        print(f'no recipes in {args.zoo or default_zoo_dir()}')
        return 0
    for recipe in recipes.values():
        r = recipe.results
        status = _NOT_RUN if not r else f"run {r['date']}{' (--quick)' if r.get('quick') else ''}"
        policy = 'default policy' if not recipe.policy else f'policy {json.dumps(recipe.policy)}'
        tag = pretrained_tag(recipe)
        weights = (f'pretrained=True: {recipe.name}.{tag} (original weights converted, not fine-tuned with DPP)'
                   if tag else 'no pretrained weights')
        print(f'{recipe.name}: {recipe.architecture}, weights {recipe.weight_source}, '
              f'{_init_description(recipe)}, {policy}, data {recipe.data["name"]}; {weights}; {status}')
    return 0


def _cmd_run(args) -> int:
    results = run_recipe(args.name, zoo_dir=args.zoo, quick=args.quick, output=args.output, write=args.write,
                         work_dir=args.work_dir, threads=args.threads, progress=not args.no_progress,
                         command=args.command_line, reuse=args.reuse)
    acc, lat = results['accuracy'], results['latency']
    print(f"{args.name}: accuracy original {_pct(acc['unconverted'])}, DPP {_pct(acc['converted'])}; "
          f"GFLOPs {results['gflops']['unconverted']:.3f} / {results['gflops']['converted']:.3f}; "
          f"PyTorch ms {_ms(lat['torch_ms']['unconverted'])} / {_ms(lat['torch_ms']['converted'])}; "
          f"onnxruntime ms {_ms(lat['onnxruntime_ms']['unconverted'])} / "
          + ', '.join(f'{m} {_ms(v)}' for m, v in lat['onnxruntime_ms']['converted'].items()))
    for key, err in lat['errors'].items():
        print(f'  {key}: {err}')
    return 0


def _project_readme(zoo_dir: str) -> Optional[str]:
    """The documentation page next to the zoo folder (docs/results/zoo.md), if it has a zoo results block."""
    path = os.path.join(os.path.dirname(os.path.abspath(zoo_dir)), RESULTS_PAGE)
    if os.path.isfile(path):
        with open(path) as f:
            if README_BEGIN in f.read():
                return path
    return None


def _cmd_table(args) -> int:
    zoo_dir = args.zoo or default_zoo_dir()
    readme = None if args.no_readme else _project_readme(zoo_dir)
    path = write_table(zoo_dir, args.output, readme)
    print(f'wrote {path}' + (f' and the results block of {readme}' if readme else ''))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m dpp_surgery.zoo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--zoo', default=None, help='folder of recipes (default: zoo/ of the checkout, or '
                                                    '$DPP_SURGERY_ZOO)')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('list', help='the recipes and whether they have results')
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser('run', help='fine-tune and measure one recipe (original vs converted)')
    p.add_argument('name', help='recipe name, <arch>_dpp')
    p.add_argument('--quick', action='store_true', help='tiny smoke-test budget (a few steps, tiny subsets)')
    p.add_argument('--output', default=DEFAULT_OUTPUT,
                   help=f'folder for NAME.json, the recipe with its results (default {DEFAULT_OUTPUT}); the zoo '
                        'folder itself writes the recipe')
    p.add_argument('--write', action='store_true', help='also write the results into the recipe in the zoo folder')
    p.add_argument('--work-dir', default=None, help='folder for the fine-tuning runs and ONNX files (default '
                                                    'OUTPUT/NAME, or runs/zoo/NAME when OUTPUT is the zoo folder)')
    p.add_argument('--threads', type=int, default=2, help='torch threads for fine-tuning (default 2)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.add_argument('--reuse', action='store_true',
                   help='reuse finished fine-tuning runs with the same settings in the work folder (re-measure cost '
                        'and latency only)')
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser('table', help='regenerate README.md of the zoo folder from the recipes')
    p.add_argument('--output', default=None, help='write the table here instead of ZOO/README.md')
    p.add_argument('--no-readme', action='store_true',
                   help='leave the docs page docs/results/zoo.md (next to the zoo folder) alone; by default its zoo '
                        'results block, if it has one, is regenerated too')
    p.set_defaults(func=_cmd_table)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = 'python -m dpp_surgery.zoo ' + shlex.join(argv)
    from ..utils import run_command
    return run_command(args.func, args, 'dpp_surgery.zoo')
