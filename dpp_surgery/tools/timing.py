"""Timing and machine description shared by the tools: every table names its machine, and ratios come from
interleaved runs in one process."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch

from ..layers import kernel_status

__all__ = ['machine_description', 'interleaved_medians']


def machine_description() -> str:
    """One line naming the CPU (model, capability, native bfloat16 or not), core count, thread count and library
    versions."""
    from ..training.precision import cpu_description

    kernel = 'on' if kernel_status()['loaded'] else 'off'
    return (f'{cpu_description()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, '
            f'torch {torch.__version__}, Python {platform.python_version()}, fused kernel {kernel}')


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeat: int, warmup: int = 3) -> Dict[str, float]:
    """Median milliseconds of each function, timed in round-robin order so that drifts in machine load hit
    every function alike and ratios between them stay meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
