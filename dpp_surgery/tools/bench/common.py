"""What every benchmark shares: its record (the measurements, the command, machine, date and versions) and the
PASS/MISS lines of its targets.

A benchmark is two functions: ``bench_NAME(args) -> dict`` measures and returns the record's data (JSON types
only; progress goes to stderr), and ``render_NAME(record) -> str`` writes its Markdown (a sentence on what was
measured and how, the machine, the tables, the targets) from the record alone. ``python -m dpp_surgery.bench``
prints the rendering of the record after a JSON round trip and, with ``--record PATH``, writes that record; the
docs' results pages are made from the committed records by the same renderers
(:mod:`dpp_surgery.tools.docs_results`), so a page cannot say what its record does not.
"""
from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from typing import Dict, Iterable, List, Mapping

__all__ = ['RECORD_FORMAT', 'record_meta', 'roundtrip', 'checks_text', 'check', 'note_ort_kernel', 'versions']

RECORD_FORMAT = 1  # the version of the record's layout


def versions() -> Dict[str, str]:
    """The versions of what the benchmarks run on: Python, torch, timm and, where importable, onnxruntime and
    Triton."""
    import importlib
    import torch

    found = {'python': platform.python_version(), 'torch': torch.__version__}
    for name in ('timm', 'onnxruntime', 'triton'):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 (not installed, or broken: not part of this record)
            pass
    return found


def record_meta(argv: Iterable[str]) -> dict:
    """The record's ``meta``: the command as typed (``python -m dpp_surgery.bench ...``), the date (UTC), the
    versions. The machine is the benchmark's own (it knows the device it ran on)."""
    return {'format': RECORD_FORMAT, 'command': 'python -m dpp_surgery.bench ' + shlex.join(list(argv)),
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'versions': versions()}


def roundtrip(record: Mapping) -> dict:
    """``record`` as it reads back from its JSON file (tuples as lists, every key a string): what the renderers
    see, whether they print it now or a page is made from the file later."""
    return json.loads(json.dumps(record, default=str))


def check(text: str, ok: bool) -> dict:
    """One target's outcome in a record."""
    return {'check': text, 'pass': bool(ok)}


def checks_text(checks: List[Mapping]) -> str:
    """The targets of a record, one Markdown list item each: ``- PASS: ...`` or ``- MISS: ...``."""
    return '\n'.join(f"- {'PASS' if c['pass'] else 'MISS'}: {c['check']}" for c in checks)


def note_ort_kernel(column: str) -> None:
    """Say on stderr when the native onnxruntime kernel is unavailable, so that ``column`` times the ONNX functions."""
    from ...native.ort_kernel import ort_kernel_status

    status = ort_kernel_status()
    if not status['loaded']:
        print(f"note: no native onnxruntime kernel ({status['error']}); {column} runs the ONNX functions",
              file=sys.stderr)
