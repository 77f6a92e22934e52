"""Coverage of convert() across timm: small models of every timm family (``timm.list_modules()``).

For each family: create its smallest model of each distinct architecture line (pretrained=False; by default two
per family where the family has two), plan, convert with the default policy, run forward and backward at a small
input size, and record what happened; a failure keeps its reason. Per model, the downsampling sites of the module
census (:func:`dpp_surgery.surgery.census`, independent of tracing) are counted as converted, skipped by a policy
choice, skipped by a stated limitation, or missed (not listed by the plan at all). Used by
``python -m dpp_surgery.bench coverage``.
"""
from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..surgery.plan import ReasonCode, SiteAction, SiteKind
from ..utils import first_line, require_extra

__all__ = ['FamilyResult', 'pick_model', 'pick_models', 'check_family', 'check_model', 'run_coverage',
           'export_check', 'site_recall', 'CONVERTIBLE_REASONS', 'EXPORT_TIMEOUT', 'ExportTimeout']

# name fragments of small variants, most preferred first
_SMALL = ['atto', 'femto', 'pico', 'nano', 'xxs', 'tiny', 'mini', 'xs', 'small', '_s', 'lite0', 'b0', '_t', '18', '050',
          '_100', '002', '004', '26', '34', 'base']

# skip reasons (Site.reason_code) that mean "not a site the default policy is meant to convert"
CONVERTIBLE_REASONS = frozenset({ReasonCode.SKIP_STEM, ReasonCode.SKIP_PATCHIFY, ReasonCode.SKIP_GLOBAL,
                                 ReasonCode.SKIP_STRIDE1})


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
    # census sites (every strided conv-like module and pool with stride > 1, found without tracing)
    census: int = 0
    census_converted: int = 0
    census_policy: int = 0  # skipped by a policy choice (stem, patch embedding, exclude, ...)
    census_limited: int = 0  # skipped by a stated limitation (reason in limited_reasons)
    census_missed: int = 0  # not listed by plan at all
    limited_reasons: str = ''
    extra: Dict[str, str] = field(default_factory=dict)


def pick_model(family: str) -> Optional[str]:
    """A small model of a timm family (by name), or None if the family registers none."""
    import timm

    names = timm.list_models(module=family)
    if not names:
        return None
    return _smallest(names)


_SIZE_WORDS = {'atto', 'femto', 'pico', 'nano', 'xxs', 'tiny', 'mini', 'xs', 'small', 's', 'm', 'l', 'xl', 't',
               'medium', 'large', 'base', 'huge', 'giant', 'micro', 'a', 'b', 'c', 'd'}


def _line(name: str) -> str:
    """The architecture line of a model name: its leading words before sizes and numbers (``nf_regnet_b0`` ->
    ``nf_regnet``, ``seresnet50`` -> ``seresnet``, ``mobilenetv3_small_050`` -> ``mobilenetv3``)."""
    words = []
    for token in name.split('_'):
        head = re.match(r'[a-z]+v\d|[a-z]+', token)
        if head is None or head.group(0) in _SIZE_WORDS or len(head.group(0)) == 1:
            break
        words.append(head.group(0))
        if head.group(0) != token:
            break
    return '_'.join(words) or name


def pick_models(family: str, per_family: int = 2) -> List[str]:
    """Small models of a timm family: the smallest (by :func:`pick_model`'s preference) of each architecture line
    (:func:`_line`), up to ``per_family``; the first is :func:`pick_model`'s."""
    import timm

    names = timm.list_models(module=family)
    if not names:
        return []
    first = _smallest(names)  # pick_model's choice
    lines: Dict[str, List[str]] = {}
    for name in names:
        lines.setdefault(_line(name), []).append(name)
    picked = [first]
    done = {_line(first)}
    smallest = {line: _smallest(names) for line, names in lines.items()}
    for line in sorted(lines, key=lambda k: _size_score(smallest[k])):
        if len(picked) >= per_family:
            break
        if line not in done:
            picked.append(smallest[line])
            done.add(line)
    return picked


