"""Timing and machine description shared by the tools: every table names its machine, and ratios come from
interleaved runs in one process."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from .native.kernel import load_kernel, triton_status

__all__ = ['machine_description', 'gpu_description', 'device_description', 'peak_bandwidth', 'interleaved_medians']


def machine_description() -> str:
    """One line naming the CPU (model, capability, native bfloat16 or not), core count, thread count and library
    versions."""
    from .training.precision import cpu_description

    kernel = 'on' if load_kernel() is not None else 'off'
    return (f'{cpu_description()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, '
            f'torch {torch.__version__}, Python {platform.python_version()}, fused kernel {kernel}')


def peak_bandwidth(device) -> float:
    """The device's peak memory bandwidth in bytes/s, from its memory clock (double data rate) and bus width."""
    props = torch.cuda.get_device_properties(device)
    return 2.0 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8


def gpu_description(device) -> str:
    """One line naming the GPU (model, compute capability, memory, peak bandwidth) and the CUDA and Triton
    versions; the host CPU follows in :func:`machine_description`."""
    props = torch.cuda.get_device_properties(device)
    version = triton_status()['version']
    tri = f'Triton {version}' if version else 'no Triton'
    return (f'{props.name} (compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, '
            f'peak bandwidth {peak_bandwidth(device) / 1e12:.2f} TB/s), CUDA {torch.version.cuda}, {tri}; host: '
            f'{machine_description()}')


def device_description(device) -> str:
    """:func:`gpu_description` for a CUDA device, else :func:`machine_description`."""
    return gpu_description(device) if torch.device(device).type == 'cuda' else machine_description()


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeat: int, warmup: int = 3,
                        device: Optional[torch.device] = None, inner: int = 1) -> Dict[str, float]:
    """Median milliseconds of each function, timed in round-robin order so that drifts in machine load hit
    every function alike and ratios between them stay meaningful.

    On a CUDA ``device`` each measurement is the time between two CUDA events around ``inner`` back-to-back calls
    (divided by ``inner``), read after the round has finished on the device: the device's time, not the time the
    host took to queue the work. Elsewhere, wall-clock time of ``inner`` calls, divided by ``inner``."""
    cuda = device is not None and torch.device(device).type == 'cuda'
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        events = {}
        for name, fn in fns.items():
            if cuda:
                events[name] = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[name][0].record()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            if cuda:
                events[name][1].record()
            else:
                times[name].append((time.perf_counter() - t0) / inner)
        if cuda:
            torch.cuda.synchronize(device)
            for name, (start, end) in events.items():
                times[name].append(start.elapsed_time(end) / 1e3 / inner)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
