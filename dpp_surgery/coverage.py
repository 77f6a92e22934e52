"""Coverage of convert() across timm: one small model of every timm family (``timm.list_modules()``).

For each family: create a small model (pretrained=False), plan, convert with the default policy, run forward and
backward at a small input size, and record what happened; a failure keeps its reason. Used by
``python -m dpp_surgery.bench coverage``.
"""
from __future__ import annotations

import contextlib
import csv
import os
import signal
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ._text import first_line

__all__ = ['FamilyResult', 'pick_model', 'check_family', 'run_coverage', 'export_check', 'CONVERTIBLE_REASONS',
           'EXPORT_TIMEOUT', 'ExportTimeout']

# name fragments of small variants, most preferred first
_SMALL = ['atto', 'femto', 'pico', 'nano', 'xxs', 'tiny', 'mini', 'xs', 'small', '_s', 'lite0', 'b0', '_t', '18', '050',
          '_100', '002', '004', '26', '34', 'base']

# skip reasons that mean "not a site the default policy is meant to convert"
CONVERTIBLE_REASONS = ('stem conv', 'patch-embedding', 'global/adaptive', 'stride-1 pool')


@dataclass
class FamilyResult:
    family: str
    model: str = ''
    input_size: str = ''
    traced: bool = False
    sites: int = 0
    convertible: int = 0
    converted: int = 0
    forward_ok: bool = False
    backward_ok: bool = False
    shape_ok: bool = False
    seconds: float = 0.0
    status: str = ''  # ok | no_site | failed
    reason: str = ''
    extra: Dict[str, str] = field(default_factory=dict)


def pick_model(family: str) -> Optional[str]:
    """A small model of a timm family (by name), or None if the family registers none."""
    import timm

    names = timm.list_models(module=family)
    if not names:
        return None

    def score(name):
        for i, frag in enumerate(_SMALL):
            if frag in name:
                return i, len(name), name
        return len(_SMALL), len(name), name

    return min(names, key=score)


def _input_sizes(model, small: int) -> List[tuple]:
    """Sizes to try: ``small`` pixels, then the model's own input size (alone if the model fixes it)."""
    from .surgery import default_input_size

    own = tuple(default_input_size(model))
    if (getattr(model, 'pretrained_cfg', None) or {}).get('fixed_input_size', False):
        return [own]
    first = (own[0], small, small)
    return [first] if own == first else [first, own]


def check_family(family: str, size: int = 96, extra_checks: Sequence[Callable] = ()) -> FamilyResult:
    """plan + convert + forward + backward of one small model of ``family``; never raises."""
    import timm

    from .surgery import NoEffectWarning, convert, plan

    result = FamilyResult(family=family)
    t0 = time.time()
    try:
        name = pick_model(family)
        if name is None:
            result.status, result.reason = 'no_site', 'family registers no model'
            return result
        result.model = name
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        # the small size first; models that cannot run or trace there get their own input size
        sizes = _input_sizes(model, size)
        for i, input_size in enumerate(sizes):
            result.input_size = 'x'.join(map(str, input_size))
            x = torch.randn(2, *input_size)
            try:
                model.eval()
                with torch.no_grad():
                    ref = model(x)
                p = plan(model, input_size=input_size)
                break
            except Exception:  # noqa: BLE001 - retried at the model's own size, else reported
                if i == len(sizes) - 1:
                    raise
        result.traced = True
        result.sites = len(p.sites)
        downsampling = [s for s in p.sites if s.kind in ('max_pool', 'avg_pool', 'strided_conv') and s.stride != (1, 1)]
        convertible = [s for s in downsampling if not (s.action == 'skip' and s.reason.startswith(CONVERTIBLE_REASONS))]
        result.convertible = len(convertible)
        if not convertible:
            result.status = 'no_site'
            result.reason = ('no downsampling site' if not downsampling else
                             'only stem / patch-embedding / global sites (skipped by default)')
            return result
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', NoEffectWarning)
            convert(model, input_size=input_size)
        result.converted = sum(1 for s in p.sites if s.action == 'replace')
        with torch.no_grad():
            out = model(x)
        result.forward_ok = bool(torch.isfinite(out).all())
        result.shape_ok = out.shape == ref.shape
        model.train()
        out = model(x)
        out.float().sum().backward()
        result.backward_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        for check in extra_checks:
            result.extra.update(check(name, model, input_size))
        if result.converted == 0:
            skipped = {s.reason for s in convertible}
            result.status, result.reason = 'failed', 'no site converted: ' + '; '.join(sorted(skipped))[:300]
        elif not (result.forward_ok and result.backward_ok and result.shape_ok):
            result.status, result.reason = 'failed', 'non-finite output/gradient or changed output shape'
        else:
            result.status = 'ok'
            skipped = [s for s in convertible if s.action == 'skip']
            if skipped:
                result.reason = f'{len(skipped)} site(s) left: ' + '; '.join(sorted({s.reason for s in skipped}))[:300]
    except Exception as e:  # noqa: BLE001 - the benchmark records every failure with its reason
        result.status = 'failed'
        msg = first_line(e, '')
        result.reason = f'{type(e).__name__}: {msg}'[:400]
        if not result.traced and result.model:
            result.reason = 'plan: ' + result.reason
        tb = traceback.extract_tb(e.__traceback__)
        result.extra['where'] = f'{tb[-1].filename.split("/")[-1]}:{tb[-1].lineno}' if tb else ''
    finally:
        result.seconds = round(time.time() - t0, 2)
    return result


