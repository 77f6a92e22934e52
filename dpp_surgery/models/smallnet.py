"""A small residual network in which only the downsampling operator changes: the paper-style comparison.

Saeedan et al. compare pooling methods inside one ResNet, changing nothing but the downsampling. ``SmallResNet``
does the same at a size that trains on a CPU in minutes: a 3x3 stem, three stages of two BasicBlocks (widths
16/32/64 by default), two downsampling steps between the stages, global average pooling and a linear head, with
BatchNorm and ReLU. The downsampling variants (:data:`DOWNSAMPLE_VARIANTS`):

* ``'strided_conv'``: the first block of the stage runs its first 3x3 conv and its 1x1 shortcut at stride 2
  (the ResNet convention);
* ``'max'`` / ``'avg'``: ``MaxPool2d(2)`` / ``AvgPool2d(2)`` and then the block at stride 1;
* ``'dpp_<guide>_<reward>'`` (``dpp_lite_sym``, ``dpp_lite_asym``, ``dpp_full_sym``, ``dpp_full_asym``):
  ``DPP2d(channels, 2, guide=..., reward=..., init='paper')`` where the pools are.

Every variant has the same convs, norms and head (the pool variants' 1x1 shortcuts run at stride 1), so they
differ only by the downsampling operator and, for DPP, its own few parameters.

Example::

    >>> model = create_smallnet('dpp_lite_sym')
    >>> model(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..layers import DPP2d

__all__ = ['DOWNSAMPLE_VARIANTS', 'BasicBlock', 'SmallResNet', 'create_smallnet', 'make_downsample']

# downsampling variant name -> DPP2d (guide, reward); the other names are 'strided_conv', 'max' and 'avg'
_DPP_VARIANTS = {
    'dpp_lite_sym': ('lite', 'sym'),
    'dpp_lite_asym': ('lite', 'asym'),
    'dpp_full_sym': ('full', 'sym'),
    'dpp_full_asym': ('full', 'asym'),
}
DOWNSAMPLE_VARIANTS: Tuple[str, ...] = ('strided_conv', 'max', 'avg') + tuple(_DPP_VARIANTS)


def _check_variant(downsample: str) -> None:
    if downsample not in DOWNSAMPLE_VARIANTS:
        raise ValueError(f"unknown downsample variant {downsample!r}; available: {', '.join(DOWNSAMPLE_VARIANTS)}")


def make_downsample(downsample: str, channels: int) -> Optional[nn.Module]:
    """The 2x2/stride-2 layer of a pool-style variant, or None for ``'strided_conv'`` (the block downsamples)."""
    _check_variant(downsample)
    if downsample == 'strided_conv':
        return None
    if downsample == 'max':
        return nn.MaxPool2d(2)
    if downsample == 'avg':
        return nn.AvgPool2d(2)
    guide, reward = _DPP_VARIANTS[downsample]
    return DPP2d(channels, 2, guide=guide, reward=reward, init='paper')


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or 1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem, stages of BasicBlocks with a downsampling step before every stage but the first, pool, linear head.

    Stage ``i`` is ``stages[i].down`` (``nn.Identity`` in stage 0 and for ``'strided_conv'``, whose first block
    downsamples instead) followed by ``stages[i].blocks``.

    Args:
        downsample: one of :data:`DOWNSAMPLE_VARIANTS`.
        in_chans: input channels (1 for Fashion-MNIST).
        num_classes: classifier outputs.
        widths: channels of each stage; one downsampling step between consecutive stages.
        depth: BasicBlocks per stage.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)`; every size works (2x2 pooling floors odd sizes, a strided conv ceils them).
        - Output: ``(N, num_classes)``.
    """

    def __init__(self, downsample: str = 'strided_conv', in_chans: int = 1, num_classes: int = 10,
                 widths: Sequence[int] = (16, 32, 64), depth: int = 2):
        super().__init__()
        _check_variant(downsample)
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f'widths must be a non-empty list of positive channel counts, but got {list(widths)}')
        if depth < 1:
            raise ValueError(f'depth must be >= 1, but got {depth}')
        self.downsample, self.num_classes = downsample, num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages = []
        prev = widths[0]
        for i, width in enumerate(widths):
            # every stage is (down, blocks), so the variants share their parameter names
            down = make_downsample(downsample, prev) if i > 0 else None
            stride = 2 if i > 0 and down is None else 1
            blocks = [BasicBlock(prev, width, stride)] + [BasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(OrderedDict(down=down or nn.Identity(), blocks=nn.Sequential(*blocks))))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(self.pool(x).flatten(1))


def create_smallnet(downsample: str = 'strided_conv', **kwargs) -> SmallResNet:
    """A :class:`SmallResNet` with the given downsampling variant (kwargs as in :class:`SmallResNet`)."""
    return SmallResNet(downsample, **kwargs)
