"""``bench triton-report``: registers, spills, shared memory and occupancy of the Triton kernels."""
from __future__ import annotations

import os
import sys

os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # keep the profiler's start/stop chatter out of the tables

from .common import check, checks_text


def bench_triton_report(args) -> dict:
    """Registers, spills, shared memory and theoretical occupancy of the Triton kernels, compiled for sm_90 and
    sm_80 on this machine (no GPU needed): see :mod:`dpp_surgery.native.triton_aot`.

    The record: ``triton`` (its version), ``specializations`` (kernel specializations compiled per arch),
    ``archs``, ``channels``, ``rows`` (one per kernel and arch), ``missed``, ``seconds``, ``machine``, ``checks``;
    or ``{'skipped': reason}`` where Triton's tools (ptxas, cuobjdump) are missing."""
    from ...native import triton_aot
    from ...timing import machine_description

    found = triton_aot.tools()
    if found['error']:
        print(f'triton-report: skipped: {found["error"]}', file=sys.stderr)
        return {'skipped': found['error']}
    if args.full:
        specs = triton_aot.all_specs()
    elif args.covering:
        specs = triton_aot.covering_specs()
    else:
        specs = triton_aot.all_specs(norms=('mean',), dtypes=('float32', 'bfloat16'))
    import triton
    print(f'triton-report: Triton {triton.__version__}, compiling {len(specs)} kernel specializations x '
          f'sm_{", sm_".join(map(str, args.arch))}', file=sys.stderr, flush=True)
    result = triton_aot.report(specs, archs=args.arch, channels=args.channels, jobs=args.jobs)
    rows, missed = result['rows'], result['missed']
    return {**result, 'specializations': len(specs), 'archs': list(args.arch), 'machine': machine_description(),
            'checks': _checks(rows, missed, triton_aot.TARGET_OCCUPANCY)}


def _checks(rows, missed, target: float) -> list:
    """No spill in any kernel; the theoretical occupancy of every forward and 2x2 backward at least ``target``
    (what :func:`triton_aot.meets_targets` asks), each with the measured value."""
    spills = sum(r['stack'] > 0 for r in rows)
    held = [r['occupancy'] for r in rows
            if r['kernel'] == 'forward' or (r['kernel'] == 'backward' and r['geometry'] == '2x2s2')]
    lowest = f' (lowest: {min(held):.0%})' if held else ''
    return [check(f'no register spill: {spills} of {len(rows)} compiled kernels spill', spills == 0),
            check(f'theoretical occupancy >= {target:.0%} for every forward and 2x2 backward{lowest}',
                  not any('occupancy' in m for m in missed))]


def render_triton_report(record: dict) -> str:
    """The Markdown of a ``bench triton-report`` record: the Triton version and what was compiled, the table, the
    missed targets, the checks and the compile time (or one line saying why it was skipped)."""
    from ...native.triton_aot import format_table

    if 'skipped' in record:
        return f"triton-report: skipped: {record['skipped']}"
    archs = ', '.join(f'sm_{a}' for a in record['archs'])
    lines = [f"Triton {record['triton']}: {record['specializations']} kernel specializations x {archs} "
             f"({record['channels']} channels, the launcher's GPU tiles), compiled ahead of time by "
             "Triton's ptxas, no GPU needed: registers, stack (spill) bytes and shared memory as cuobjdump reads them "
             "from each cubin, block and warps as the launcher picks them, theoretical occupancy from the "
             "architecture's limits.",
             '', f"Measured on: {record['machine']} (where it compiled; no GPU needed).", '',
             format_table(record['rows'])]
    if record['missed']:
        lines += [''] + [f'- missed: {m}' for m in record['missed']]
    lines += ['', checks_text(record['checks']), '', f"({record['seconds']} s)"]
    return '\n'.join(lines)
