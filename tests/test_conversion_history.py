"""The public accessors of what convert() records: conversion_history and is_converted."""
import timm
import torch

import dpp_surgery
from dpp_surgery import ConversionPolicy


def test_history_records_each_conversion_in_order():
    model = timm.create_model('resnet10t', pretrained=False, num_classes=4).eval()
    assert dpp_surgery.conversion_history(model) == [] and not dpp_surgery.is_converted(model)
    dpp_surgery.convert(model, input_size=(3, 64, 64), targets=('max_pool',))
    dpp_surgery.convert(model, input_size=(3, 64, 64), targets=('strided_conv',), placement='post')
    history = dpp_surgery.conversion_history(model)
    assert [(p.targets, p.placement, size) for p, size in history] == [
        (('max_pool',), 'block', (3, 64, 64)), (('strided_conv',), 'post', (3, 64, 64))]
    assert all(isinstance(p, ConversionPolicy) for p, _ in history)
    history.clear()  # a copy: the model's own record is untouched
    assert len(dpp_surgery.conversion_history(model)) == 2 and dpp_surgery.is_converted(model)


def test_a_model_with_dpp_layers_but_no_history_counts_as_converted():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), dpp_surgery.DPP2d(4))
    assert dpp_surgery.conversion_history(model) == [] and dpp_surgery.is_converted(model)


def test_policy_from_dict_reads_what_to_dict_wrote_and_refuses_the_rest():
    import pytest

    policy = ConversionPolicy(placement='post', targets=('strided_conv', 'max_pool'), exclude=('layer4*',),
                              strided_conv={'guide': 'full', 'init': (2.0, 0.5)}, skip_stem=False,
                              leaf_modules=(torch.nn.Identity,))
    assert ConversionPolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(ValueError, match=r"policy\.placement must be one of"):
        ConversionPolicy.from_dict({'placement': 'middle'})
    with pytest.raises(ValueError, match=r"recipe: unknown policy field 'placment' \(did you mean 'placement'"):
        ConversionPolicy.from_dict({'placment': 'post'}, 'recipe')
    with pytest.raises(ValueError, match='not an nn.Module class of torch.nn or timm.layers'):
        ConversionPolicy.from_dict({'leaf_modules': ['os']})