def _size_score(name: str) -> tuple:
    """Sort key of small models: the most preferred size fragment of :data:`_SMALL` (a number fragment must not run
    on into more digits: '26' is not in 'densenet264d'), then the smallest first number, then the shortest name."""
    number = re.search(r'\d+', name)
    number = int(number.group(0)) if number else 0
    for i, frag in enumerate(_SMALL):
        if re.search(re.escape(frag) + (r'(?!\d)' if frag[-1].isdigit() else ''), name):
            return i, number, len(name), name
    return len(_SMALL), number, len(name), name


def _smallest(names: Sequence[str]) -> str:
    return min(names, key=_size_score)


def _input_sizes(model, small: int) -> List[tuple]:
    """Sizes to try: ``small`` pixels, then the model's own input size (alone if the model fixes it)."""
    from ..surgery import default_input_size

    own = tuple(default_input_size(model))
    if (getattr(model, 'pretrained_cfg', None) or {}).get('fixed_input_size', False):
        return [own]
    first = (own[0], small, small)
    return [first] if own == first else [first, own]


def site_recall(model: torch.nn.Module, p) -> Dict[str, object]:
    """How plan ``p`` treats the census sites of ``model`` (see :class:`FamilyResult`'s census fields)."""
    from ..surgery import census

    by_name = {s.name: s for s in p.sites}
    counts = dict(census=0, census_converted=0, census_policy=0, census_limited=0, census_missed=0)
    limited = set()
    for name, _ in census(model):
        counts['census'] += 1
        site = by_name.get(name)
        if site is None:
            counts['census_missed'] += 1
        elif site.action == 'replace':
            counts['census_converted'] += 1
        elif site.policy_skip:
            counts['census_policy'] += 1
        else:
            counts['census_limited'] += 1
            limited.add(site.reason)
    counts['limited_reasons'] = '; '.join(sorted(limited))[:300]
    return counts


def check_family(family: str, size: int = 96, extra_checks: Sequence[Callable] = ()) -> FamilyResult:
    """plan + convert + forward + backward of one small model of ``family`` (:func:`pick_model`); never raises."""
    name = pick_model(family)
    if name is None:
        return FamilyResult(family=family, status='no_site', reason='family registers no model')
    return check_model(name, family, size, extra_checks)


def check_model(name: str, family: str = '', size: int = 96, extra_checks: Sequence[Callable] = (),
                operator: Optional[str] = None) -> FamilyResult:
    """plan + convert + forward + backward of timm model ``name`` (with the policy's ``operator`` if given:
    ``'blur'``, ...); never raises."""
    import timm

    result = FamilyResult(family=family)
    t0 = time.time()
    try:
        result.model = name
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        p, x, ref = _plan_at_first_size(model, size, result, operator)
        result.traced = True
        for key, value in site_recall(model, p).items():
            setattr(result, key, value)
        result.sites = len(p.sites)
        downsampling = [s for s in p.sites if s.kind in (SiteKind.MAX_POOL, SiteKind.AVG_POOL, SiteKind.STRIDED_CONV)
                        and s.stride != (1, 1)]
        convertible = [s for s in downsampling if not _left_by_default(s)]
        result.convertible = len(convertible)
        if not convertible:
            result.status = 'no_site'
            result.reason = ('no downsampling site' if not downsampling else
                             'only stem / patch-embedding / global sites (skipped by default)')
            return result
        _convert_and_train(model, p, x, ref, result)
        for check in extra_checks:
            result.extra.update(check(name, model, p.input_size))
        _set_status(result, convertible)
    except Exception as e:  # noqa: BLE001 - the benchmark records every failure with its reason
        _record_failure(result, e)
    finally:
        result.seconds = round(time.time() - t0, 2)
    return result


def _left_by_default(site) -> bool:
    """A site the default policy leaves alone by design (stem, patch embedding, global, stride-1 pool)."""
    return site.action == SiteAction.SKIP and site.reason_code in CONVERTIBLE_REASONS


