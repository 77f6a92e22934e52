"""Mixed precision that follows the hardware: which autocast dtype ``amp='auto'`` picks, and why.

bfloat16 autocast pays only where the CPU computes bfloat16 natively (AVX-512 BF16 or AMX on x86, the BF16
extension on Arm). Elsewhere oneDNN emulates it, and a training step can be more than 10x slower than float32
(EfficientNet-Lite0, batch 32, 64 px: 5.5 s against 0.42 s on a 2-core AVX2 CPU). So ``'auto'`` is:

* CPU: bfloat16 where it is native *and* faster for the model at hand, float32 otherwise. Native bfloat16 is not
  faster for every model: oneDNN's bfloat16 backward of strided depthwise convolutions is slow, so the original
  EfficientNet-Lite0 trains slower under bfloat16 than in float32 even on an AVX-512 BF16 CPU. Given a probe
  (:func:`probe_cpu_bf16`: a few forward+backward passes of a copy of the model on one real batch, in both
  precisions), ``'auto'`` takes bfloat16 only when it measured at least ``1 - PROBE_MARGIN`` faster;
* CUDA: bfloat16 where the GPU supports it, else float16 with a ``GradScaler``;
* any other device: float32.

An explicit ``'bf16'`` on a CPU without native bfloat16 still runs, with a :class:`PrecisionWarning` that says it
will be slow and why.
"""
from __future__ import annotations

import copy
import os
import statistics
import time
import platform
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

__all__ = ['AMP_CHOICES', 'PRECISION_NAMES', 'PROBE_MARGIN', 'AmpChoice', 'PrecisionWarning', 'probe_cpu_bf16',
           'cpu_bf16_native', 'cpu_description', 'cpu_model', 'resolve_amp']

AMP_CHOICES = ('auto', 'none', 'bf16', 'fp16')
_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# amp choice -> the dtype it computes in, for tables
PRECISION_NAMES = {'none': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}
_NAMES = {amp: name if amp == 'none' else f'{name} autocast' for amp, name in PRECISION_NAMES.items()}
# CPU flags (Linux /proc/cpuinfo) that mean bfloat16 arithmetic in hardware
_X86_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')
_ARM_BF16_FLAGS = ('bf16',)
# 'auto' takes bfloat16 on a CPU only if a probed training step ran at most this fraction of float32's time
PROBE_MARGIN = 0.95


class PrecisionWarning(UserWarning):
    """The requested precision runs, but slowly on this hardware."""


def _cpu_flags() -> Optional[set]:
    """The CPU feature flags the OS reports, or None where they cannot be read."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip().lower() in ('flags', 'features'):
                    return set(value.split())
    except OSError:
        return None
    return None


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what :mod:`platform` knows."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.lower().startswith('model name'):
                    return line.partition(':')[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """CPU model, torch's CPU capability and whether bfloat16 is native, in a few words."""
    native = cpu_bf16_native()[0]
    return (f'{cpu_model()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, '
            f'{"native" if native else "no native"} bfloat16')


