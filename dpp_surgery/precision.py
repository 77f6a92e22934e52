"""Mixed precision that follows the hardware: which autocast dtype ``amp='auto'`` picks, and why.

bfloat16 autocast pays only where the CPU computes bfloat16 natively (AVX-512 BF16 or AMX on x86, the BF16
extension on Arm). Elsewhere oneDNN emulates it, and a training step can be more than 10x slower than float32
(EfficientNet-Lite0, batch 32, 64 px: 5.5 s against 0.42 s on a 2-core AVX2 CPU). So ``'auto'`` is:

* CPU: bfloat16 where it is native, float32 otherwise;
* CUDA: bfloat16 where the GPU supports it, else float16 with a ``GradScaler``;
* any other device: float32.

An explicit ``'bf16'`` on a CPU without native bfloat16 still runs, with a :class:`PrecisionWarning` that says it
will be slow and why.
"""
from __future__ import annotations

import logging
import os
import platform
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ['AMP_CHOICES', 'AmpChoice', 'PrecisionWarning', 'cpu_bf16_native', 'cpu_description', 'cpu_model',
           'resolve_amp']

_logger = logging.getLogger(__name__)

AMP_CHOICES = ('auto', 'none', 'bf16', 'fp16')
_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
_NAMES = {'none': 'float32', 'bf16': 'bfloat16 autocast', 'fp16': 'float16 autocast'}
# CPU flags (Linux /proc/cpuinfo) that mean bfloat16 arithmetic in hardware
_X86_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')
_ARM_BF16_FLAGS = ('bf16',)


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


def resolve_amp(amp: str, device) -> AmpChoice:
    """The precision for ``amp`` (``'auto'``, ``'none'``, ``'bf16'``, ``'fp16'``) on ``device``.

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
            return AmpChoice('bf16' if native else 'none', amp, why)
        if amp == 'fp16':
            raise ValueError("amp 'fp16' needs a GPU (CPU autocast has no float16 GradScaler); on the CPU use "
                             "'auto', 'bf16' or 'none'")
        if amp == 'bf16' and not native:
            warnings.warn(f'bfloat16 autocast was asked for, but this CPU has no native bfloat16 ({why}): it runs '
                          'emulated, often more than 10x slower than float32. Use amp auto or none (CLI: --amp auto).',
                          PrecisionWarning, stacklevel=2)
            return AmpChoice('bf16', amp, f'as asked; emulated: {why}')
        return AmpChoice(amp, amp, 'as asked' + (f'; {why}' if amp == 'bf16' else ''))
    if device.type == 'cuda':
        bf16 = torch.cuda.is_bf16_supported()
        if amp == 'auto':
            return AmpChoice('bf16' if bf16 else 'fp16', amp, f'GPU {"supports" if bf16 else "lacks"} bfloat16')
        if amp == 'bf16' and not bf16:
            raise ValueError(f"amp 'bf16' is not supported by {torch.cuda.get_device_name(device)}; use 'auto' "
                             "(float16 with a GradScaler) or 'none'")
        return AmpChoice(amp, amp, 'as asked')
    if amp == 'auto':
        return AmpChoice('none', amp, f'no mixed precision chosen automatically on {device.type}')
    return AmpChoice(amp, amp, 'as asked')
