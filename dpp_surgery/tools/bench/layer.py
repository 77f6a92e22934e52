"""``bench layer``: speed and memory of DPP2d against max/average pooling."""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional

os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # keep the profiler's start/stop chatter out of the tables

import torch

from ...layers import DPP2d
from ...timing import device_description, interleaved_medians, peak_bandwidth
from .common import check, checks_text


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
        from ...layers.functional import torch_path
        return torch_path(self, x, self.form)


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


LAYOUTS = ('NCHW', 'channels_last')


def _forward_bytes(x: torch.Tensor, module: torch.nn.Module) -> int:
    """The least memory traffic of a pooling forward: the input read once, the output written once."""
    with torch.no_grad():
        out = module(x)
    return x.numel() * x.element_size() + out.numel() * out.element_size()


def bench_layer(args) -> dict:
    """Time every case of :func:`_layer_cases` in each dtype of ``--dtypes``, in NCHW and channels_last, and
    measure its training step's peak memory; return the record's data (the rows, the targets and their checks, and
    the resolved settings that :func:`render_layer` writes down)."""
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    if cuda and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda, but PyTorch sees no CUDA device here')
    torch.manual_seed(0)
    shape = tuple(args.shape or ((32, 256, 56, 56) if cuda else (32, 64, 56, 56)))
    dtypes = list(args.dtypes or (['float32', 'bfloat16'] if cuda else ['float32']))
    compiled = cuda if args.compile is None else bool(args.compile)
    inner = args.inner or (10 if cuda else 1)
    base = torch.randn(*shape, device=device)
    cases = _layer_cases(shape[1], device, compiled)
    peak = peak_bandwidth(device) if cuda else None
    rows: List[dict] = []
    for dtype_name in dtypes:
        for layout in LAYOUTS:
            x = base.to(LAYER_DTYPES[dtype_name])
            if layout == 'channels_last':
                x = x.contiguous(memory_format=torch.channels_last)
            rows += _measure(cases, x, dtype_name, layout, args.repeat, inner, memory=not args.no_memory, peak=peak)
    get = _row_getter(rows)
    targets = _cuda_layer_targets(get, dtypes) if cuda else _cpu_layer_targets(get, dtypes)
    targets = [t for t in targets + _compiled_form_targets(get, rows) if t[1] is not None]  # (None: not measured)
    return {'machine': device_description(device), 'device': device.type, 'shape': list(shape), 'dtypes': dtypes,
            'repeat': args.repeat, 'inner': inner, 'compiled': compiled, 'memory': not args.no_memory,
            'peak_bandwidth': peak, 'rows': rows,
            'targets': [{'target': t, 'value': v, 'limit': lim, 'at_most': m} for t, v, lim, m in targets],
            'checks': [check(f'{t}: {v:.2f}', v <= lim if m else v >= lim) for t, v, lim, m in targets]}


def _measure(cases: Dict[str, torch.nn.Module], x: torch.Tensor, dtype_name: str, layout: str, repeat: int,
             inner: int, memory: bool, peak: Optional[float]) -> List[dict]:
    """The rows of one dtype and layout: each case's median forward and forward+backward milliseconds (timed
    interleaved), its training step's peak memory (None without ``memory``) and, on CUDA (``peak``: the GPU's
    peak bytes/s), its forward's bandwidth as a fraction of the peak (else None)."""
    cuda = x.device.type == 'cuda'
    # (the PyTorch path is slow on the CPU: timed in one layout there)
    names = [n for n in cases if cuda or not ('PyTorch path' in n and layout == 'channels_last')]
    fns = {}
    for name in names:
        fns[(name, 'fwd')], fns[(name, 'fwd_bwd')] = _fwd_bwd_fns(cases[name], x)
    print(f'  timing {len(names)} ops [{dtype_name}, {layout}]', file=sys.stderr)
    times = interleaved_medians(fns, repeat, device=x.device, inner=inner)
    rows = []
    for name in names:
        row = {'op': name, 'dtype': dtype_name, 'layout': layout, 'fwd_ms': times[(name, 'fwd')],
               'fwd_bwd_ms': times[(name, 'fwd_bwd')]}
        row['memory_x'] = peak_training_memory(cases[name], x) if memory else None
        row['bandwidth'] = _forward_bytes(x, cases[name]) / (row['fwd_ms'] * 1e-3) / peak if cuda else None
        rows.append(row)
    return rows


