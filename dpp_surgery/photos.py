"""Real photos for demos and measurements: the CC-BY sample images that scikit-learn ships."""
from __future__ import annotations

from typing import List

import torch

__all__ = ['SAMPLE_PHOTOS', 'load_photo']

SAMPLE_PHOTOS: List[str] = ['china.jpg', 'flower.jpg']


def load_photo(name: str = 'china.jpg') -> torch.Tensor:
    """One of scikit-learn's sample photos as a float tensor (1, 3, H, W) with values in [0, 1].

    Raises:
        ValueError: for a name that is not in :data:`SAMPLE_PHOTOS`.
        RuntimeError: if scikit-learn is not installed.
    """
    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"unknown photo {name!r}; available: {', '.join(SAMPLE_PHOTOS)}")
    try:
        from sklearn.datasets import load_sample_image
    except ImportError as e:
        raise RuntimeError("the sample photos come with scikit-learn: pip install 'dpp_surgery[demo]'") from e
    img = load_sample_image(name)  # (H, W, 3) uint8
    return torch.from_numpy(img.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0