def cpu_bf16_native() -> tuple:
    """Whether this CPU computes bfloat16 in hardware (so that bfloat16 autocast is fast), and the reason.

    Needs both oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, which also honours
    ``ONEDNN_MAX_CPU_ISA``) and, where the OS reports CPU flags, a bfloat16 instruction flag: oneDNN accepts plain
    AVX-512 too, where it emulates bfloat16.

    Returns:
        ``(native, reason)``.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    if not onednn:
        return False, f'oneDNN reports no bfloat16 support (CPU capability {capability})'
    flags = _cpu_flags()
    if flags is None:
        return True, f'oneDNN reports bfloat16 support (CPU capability {capability}; CPU flags unreadable)'
    wanted = _ARM_BF16_FLAGS if platform.machine().lower() in ('aarch64', 'arm64') else _X86_BF16_FLAGS
    found = [f for f in wanted if f in flags]
    if not found:
        return False, (f'CPU capability {capability} without a bfloat16 instruction set ({" or ".join(wanted)}): '
                       'oneDNN would emulate it')
    limit = os.environ.get('ONEDNN_MAX_CPU_ISA')
    return True, f'CPU capability {capability}, {", ".join(found)}' + (f', ONEDNN_MAX_CPU_ISA={limit}' if limit else '')


@dataclass(frozen=True)
class AmpChoice:
    """The precision a run uses: ``amp`` is ``'none'``, ``'bf16'`` or ``'fp16'``; ``dtype`` the autocast dtype
    (None for float32); ``grad_scaler`` whether float16 needs a GradScaler; ``reason`` why it was chosen."""
    amp: str
    requested: str
    reason: str

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return _DTYPES[self.amp]

    @property
    def grad_scaler(self) -> bool:
        return self.amp == 'fp16'

    @property
    def description(self) -> str:
        """For example ``'float32 (amp=auto: oneDNN reports no bfloat16 support ...)'``."""
        return f'{_NAMES[self.amp]} (amp={self.requested}: {self.reason})'

    def to_dict(self) -> dict:
        return {'amp': self.amp, 'requested': self.requested, 'precision': _NAMES[self.amp], 'reason': self.reason}


def probe_cpu_bf16(model: torch.nn.Module, example: torch.Tensor, steps: int = 2) -> Dict[str, float]:
    """Median milliseconds of a forward+backward pass of a copy of ``model`` on ``example``, in float32 and under
    bfloat16 autocast (after one warm-up pass each, timed in turn). ``model`` and the RNG state are left as they were.

    Returns:
        ``{'none': ms, 'bf16': ms}``.
    """
    rng = torch.get_rng_state()
    clone = copy.deepcopy(model).train()
    times: Dict[str, list] = {'none': [], 'bf16': []}
    try:
        for i in range(steps + 1):
            for amp in times:
                t0 = time.perf_counter()
                with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp == 'bf16'):
                    out = clone(example)
                    out = out if isinstance(out, torch.Tensor) else out[0]
                out.float().mean().backward()
                clone.zero_grad(set_to_none=True)
                if i:  # the first pass of each warms up (oneDNN primitives, allocations)
                    times[amp].append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_rng_state(rng)
    return {k: statistics.median(v) for k, v in times.items()}


def resolve_amp(amp: str, device, probe: Optional[Callable[[], Dict[str, float]]] = None) -> AmpChoice:
    """The precision for ``amp`` (``'auto'``, ``'none'``, ``'bf16'``, ``'fp16'``) on ``device``.

    Args:
        amp: the requested precision.
        device: where the model runs.
        probe: for ``'auto'`` on a CPU with native bfloat16: a function returning the measured step times
            ``{'none': ms, 'bf16': ms}`` (for example a :func:`probe_cpu_bf16` call); bfloat16 is then taken only
            if it ran at most ``PROBE_MARGIN`` of float32's time. Without one, native bfloat16 is taken.

    Raises:
        ValueError: an unknown ``amp``, or ``'fp16'`` on a CPU.

    Warns:
        PrecisionWarning: ``'bf16'`` asked for on a CPU without native bfloat16.
    """
    device = torch.device(device)
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(map(repr, AMP_CHOICES))}, but got {amp!r}")
    if device.type == 'cpu':
        native, why = cpu_bf16_native()
        if amp == 'auto':
            if not native or probe is None:
                return AmpChoice('bf16' if native else 'none', amp, why)
            times = probe()
            faster = times['bf16'] <= PROBE_MARGIN * times['none']
            measured = (f"a probed training step took {times['bf16']:.0f} ms in bfloat16, {times['none']:.0f} ms in "
                        'float32')
            return AmpChoice('bf16' if faster else 'none', amp,
                             f'{why}; {measured}' + ('' if faster else ', so float32 is faster for this model'))
        if amp == 'fp16':
            raise ValueError("float16 autocast (--amp-dtype float16) needs a GPU (CPU autocast has no float16 "
                             'GradScaler); on the CPU use --amp-dtype auto or bfloat16, or --no-amp')
        if amp == 'bf16' and not native:
            warnings.warn(f'bfloat16 autocast was asked for, but this CPU has no native bfloat16 ({why}): it runs '
                          'emulated, often more than 10x slower than float32. Use --amp-dtype auto or --no-amp.',
                          PrecisionWarning, stacklevel=2)
            return AmpChoice('bf16', amp, f'as asked; emulated: {why}')
        return AmpChoice(amp, amp, 'as asked' + (f'; {why}' if amp == 'bf16' else ''))
    if device.type == 'cuda':
        bf16 = torch.cuda.is_bf16_supported()
        if amp == 'auto':
            return AmpChoice('bf16' if bf16 else 'fp16', amp, f'GPU {"supports" if bf16 else "lacks"} bfloat16')
        if amp == 'bf16' and not bf16:
            raise ValueError(f'bfloat16 autocast (--amp-dtype bfloat16) is not supported by '
                             f'{torch.cuda.get_device_name(device)}; use --amp-dtype auto (float16 with a GradScaler) '
                             'or --no-amp')
        return AmpChoice(amp, amp, 'as asked')
    if amp == 'auto':
        return AmpChoice('none', amp, f'no mixed precision chosen automatically on {device.type}')
    return AmpChoice(amp, amp, 'as asked')