def _row_getter(rows: List[dict]) -> Callable[[str, str, str], Optional[dict]]:
    """``get(op, dtype, layout)``: the row of ``op`` in that dtype and layout, or None where it was not timed."""
    index = {(r['op'], r['dtype'], r['layout']): r for r in rows}
    return lambda op, dtype, layout: index.get((op, dtype, layout))


def _fmt(value: Optional[float], spec: str, suffix: str = '', scale: float = 1.0) -> str:
    """``value`` (times ``scale``) formatted, or ``-`` where it was not measured."""
    return '-' if value is None else f'{value * scale:{spec}}{suffix}'


def render_layer(record: dict) -> str:
    """The Markdown of a ``bench layer`` record: what was timed and how, the machine, one table per dtype (ratios
    against AvgPool2d(2,2) in the same dtype and layout) and the targets."""
    cuda = record['device'] == 'cuda'
    get = _row_getter(record['rows'])
    parts = [_layer_paragraph(record), f"Measured on: {record['machine']}."]
    header = ('| op | dtype | layout | forward ms | fwd+bwd ms | fwd / AvgPool fwd | fwd+bwd / AvgPool fwd+bwd '
              '| train-step peak memory / input |' + (' forward bandwidth / peak |' if cuda else ''))
    for dtype in record['dtypes']:
        lines = [f'**{dtype}**', '', header, '|' + '---|' * (9 if cuda else 8)]
        for r in (r for r in record['rows'] if r['dtype'] == dtype):
            avg = get('AvgPool2d(2,2)', r['dtype'], r['layout'])
            lines.append(f"| {r['op']} | {r['dtype']} | {r['layout']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                         f"{r['fwd_ms'] / avg['fwd_ms']:.2f}x | {r['fwd_bwd_ms'] / avg['fwd_bwd_ms']:.2f}x | "
                         f"{_fmt(r['memory_x'], '.2f', 'x')} |"
                         + (f" {_fmt(r['bandwidth'], '.0f', '%', 100)} |" if cuda else ''))
        parts.append('\n'.join(lines))
    if record['checks']:
        parts.append('Targets (against AvgPool2d(2,2) in the same dtype and layout):\n\n'
                     + checks_text(record['checks']))
    return '\n\n'.join(parts)


def _layer_paragraph(record: dict) -> str:
    """What ``bench layer`` measured and how, from its record."""
    cuda = record['device'] == 'cuda'
    inner = record['inner']
    text = (f"DPP2d against pooling: input {tuple(record['shape'])} in {', '.join(record['dtypes'])}, NCHW and "
            f"channels_last, on {'CUDA' if cuda else 'the CPU'}; medians of {record['repeat']} interleaved runs"
            + (f' of {inner} calls each' if inner > 1 else '') + (' (CUDA events)' if cuda else '')
            + ' of the forward (no grad) and of forward+backward (`layer(x).sum().backward()`).')
    if record['memory']:
        text += (" Memory: the peak allocated during that step beyond x, as a multiple of x's bytes in its dtype ("
                 + ("the CUDA allocator's peak statistics" if cuda else "PyTorch's memory profiler") + ').')
    if cuda:
        text += (' Bandwidth: the input read once and the output written once per forward, over the forward time, '
                 f"as a fraction of the GPU's peak ({record['peak_bandwidth'] / 1e9:.0f} GB/s).")
    else:
        text += ' The PyTorch path is timed in NCHW only.'
    if record['compiled']:
        text += (' torch.compile rows: the PyTorch path compiled, for each guide in the form it runs for tiling '
                 'windows (pooled for Lite, stacked for Full) and in the other form.')
    return text + ' Ratios are against AvgPool2d(2,2) in the same dtype and layout.'


def _cpu_layer_targets(get, dtypes) -> List[tuple]:
    """(text, value, limit, value must be at most the limit) for the CPU kernel, in float32; the value None where
    it was not measured (memory with ``--no-memory``)."""
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
    """The Triton kernels' targets, in bfloat16 channels_last (where timed), as :func:`_cpu_layer_targets`."""
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