def _plan_at_first_size(model: torch.nn.Module, size: int, result: FamilyResult, operator: Optional[str] = None):
    """(plan, input batch, eval output) at the first of :func:`_input_sizes` where the model runs and plans (the
    small size first; models that cannot run or trace there get their own input size); the last size's error
    propagates. Sets ``result.input_size``."""
    from ..surgery import plan

    sizes = _input_sizes(model, size)
    for i, input_size in enumerate(sizes):
        result.input_size = 'x'.join(map(str, input_size))
        x = torch.randn(2, *input_size)
        try:
            model.eval()
            with torch.no_grad():
                ref = model(x)
            return plan(model, input_size=input_size, operator=operator), x, ref
        except Exception:  # noqa: BLE001 - retried at the model's own size, else reported
            if i == len(sizes) - 1:
                raise
    raise AssertionError('unreachable: _input_sizes returns at least one size')


def _convert_and_train(model: torch.nn.Module, p, x: torch.Tensor, ref: torch.Tensor, result: FamilyResult) -> None:
    """Apply plan ``p``, then one eval forward (finite, same output shape) and one training forward and backward
    (finite gradients); the outcome goes into ``result``."""
    from ..surgery import NoEffectWarning, convert

    with warnings.catch_warnings():
        warnings.simplefilter('ignore', NoEffectWarning)
        convert(model, plan=p)
    result.converted = sum(1 for s in p.sites if s.action == SiteAction.REPLACE)
    with torch.no_grad():
        out = model(x)
    result.forward_ok = bool(torch.isfinite(out).all())
    result.shape_ok = out.shape == ref.shape
    model.train()
    out = model(x)
    out.float().sum().backward()
    result.backward_ok = all(q.grad is None or torch.isfinite(q.grad).all() for q in model.parameters())


def _set_status(result: FamilyResult, convertible: list) -> None:
    """``result.status`` and ``reason`` once the converted model ran: failed (nothing converted, a non-finite
    output or gradient, a changed output shape) or ok (with the sites left, if any)."""
    if result.converted == 0:
        skipped = {s.reason for s in convertible}
        result.status, result.reason = 'failed', 'no site converted: ' + '; '.join(sorted(skipped))[:300]
    elif not (result.forward_ok and result.backward_ok and result.shape_ok):
        result.status, result.reason = 'failed', 'non-finite output/gradient or changed output shape'
    else:
        result.status = 'ok'
        skipped = [s for s in convertible if s.action == SiteAction.SKIP]
        if skipped:
            result.reason = f'{len(skipped)} site(s) left: ' + '; '.join(sorted({s.reason for s in skipped}))[:300]


