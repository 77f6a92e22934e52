"""What every study shares: its command-line options, refusing to overwrite results, reading a record back as data,
the paired statistics over seeds (:func:`paired_differences`, :func:`t95`), and the precision each run trained in
(:func:`precision_counts`)."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from typing import Dict, List, Optional

__all__ = ['add_img_size', 'refuse_overwrite', 'read_record', 'MAX_RECORD_BYTES', 't95', 'paired_differences',
           'precision_counts']


def add_img_size(p: argparse.ArgumentParser, default: int) -> None:
    """timm's ``--img-size N`` (``dest`` ``image_size``, the key the records keep; ``--image-size`` still read)."""
    p.add_argument('--img-size', dest='image_size', type=int, default=default, metavar='N',
                   help=f'input size in pixels (default {default})')
    p.add_argument('--image-size', dest='image_size', type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def refuse_overwrite(output: str, names, overwrite: bool) -> None:
    """Stop before any training if ``output`` already holds results and ``overwrite`` was not asked for."""
    if overwrite:
        return
    existing = [f for f in names if os.path.exists(os.path.join(output, f))]
    if existing:
        raise FileExistsError(f'{output} already holds results ({", ".join(existing)}); pass --overwrite to replace '
                              'them or choose another --output')


# two-sided 95% quantiles of Student's t for 1 to 10 degrees of freedom (a paired t-test over seeds); 1.96 beyond 30
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t95(dof: int) -> float:
    if dof <= len(_T95):
        return _T95[dof - 1]
    return 2.1 if dof <= 20 else 2.05 if dof <= 30 else 1.96  # rounded up: never more lenient than the test


def paired_differences(runs: List[dict], variant: str, baseline: str) -> Optional[Dict[str, float]]:
    """Test-error difference ``variant - baseline`` (points) over the seeds both ran, paired by seed (a seed gives
    both the same initialisation of the shared layers and the same batch order): mean, standard error, and their
    ratio ``t``, and whether a two-sided paired t-test at 95% tells it from zero (``resolved``). None with fewer than
    two common seeds."""
    err = {(r['variant'], r['seed']): r['test_error'] for r in runs}
    seeds = sorted(s for (v, s) in err if v == variant and (baseline, s) in err)
    if len(seeds) < 2:
        return None
    diffs = [err[(variant, s)] - err[(baseline, s)] for s in seeds]
    mean = statistics.mean(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    t = mean / se if se > 0 else math.copysign(math.inf, mean) if mean else 0.0
    return {'mean': mean, 'se': se, 't': t, 'seeds': len(seeds), 'resolved': abs(t) > t95(len(seeds) - 1)}


def precision_counts(runs: List[dict], key: str) -> str:
    """``'GROUP bfloat16 xN, float32 xM; ...'``: how many runs of each ``run[key]`` (groups in the order they first
    appear) trained in each precision; runs without one (``amp`` None: a diverged run) are left out, and no such run
    gives ''."""
    from ..training.precision import PRECISION_NAMES

    groups: Dict[str, Dict[str, int]] = {}
    for r in runs:
        if r.get('amp') is not None:
            counts = groups.setdefault(r[key], {})
            name = PRECISION_NAMES.get(r['amp'], r['amp'])
            counts[name] = counts.get(name, 0) + 1
    return '; '.join(f"{group} {', '.join(f'{p} x{n}' for p, n in sorted(counts.items()))}"
                     for group, counts in groups.items())


MAX_RECORD_BYTES = 64 << 20  # far above any record an experiment writes


def read_record(src: str, command: str, output: str) -> dict:
    """The JSON record ``src`` that ``python -m dpp_surgery.experiments <command>`` wrote, read as data: missing,
    oversized, invalid JSON or a record without runs is a ValueError (FileNotFoundError) that says to rerun it."""
    rerun = f'rerun `python -m dpp_surgery.experiments {command} --output {output}`'
    if not os.path.isfile(src):
        raise FileNotFoundError(f'{src} does not exist; {rerun} first')
    if os.path.getsize(src) > MAX_RECORD_BYTES:
        raise ValueError(f'{src} is over {MAX_RECORD_BYTES >> 20} MiB, larger than any record of this experiment; '
                         f'{rerun}')
    with open(src) as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'{src} is not valid JSON ({e}); {rerun}') from e
    if not isinstance(record, dict) or not record.get('runs') or not ('args' in record or 'plan' in record):
        raise ValueError(f'{src} is not a record of `experiments {command}` (it holds no runs); {rerun}')
    return record
