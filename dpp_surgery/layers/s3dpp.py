"""S3DPP: the paper's stochastic Detail-Preserving Pooling (DPP at stride 1, then S3Pool).

F. Saeedan, N. Weber, M. Goesele, S. Roth, "Detail-Preserving Pooling in Deep Networks", CVPR 2018, and the authors'
``S3_DPP_*.lua`` / ``s3pool.lua`` graphs; S3Pool is S. Zhai et al., "S3Pool: Pooling with Stochastic Spatial
Sampling", CVPR 2017. See :class:`S3DPP2d` (and the project's DPP specification, section 2b).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor

from .dpp import DPP2d
from .functional import DEFAULT_EPS, check_input, exporting
from .geometry import PoolGeometry

__all__ = ['S3DPP2d', 's3pool_indices']



def s3pool_indices(length: int, grid: int = 2, generator: Optional[torch.Generator] = None) -> Tensor:
    """The rows (or columns) S3Pool keeps of an axis of ``length``: a sorted CPU int64 tensor of ``ceil(length / 2)``
    indices, drawn from ``generator`` (torch's default CPU generator if None).

    The axis is cut into ``n = max(1, min(grid, length // 2))`` contiguous grids (at most ``grid``, each of at least two
    positions where the axis has two), grid ``k`` of size ``(length + k) // n`` (sizes differ by at most one, the larger
    ones last). An even grid keeps half its positions; odd grids keep alternately ``ceil`` and ``floor`` of half, the
    first odd grid rounding up, so the total is ``ceil(length / 2)``. Each grid draws its kept positions with
    ``torch.randperm(size, generator=generator)[:keep]`` (without replacement), sorted; grids draw in order.
    """
    n = max(1, min(grid, length // 2))
    parts: List[Tensor] = []
    start = 0
    odd_seen = 0
    for k in range(n):
        size = (length + k) // n
        keep = size // 2
        if size % 2:
            keep += 1 - odd_seen % 2
            odd_seen += 1
        chosen = torch.randperm(size, generator=generator)[:keep]
        parts.append(chosen.sort().values + start)
        start += size
    return torch.cat(parts)


@register_notrace_module  # one node in timm's FX feature extraction, as DPP2d
class S3DPP2d(DPP2d):
    r"""Stochastic Detail-Preserving Pooling (S3DPP): DPP with 2x2 windows at stride 1, then S3Pool by 2.

    1. **DPP at stride 1.** The input's last row and column are replicated (``F.pad(x, (0, 1, 0, 1),
       mode='replicate')``) and DPP with 2x2 windows at stride 1 runs over the result, so the intermediate map keeps the
       input's :math:`H \times W`: the window at :math:`(i, j)` covers rows :math:`i, i+1` and columns :math:`j, j+1`.
       This is the net effect of the authors' four shifted DPP copies and their interleave ("merger"). The DPP is
       :class:`DPP2d`'s own computation (every implementation: CPU kernel, Triton, PyTorch) with the geometry
       ``kernel_size=2, stride=1`` held in ``self.geometry``; the options ``guide``, ``reward``, ``norm``, ``init``,
       ``eps`` and ``impl`` mean what they mean there. The Full guide is DPP2d's 3x3 depthwise filter at stride 1,
       reaching one row and column before the window (zero padding at the top and left). (The authors' shifted copies
       zero-pad each shifted image instead, so at the top row and left column of the odd-offset windows their guide
       reads a zero where this one reads the input's first row or column.)
    2. **S3Pool by 2.** In training, each spatial axis of the intermediate map is cut into ``grid`` grids (the
       authors' code: grid size :math:`g = H / 2`, i.e. two grids per axis, the default) and each grid keeps a random
       half of its rows, drawn without replacement and kept in increasing order; columns likewise, independently. The
       draw is new at every call and the same for the whole batch and every channel (as in the authors' code); the
       kept rows and columns are gathered with ``index_select``, whose gradient is the scatter of the authors' Lua
       backward loop. In evaluation (``model.eval()``), 2x2 average pooling with stride 2 and ``ceil_mode=True``.

    **Sizes.** Both modes give :math:`\lceil H / 2 \rceil \times \lceil W / 2 \rceil`, the size of
    ``DPP2d(C, 2, 2, ceil_mode=True)`` and of a stride-2 conv with padding 1; a length of 1 stays 1. An axis of
    length :math:`L` is cut into :math:`n = \max(1, \min(\text{grid}, \lfloor L / 2 \rfloor))` grids, so every grid has
    at least two positions where the axis has two; grid :math:`k` has :math:`\lfloor (L + k) / n \rfloor` positions
    (sizes differ by at most one, the larger last). An even grid keeps half; odd grids keep alternately the ceil and
    the floor of half (the first odd grid rounds up), which keeps :math:`\lceil L / 2 \rceil` in all. For :math:`L`
    divisible by :math:`2 \cdot \text{grid}` this is the authors' rule. See :func:`s3pool_indices`.

    **Randomness.** Rows are drawn before columns, grid by grid, with ``torch.randperm`` on the CPU from
    ``generator`` (torch's default CPU generator if None), so ``torch.manual_seed(s)`` makes training runs repeat. The
    kept indices go to the input's device with a non-blocking copy; nothing waits for the device. The last draw is
    kept in ``last_indices`` (``(rows, cols)``, CPU tensors; None before the first training call) for inspection; it
    is not part of the ``state_dict``.

    **A DPP2d subclass.** ``S3DPP2d`` subclasses :class:`DPP2d` rather than holding one: it has DPP2d's parameters
    under the same names and shapes (``theta_alpha``, ``theta_lambda`` and, with the Full guide, ``guide_weight``, a
    3x3 filter), so its ``state_dict`` keys are DPP2d's, and code that finds DPP layers with ``isinstance(m, DPP2d)``
    (:func:`dpp_surgery.dpp_layers`, :func:`dpp_surgery.param_groups`, FX leaf rules, the ONNX export) counts it.
    The geometry does not fight this: ``self.geometry`` is the DPP step's (2x2, stride 1), which DPP2d's computation
    and the exporter read. The pool-like attributes ``kernel_size``, ``stride``, ``padding`` and ``ceil_mode``
    describe the whole layer as a downsampler, ``(2, 2)``, ``(2, 2)``, ``(0, 0)`` and ``True`` (its output size and
    evaluation pooling), not the DPP step.

    **Export.** In evaluation mode the layer traces and exports (``torch.jit.trace``, ``torch.export``,
    :func:`dpp_surgery.export_onnx` in both modes, with dynamic batch and spatial sizes) as its evaluation
    computation: the replicate padding (ONNX ``Pad``, mode ``edge``), the stride-1 DPP (a ``dpp_surgery.DPP2d`` node
    with ``kernel_shape=[2, 2]``, ``strides=[1, 1]`` in ``mode='custom'``, standard operators in
    ``mode='decomposed'``) and the average pooling, written as another ``Pad`` (edge) and a floor-mode 2x2
    ``AveragePool``: a window that hangs over the edge then averages its valid positions, the same values as
    ``ceil_mode=True``, whose own last-window check torch.export cannot prove for dynamic sizes. The exporter runs
    each DPP layer's ``compute`` (its DPP computation) as one op; here that is the DPP step alone, and the padding
    and pooling around it stay standard operators. Tracing or
    exporting in training mode raises a RuntimeError saying to call ``model.eval()`` (the random draw cannot be
    recorded); :func:`dpp_surgery.export_onnx` puts the model in evaluation mode itself.

    Args:
        channels: number of input channels C.
        guide, reward, norm, init, eps, impl: the DPP options, as in :class:`DPP2d`.
        grid: the number of S3Pool grids per axis (an int >= 1; default 2, the authors' code).
        generator: a CPU ``torch.Generator`` for the training draws; None: torch's default CPU generator.

    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: :math:`(N, C, \lceil H / 2 \rceil, \lceil W / 2 \rceil)`, in training and evaluation.

    Examples::

        >>> pool = S3DPP2d(64)
        >>> pool
        S3DPP2d(64, grid=2, guide=lite, reward=sym, norm=mean)
        >>> pool(torch.randn(8, 64, 33, 32)).shape
        torch.Size([8, 64, 17, 16])
    """

    def __init__(
            self,
            channels: int,
            *,
            guide: str = 'lite',
            reward: str = 'sym',
            norm: str = 'mean',
            init: Union[str, Tuple[float, float]] = 'paper',
            eps: float = DEFAULT_EPS,
            impl: str = 'auto',
            grid: int = 2,
            generator: Optional[torch.Generator] = None,
            device=None,
            dtype=None,
    ):
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f'grid must be an int >= 1 (the number of S3Pool grids per axis), but got {grid!r}')
        if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != 'cpu'):
            raise ValueError(f'generator must be a CPU torch.Generator or None, but got {generator!r}')
        super().__init__(channels, kernel_size=2, stride=1, padding=0, ceil_mode=False, guide=guide, reward=reward,
                         norm=norm, init=init, eps=eps, impl=impl, device=device, dtype=dtype)
        self.grid = grid
        self.generator = generator
        self.last_indices: Optional[Tuple[Tensor, Tensor]] = None

    # the whole layer, as a downsampler (kernel_size, stride, padding, ceil_mode): output ceil(H / 2), 2x2 average
    # pooling in evaluation
    pool_geometry = PoolGeometry.create(2, 2, 0, True)

    def _layer(self, x: Tensor) -> Tensor:
        if self.training and exporting():
            raise RuntimeError(
                'S3DPP2d in training mode draws random rows and columns at every call, which a trace or an export '
                'cannot record: call model.eval() before tracing or exporting (evaluation pools by 2x2 averages)')
        check_input(x, self.channels)
        y = self.dpp_step(F.pad(x, (0, 1, 0, 1), mode='replicate'))
        if self.training:
            return self.s3pool(y)
        # 2x2 average pooling with stride 2 and ceil_mode=True, as floor-mode pooling of y with its last row and
        # column replicated: a window hanging over the edge then averages its valid positions, as ceil_mode's does,
        # and torch.export keeps the sizes dynamic (ceil_mode's own last-window check is a guard it cannot prove)
        return F.avg_pool2d(F.pad(y, (0, 1, 0, 1), mode='replicate'), 2, 2)

    def dpp_step(self, xp: Tensor) -> Tensor:
        r"""The DPP with 2x2 windows at stride 1 over an input whose last row and column are already replicated
        (:math:`(H + 1) \times (W + 1)` in, :math:`H \times W` out)."""
        return self.compute(xp)  # (what the ONNX exporter replaces by its one-op form, as on DPP2d)

    def s3pool(self, y: Tensor, indices: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """S3Pool's training step on the intermediate map ``y``: the rows and columns of ``indices`` (a pair of
        int64 tensors), or of a new draw (:func:`s3pool_indices`, rows then columns), recorded in ``last_indices``."""
        if indices is None:
            h, w = y.shape[-2:]
            indices = (s3pool_indices(h, self.grid, self.generator), s3pool_indices(w, self.grid, self.generator))
            self.last_indices = indices
        rows, cols = (t.to(y.device, non_blocking=True) for t in indices)
        return y.index_select(2, rows).index_select(3, cols)

    def extra_repr(self) -> str:
        text = f'{self.channels}, grid={self.grid}, guide={self.guide}, reward={self.reward}, norm={self.norm}'
        if self.eps != DEFAULT_EPS:
            text += f', eps={self.eps}'
        if self.impl != 'auto':
            text += f', impl={self.impl}'
        return text