def _record_failure(result: FamilyResult, e: Exception) -> None:
    """A failure as ``result``'s status and reason (prefixed ``plan:`` where planning failed) and where it was
    raised (``extra['where']``)."""
    result.status = 'failed'
    msg = first_line(e, '')
    result.reason = f'{type(e).__name__}: {msg}'[:400]
    if not result.traced and result.model:
        result.reason = 'plan: ' + result.reason
    tb = traceback.extract_tb(e.__traceback__)
    result.extra['where'] = f'{tb[-1].filename.split("/")[-1]}:{tb[-1].lineno}' if tb else ''


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

    message = f'export and check took longer than {seconds:g} s'
    expired = []

    def expire(signum, frame):
        # Python drops an exception raised where it cannot propagate (a weakref callback, __del__): fire again soon,
        # and the flag makes the block fail at its end in any case
        expired.append(True)
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        raise ExportTimeout(message)

    outer_remaining, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    previous = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
        if expired:
            raise ExportTimeout(message)
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

    from ..export.onnx import SUPPORTED_MODES, export_onnx, verify_onnx
    from .photos import load_photos

    # the onnx packages are imported before the clock starts: the limit is the export's, and an import cut short by
    # the alarm would leave half a module behind
    require_extra('onnx', 'the coverage benchmark\'s export check')
    out: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in SUPPORTED_MODES:
            path = os.path.join(tmp, f'{name}_{mode}.onnx')
            try:
                with warnings.catch_warnings(), _time_limit(timeout):
                    warnings.simplefilter('ignore')
                    export_onnx(model, path, mode=mode, example_input=torch.randn(1, *input_size))
                    report = verify_onnx(model, path, base_size=tuple(input_size[1:]), batches=(1, 2),
                                         images=list(load_photos().values()))
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
                 progress: bool = True, extra_checks: Sequence[Callable] = (), per_family: int = 1,
                 overwrite: bool = True, operator: Optional[str] = None) -> List[FamilyResult]:
    """:func:`check_model` for up to ``per_family`` models (:func:`pick_models`) of every timm family (or
    ``families``); ``extra_checks`` run on each family's first model only. Optionally writes a CSV (atomically)."""
    import timm

    from ..utils import atomic_write

    families = list(families) if families else sorted(timm.list_modules())
    todo = []
    for fam in families:
        names = pick_models(fam, per_family)
        todo += [(fam, n, i == 0) for i, n in enumerate(names)] or [(fam, None, True)]
    results = []
    iterator = todo
    if progress:
        from tqdm import tqdm
        iterator = tqdm(todo, desc='coverage', unit='model')
    for fam, name, first in iterator:
        if name is None:
            res = FamilyResult(family=fam, status='no_site', reason='family registers no model')
        else:
            res = check_model(name, fam, size, extra_checks if first else (), operator)
        results.append(res)
        if progress:
            iterator.set_postfix_str(f'{name or fam}: {res.status}')
    if csv_path:
        extra_keys = sorted({k for r in results for k in r.extra})

        def write(tmp):
            with open(tmp, 'w', newline='') as f:
                fields = [k for k in asdict(results[0]) if k != 'extra'] + extra_keys
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                for r in results:
                    row = {k: v for k, v in asdict(r).items() if k != 'extra'}
                    row.update(r.extra)
                    writer.writerow(row)
        atomic_write(csv_path, write, overwrite=overwrite)
    return results


def summarize(results: List[FamilyResult]) -> str:
    by_family: Dict[str, List[FamilyResult]] = {}
    for r in results:
        by_family.setdefault(r.family, []).append(r)
    models = [r for r in results if r.model]
    fam_applicable = [f for f, rs in by_family.items() if any(r.status != 'no_site' for r in rs)]
    fam_ok = [f for f in fam_applicable if all(r.status in ('ok', 'no_site') for r in by_family[f])]
    applicable = [r for r in results if r.status != 'no_site']
    ok = [r for r in applicable if r.status == 'ok']
    raw = [r for r in results if r.status == 'failed' and not r.reason.split(':')[0].endswith(
        ('ConversionError', 'TraceError'))]
    lines = [f'{len(by_family)} timm families, {len(models)} models; {len(fam_applicable)} families have a '
             f'convertible downsampling site; {len(fam_ok)} of them convert and train in every model tried '
             f'({100 * len(fam_ok) / max(1, len(fam_applicable)):.1f}%).',
             f'Models: {len(applicable)} with a convertible site; {len(ok)} convert, run forward and backward and keep '
             f'their output size ({100 * len(ok) / max(1, len(applicable)):.1f}%); {len(raw)} failed with an error '
             'other than ConversionError/TraceError.']
    census = sum(r.census for r in models)
    if census:
        conv, pol = sum(r.census_converted for r in models), sum(r.census_policy for r in models)
        lim, miss = sum(r.census_limited for r in models), sum(r.census_missed for r in models)
        lines.append(f'Census sites (strided convs and pools found from the modules): {census}; converted {conv}, '
                     f'skipped by policy {pol}, skipped by a stated limitation {lim}, missed {miss}; site recall '
                     f'(converted or skipped by policy) {100 * (conv + pol) / census:.1f}%.')
        limited = [r for r in models if r.census_limited]
        if limited:
            lines.append('Sites skipped by a limitation:')
            lines += [f'- {r.model}: {r.census_limited} ({r.limited_reasons})' for r in limited]
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
    none = [f for f, rs in by_family.items() if f not in fam_applicable]
    if none:
        lines.append(f'Families without a convertible site in any model tried ({len(none)}): ' + ', '.join(none))
    return '\n'.join(lines)
