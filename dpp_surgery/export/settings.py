"""A DPP2d layer's settings on their way to ONNX, in one typed record.

:class:`DPPNodeSettings` is made from the layer (:meth:`~DPPNodeSettings.from_layer`), turned into the argument list
of the op that export traces (:meth:`~DPPNodeSettings.op_args`) and back (:meth:`~DPPNodeSettings.from_op_args`),
into the ``dpp_surgery.DPP2d`` node's attributes (:meth:`~DPPNodeSettings.attributes`) and back
(:meth:`~DPPNodeSettings.from_node`), and it is what the decomposition (:func:`.decomposition.emit_dpp`) reads. The
defaults of the node's optional attributes live here only: the field defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Tuple

from ..layers import DPP2d, PoolGeometry

__all__ = ['DPPNodeSettings']


@dataclasses.dataclass(frozen=True)
class DPPNodeSettings:
    """What a ``dpp_surgery.DPP2d`` node computes, besides its inputs.

    Args:
        geometry: the window (kernel, stride, padding or ``'same'``, ceil_mode).
        full: the Full guide (a ``guide_weight`` input) rather than the Lite one.
        reward: ``'sym'`` or ``'asym'``.
        norm: ``'mean'``, ``'none'`` or ``'sum'``.
        eps: added to the squared deviation.
    """
    geometry: PoolGeometry
    full: bool = False
    reward: str = 'sym'
    norm: str = 'mean'
    eps: float = 1e-3

    @classmethod
    def from_layer(cls, layer: DPP2d) -> 'DPPNodeSettings':
        """The settings of a DPP2d layer (or subclass) as it computes now."""
        return cls(layer.geometry, layer.guide_weight is not None, layer.reward, layer.norm, float(layer.eps))

    @classmethod
    def from_op_args(cls, kernel: List[int], stride: List[int], padding: List[int], same: bool, ceil_mode: bool,
                     asym: bool, norm: str, eps: float, full: bool) -> 'DPPNodeSettings':
        """Back from the traced op's arguments (:meth:`op_args`; ``full``: whether it has a guide weight)."""
        geometry = PoolGeometry.create(tuple(kernel), tuple(stride), 'same' if same else tuple(padding[:2]),
                                       bool(ceil_mode))
        return cls(geometry, bool(full), 'asym' if asym else 'sym', str(norm), float(eps))

    def op_args(self) -> Tuple[List[int], List[int], List[int], bool, bool, bool, str, float]:
        """(kernel, stride, padding as 4 ints, same, ceil_mode, asym, norm, eps): the traced op's arguments after the
        tensors, all of them plain ints, floats, bools and strings (what a custom op's schema takes)."""
        g = self.geometry
        return (list(g.kernel), list(g.stride), self.pads, g.is_same, g.ceil_mode, self.reward == 'asym', self.norm,
                self.eps)

    @property
    def pads(self) -> List[int]:
        """The padding as the node writes it: (top, left, bottom, right), zeros for 'same'."""
        pad = (0, 0) if self.geometry.is_same else self.geometry.padding
        return [pad[0], pad[1], pad[0], pad[1]]

    def attributes(self) -> Dict[str, object]:
        """The node's attributes (see :func:`.translation.register_onnx_schema`)."""
        g = self.geometry
        return dict(kernel_shape=list(g.kernel), strides=list(g.stride), pads=self.pads,
                    auto_pad='SAME' if g.is_same else 'NOTSET', ceil_mode=int(g.ceil_mode), reward=self.reward,
                    norm=self.norm, eps=float(self.eps))

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, object], full: bool) -> 'DPPNodeSettings':
        """Back from a node's attributes (the optional ones absent: the field defaults)."""
        pads = list(attributes.get('pads', [0, 0, 0, 0]))
        geometry = PoolGeometry.create(
            tuple(attributes['kernel_shape']), tuple(attributes['strides']),
            'same' if attributes.get('auto_pad', 'NOTSET') == 'SAME' else (pads[0], pads[1]),
            bool(attributes.get('ceil_mode', 0)))
        # (a dataclass keeps its fields' defaults as class attributes)
        return cls(geometry, bool(full), str(attributes.get('reward', cls.reward)),
                   str(attributes.get('norm', cls.norm)), float(attributes.get('eps', cls.eps)))

    @classmethod
    def from_node(cls, node) -> 'DPPNodeSettings':
        """The settings of a ``dpp_surgery.DPP2d`` NodeProto."""
        import onnx

        values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        values = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in values.items()}
        return cls.from_attributes(values, full=len(node.input) > 3 and bool(node.input[3]))

    def overload(self, channels: Optional[int] = None) -> str:
        """A readable name for this configuration, e.g. ``k2x2_s2x2_p0x0_lite_sym_mean_eps0.001`` (``channels``: a
        ``_c<C>`` suffix, for decompositions that hold a channel count)."""
        g = self.geometry
        (kh, kw), (sh, sw) = g.kernel, g.stride
        pad = 'same' if g.is_same else f'p{g.padding[0]}x{g.padding[1]}'
        name = (f"k{kh}x{kw}_s{sh}x{sw}_{pad}{'_ceil' if g.ceil_mode else ''}_{'full' if self.full else 'lite'}_"
                f'{self.reward}_{self.norm}_eps{self.eps:.6g}')
        return name if channels is None else f'{name}_c{channels}'
