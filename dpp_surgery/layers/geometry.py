"""Window geometry of 2-D pooling: output size and per-side padding.

Reproduces the window placement of ``nn.MaxPool2d`` / ``nn.AvgPool2d`` (kernel, stride, symmetric padding,
``ceil_mode``) and of timm's dynamic 'same' padding (``MaxPool2dSame``, ``AvgPool2dSame``, ``Conv2dSame``),
which pads asymmetrically at run time. Padded positions never take part in a DPP window.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

import torch

__all__ = ['PoolGeometry', 'ResolvedGeometry', 'to_pair', 'is_same_padding']

IntPair = Tuple[int, int]
PaddingArg = Union[int, Tuple[int, int], str]


def to_pair(value, name: str) -> IntPair:
    """Turn an int or a 2-sequence of ints into a pair, with an error naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise TypeError(f'{name} must be an int or a pair of ints, but got {value!r}')
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return int(value[0]), int(value[1])
    raise TypeError(f'{name} must be an int or a pair of ints, but got {value!r}')


@dataclass(frozen=True)
class ResolvedGeometry:
    """Geometry for one input size: output size and the padding on each side (top, bottom, left, right).

    Window ``(oh, ow)`` starts at ``(oh * sh - pad_top, ow * sw - pad_left)`` and covers ``kernel``
    positions; ``pad_bottom``/``pad_right`` make the last window fit exactly (they may exceed the nominal padding
    in ``ceil_mode``, where the last window hangs over the edge and keeps only its valid positions, and they are
    negative when the last rows or columns belong to no window).
    """
    kernel: IntPair
    stride: IntPair
    out_size: IntPair
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    # whether windows may reach outside the input (padding, 'same' or ceil_mode) for some input size; if not,
    # every window position is inside the input and the pads only crop
    reaches_out: bool = True


def _max0(v):
    return torch.sym_max(v, 0) if isinstance(v, torch.SymInt) else max(v, 0)


