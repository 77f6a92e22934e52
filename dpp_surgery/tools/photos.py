"""Real photos for demos and measurements: the sample images that scikit-learn and scikit-image ship.

scikit-learn ships two CC-BY photos (``china.jpg``, ``flower.jpg``); scikit-image ships public-domain and
CC0 test images in its wheel (the ones listed in :data:`SKIMAGE_PHOTOS`). Nothing is downloaded.
"""
from __future__ import annotations

from typing import Dict, List

import torch

__all__ = ['SAMPLE_PHOTOS', 'SKIMAGE_PHOTOS', 'load_photo', 'load_photos']

SAMPLE_PHOTOS: List[str] = ['china.jpg', 'flower.jpg']
# scikit-image test images that are photographs (grey ones are repeated over 3 channels)
SKIMAGE_PHOTOS: List[str] = ['astronaut', 'chelsea', 'coffee', 'rocket', 'camera', 'clock', 'coins', 'moon',
                             'hubble_deep_field', 'immunohistochemistry', 'brick', 'grass', 'gravel']


def _to_tensor(img) -> torch.Tensor:
    t = torch.from_numpy(img.copy())
    if t.dim() == 2:
        t = t.unsqueeze(-1).expand(-1, -1, 3)
    t = t[..., :3].permute(2, 0, 1).unsqueeze(0)
    if t.dtype == torch.bool:
        t = t.float()
    elif t.dtype == torch.uint8:
        t = t.float() / 255.0
    else:
        t = t.float()
        t = (t - t.min()) / (t.max() - t.min()).clamp_min(1e-12)
    return t.contiguous()


def load_photo(name: str = 'china.jpg') -> torch.Tensor:
    """One photo as a float tensor (1, 3, H, W) in [0, 1]: a scikit-learn name (``china.jpg``) or a scikit-image
    one (``chelsea``).

    Raises:
        ValueError: for an unknown name.
        RuntimeError: if the package that ships it is not installed.
    """
    if name in SAMPLE_PHOTOS:
        try:
            from sklearn.datasets import load_sample_image
        except ImportError as e:
            raise RuntimeError("the sample photos come with scikit-learn: pip install 'dpp_surgery[demo]'") from e
        return _to_tensor(load_sample_image(name))
    if name in SKIMAGE_PHOTOS:
        try:
            import skimage.data
        except ImportError as e:
            raise RuntimeError("this photo comes with scikit-image: pip install 'dpp_surgery[demo]'") from e
        return _to_tensor(getattr(skimage.data, name)())
    raise ValueError(f"unknown photo {name!r}; available: {', '.join(SAMPLE_PHOTOS + SKIMAGE_PHOTOS)}")


def load_photos() -> Dict[str, torch.Tensor]:
    """Every available photo by name (those of a missing package are left out)."""
    out = {}
    for name in SAMPLE_PHOTOS + SKIMAGE_PHOTOS:
        try:
            out[name] = load_photo(name)
        except RuntimeError:
            continue
    return out