EXPORT_TIMEOUT = 300  # seconds per model and mode; some exports (torch.export of large dynamic graphs) take far longer


class ExportTimeout(BaseException):
    """An export and its check ran past the coverage benchmark's time limit. A BaseException (like
    KeyboardInterrupt), so that the exporter's own fallbacks (``except Exception``) do not swallow it."""


@contextlib.contextmanager
def _time_limit(seconds: Optional[float]):
    """Raise :class:`ExportTimeout` in this (main) thread after ``seconds`` (SIGALRM; no limit elsewhere). A timer
    that was already set (pytest-timeout's, for example) gets its handler and its remaining time back afterwards."""
    usable = seconds and hasattr(signal, 'SIGALRM') and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise ExportTimeout(f'export and check took longer than {seconds:g} s')

    outer_remaining, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    previous = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_remaining:
            # the outer timer resumes with what it had left (at once if that ran out meanwhile)
            left = max(outer_remaining - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


def export_check(name: str, model: torch.nn.Module, input_size: Sequence[int],
                 timeout: Optional[float] = EXPORT_TIMEOUT) -> Dict[str, str]:
    """Export a converted model in every mode and compare onnxruntime with PyTorch (an ``extra_checks`` entry).

    Columns ``onnx_<mode>`` ('yes', or 'no: <reason>', a run past ``timeout`` seconds included) and
    ``parity_<mode>`` (the worst relative error over random and photo inputs at batch 1 and 2, the size and one pixel
    more where the file is dynamic; 'ok'/'FAIL').
    """
    import tempfile

    from .export import SUPPORTED_MODES, export_onnx, verify_onnx

    out: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in SUPPORTED_MODES:
            path = os.path.join(tmp, f'{name}_{mode}.onnx')
            try:
                with warnings.catch_warnings(), _time_limit(timeout):
                    warnings.simplefilter('ignore')
                    export_onnx(model, path, mode=mode, example_input=torch.randn(1, *input_size))
                    report = verify_onnx(model, path, base_size=tuple(input_size[1:]), batches=(1, 2))
            except (Exception, ExportTimeout) as e:  # noqa: BLE001 - recorded per model
                msg = first_line(e, '')
                out[f'onnx_{mode}'] = f'no: {type(e).__name__}: {msg}'[:300]
                out[f'parity_{mode}'] = ''
                continue
            out[f'onnx_{mode}'] = 'yes' + ('' if report['spatial_dynamic'] else ' (fixed size)')
            out[f'parity_{mode}'] = (f"{report['worst']['max_rel_error']:.1e} "
                                     f"{'ok' if report['ok'] else 'FAIL'}")
    return out


def run_coverage(families: Optional[Sequence[str]] = None, size: int = 96, csv_path: Optional[str] = None,
                 progress: bool = True, extra_checks: Sequence[Callable] = ()) -> List[FamilyResult]:
    """:func:`check_family` for every timm family (or ``families``); optionally writes a CSV."""
    import timm

    families = list(families) if families else sorted(timm.list_modules())
    results = []
    iterator = families
    if progress:
        from tqdm import tqdm
        iterator = tqdm(families, desc='coverage', unit='family')
    for fam in iterator:
        res = check_family(fam, size, extra_checks)
        results.append(res)
        if progress:
            iterator.set_postfix_str(f'{fam}: {res.status}')
    if csv_path:
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        extra_keys = sorted({k for r in results for k in r.extra})
        with open(csv_path, 'w', newline='') as f:
            fields = [k for k in asdict(results[0]) if k != 'extra'] + extra_keys
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in results:
                row = {k: v for k, v in asdict(r).items() if k != 'extra'}
                row.update(r.extra)
                writer.writerow(row)
    return results


def summarize(results: List[FamilyResult]) -> str:
    applicable = [r for r in results if r.status != 'no_site']
    ok = [r for r in applicable if r.status == 'ok']
    lines = [f'{len(results)} timm families; {len(applicable)} have a convertible downsampling site; '
             f'{len(ok)} of them convert and train ({100 * len(ok) / max(1, len(applicable)):.1f}%).']
    failed = [r for r in applicable if r.status != 'ok']
    if failed:
        lines.append('Failures:')
        lines += [f'- {r.family} ({r.model}): {r.reason}' for r in failed]
    modes = sorted({k[len('onnx_'):] for r in ok for k in r.extra if k.startswith('onnx_')})
    for mode in modes:
        exported = [r for r in ok if r.extra.get(f'onnx_{mode}', '').startswith('yes')]
        parity = [r for r in exported if r.extra.get(f'parity_{mode}', '').endswith(' ok')]
        lines.append(f'ONNX {mode}: {len(exported)} of {len(ok)} converted models export, {len(parity)} match PyTorch '
                     'within 1e-4 in onnxruntime.')
        lines += [f"- {r.family} ({r.model}): {r.extra.get(f'onnx_{mode}', '')} {r.extra.get(f'parity_{mode}', '')}"
                  for r in ok if r not in parity]
    none = [r for r in results if r.status == 'no_site']
    if none:
        lines.append(f'Families without a convertible site ({len(none)}): ' +
                     ', '.join(f'{r.family}' for r in none))
    return '\n'.join(lines)