def _out_size_explicit(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    # torch's pooling_output_shape with dilation 1
    numer = size + 2 * p - k + ((s - 1) if ceil_mode else 0)
    out = numer // s + 1
    # the last window must start inside the input or its left padding; with no padding and k >= s it always does.
    # (A min, not torch's branch: a branch on symbolic sizes would add a guard torch.export cannot prove.)
    if ceil_mode and not (p == 0 and k >= s):
        last = (size + p - 1) // s + 1
        out = torch.sym_min(out, last) if isinstance(out, torch.SymInt) else min(out, last)
    return out


@dataclass(frozen=True)
class PoolGeometry:
    """Kernel, stride, padding and ceil_mode of a pooling window, as pairs (padding: a pair or ``'same'``); build one
    with :meth:`create`."""
    kernel: IntPair
    stride: IntPair
    padding: Union[IntPair, str]
    ceil_mode: bool = False

    @classmethod
    def create(
            cls,
            kernel_size: Union[int, IntPair] = 2,
            stride: Union[int, IntPair, None] = None,
            padding: PaddingArg = 0,
            ceil_mode: bool = False,
    ) -> 'PoolGeometry':
        """The geometry of a window, checked.

        Args:
            kernel_size: window size, int or pair.
            stride: window stride, int or pair; defaults to ``kernel_size``.
            padding: int or pair (implicit, symmetric, never part of a window), or ``'same'`` for timm's dynamic
                'same' padding (output size ``ceil(size / stride)``, the extra padding at the bottom/right).
            ceil_mode: as in ``nn.MaxPool2d``: allow a last window that starts inside the input or left padding
                and hangs over the far edge.

        Raises:
            ValueError: a size below 1, a negative padding or one above half the kernel, an unknown padding string.
        """
        kernel = to_pair(kernel_size, 'kernel_size')
        stride = kernel if stride is None else to_pair(stride, 'stride')
        if min(kernel) < 1:
            raise ValueError(f'kernel_size must be >= 1, but got {kernel}')
        if min(stride) < 1:
            raise ValueError(f'stride must be >= 1, but got {stride}')
        if isinstance(padding, str):
            if padding.lower() != 'same':
                raise ValueError(f"padding must be an int, a pair of ints or 'same', but got {padding!r}")
            pad: Union[IntPair, str] = 'same'
        else:
            pad = to_pair(padding, 'padding')
            if min(pad) < 0:
                raise ValueError(f'padding must be >= 0, but got {pad}')
            if pad[0] > kernel[0] // 2 or pad[1] > kernel[1] // 2:
                raise ValueError(
                    f'padding must be at most half the kernel size (as in torch pooling), but got padding={pad} '
                    f'for kernel_size={kernel}')
        return cls(kernel, stride, pad, bool(ceil_mode))

    @property
    def is_same(self) -> bool:
        return self.padding == 'same'

    def resolve(self, height: int, width: int) -> ResolvedGeometry:
        """Output size and per-side padding for an input of ``height`` x ``width``.

        Raises:
            ValueError: if the window is larger than the padded input (no output position).
        """
        sides = []
        outs = []
        # under torch.export the sizes are symbolic: avoid Python branches on them (they would specialise the
        # exported graph to the example's sizes); pads may then be negative, which crops (F.pad semantics)
        symbolic = isinstance(height, torch.SymInt) or isinstance(width, torch.SymInt)
        for dim, (size, k, s) in enumerate(zip((height, width), self.kernel, self.stride)):
            if self.is_same:
                out = (size + s - 1) // s  # ceil in integer arithmetic (no negative floor division: it would
                # make torch.export specialise symbolic sizes to one residue)
                total = (out - 1) * s + k - size
                if k < s:  # only then can the 'same' padding be negative
                    total = _max0(total)
                before = total // 2
            else:
                before = self.padding[dim]
                out = _out_size_explicit(size, k, s, before, self.ceil_mode)
                if not symbolic and out < 1:
                    raise ValueError(
                        f'DPP2d window {self.kernel} is larger than the padded input: input size '
                        f'{(height, width)} with padding {self.padding}. Use a larger input or a smaller kernel.')
            if not symbolic and size < 1:
                raise ValueError(f'DPP2d got an empty input of size {(height, width)}')
            after = (out - 1) * s + k - size - before  # negative: the last rows/columns are not in any window
            outs.append(out)
            sides.append((before, after))
        return ResolvedGeometry(
            kernel=self.kernel, stride=self.stride, out_size=(outs[0], outs[1]),
            pad_top=sides[0][0], pad_bottom=sides[0][1], pad_left=sides[1][0], pad_right=sides[1][1],
            reaches_out=self.is_same or self.ceil_mode or any(p > 0 for p in self.padding))

    def full_guide_kernel(self) -> IntPair:
        """Kernel of the Full guide filter: ``k + 1`` for an even window side, ``k`` for an odd one.

        For the paper's 2x2/stride-2 window this is the authors' 3x3, stride-2, padding-1 depthwise filter.
        """
        return tuple(k + 1 if k % 2 == 0 else k for k in self.kernel)  # type: ignore[return-value]

    def describe(self) -> str:
        def fmt(pair):
            return str(pair[0]) if pair[0] == pair[1] else f'{pair[0]}x{pair[1]}'
        text = f'kernel_size={fmt(self.kernel)}, stride={fmt(self.stride)}'
        if self.is_same:
            text += ", padding='same'"
        elif any(self.padding):
            text += f', padding={fmt(self.padding)}'
        if self.ceil_mode:
            text += ', ceil_mode=True'
        return text


def is_same_padding(m: torch.nn.Module) -> bool:
    """Whether ``m`` pads 'same' dynamically, from its input size at run time: timm's ``*Same`` layers
    (``Conv2dSame``, ``MaxPool2dSame``, ``AvgPool2dSame``, by class name) and modules flagged ``same_pad`` or
    ``dynamic_padding``. (A static ``padding='same'`` of ``nn.Conv2d`` is not dynamic.)"""
    return type(m).__name__.endswith('Same') or bool(getattr(m, 'same_pad', False)) or \
        bool(getattr(m, 'dynamic_padding', False))
