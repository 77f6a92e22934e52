"""param_groups in any training loop: the DPP parameters step at ``lr * dpp_lr_scale`` under plain torch optimizers
and schedulers and under timm's, measured from the parameters' own updates."""
from __future__ import annotations

import warnings

import pytest
import torch

from dpp_surgery import DPP2d, LrScaleWarning, dpp_parameters, param_groups

LR, SCALE = 0.02, 10.0


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), DPP2d(8),
                               torch.nn.Conv2d(8, 4, 1), DPP2d(4, guide='full'))


def _rates(model, opt) -> tuple:
    """(DPP rate, other rate) measured from one SGD/AdamW step with every gradient set to 1 and no weight decay on the
    measured parameters: SGD moves a parameter by rate * 1, AdamW's first step by rate * 1 / (1 + eps)."""
    dpp = {id(p) for _, p in dpp_parameters(model)}
    conv_bias = model[0].bias  # a no-decay parameter outside DPP
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    dpp_steps = [(before[id(p)] - p.detach()).flatten() for p in model.parameters() if id(p) in dpp]
    dpp_step = torch.cat(dpp_steps)
    other_step = before[id(conv_bias)] - conv_bias.detach()
    # every DPP parameter moved by the same amount, and so did the bias
    assert torch.allclose(dpp_step, dpp_step[0].expand_as(dpp_step), rtol=1e-5)
    assert torch.allclose(other_step, other_step[0].expand_as(other_step), rtol=1e-5)
    return dpp_step[0].item(), other_step[0].item()


@pytest.mark.parametrize('optimizer', ['sgd', 'adamw'])
def test_plain_torch_optimizer_steps_dpp_at_scaled_rate(optimizer):
    model = _model()
    groups = param_groups(model, lr=LR, weight_decay=1e-4, dpp_lr_scale=SCALE)
    assert all('lr_scale' not in g for g in groups)
    opt = torch.optim.SGD(groups) if optimizer == 'sgd' else torch.optim.AdamW(groups)
    dpp, other = _rates(model, opt)
    assert dpp == pytest.approx(LR * SCALE, rel=1e-4)
    assert other == pytest.approx(LR, rel=1e-4)


def test_optimizer_lr_argument_does_not_override_group_rates():
    """A user who also passes lr= to the optimizer keeps the groups' rates (a group's own lr wins in torch)."""
    model = _model()
    opt = torch.optim.SGD(param_groups(model, lr=LR, dpp_lr_scale=SCALE), lr=0.5)
    assert _rates(model, opt) == pytest.approx((LR * SCALE, LR), rel=1e-4)


def test_torch_lambda_lr_scales_from_each_group_rate():
    model = _model()
    opt = torch.optim.SGD(param_groups(model, lr=LR, dpp_lr_scale=SCALE))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)
    assert _rates(model, opt) == pytest.approx((LR * SCALE, LR), rel=1e-4)  # epoch 0
    sched.step()  # epoch 1: half of each starting rate
    assert _rates(model, opt) == pytest.approx((LR * SCALE * 0.5, LR * 0.5), rel=1e-4)


def test_timm_cosine_scheduler_scales_from_each_group_rate_once():
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    model = _model()
    opt = create_optimizer_v2(param_groups(model, lr=LR, weight_decay=1e-4, dpp_lr_scale=SCALE), opt='adamw', lr=LR,
                              weight_decay=1e-4)
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=10, warmup_epochs=0, min_lr=0.0)
    sched.step(5)
    factor = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 5 / 10)).item())
    dpp, other = _rates(model, opt)
    assert other == pytest.approx(LR * factor, rel=1e-4)
    assert dpp == pytest.approx(LR * SCALE * factor, rel=1e-4)  # the scale applied once, not twice


def test_without_lr_keeps_lr_scale_and_warns():
    model = _model()
    with pytest.warns(LrScaleWarning, match='plain torch optimizers ignore it'):
        groups = param_groups(model, dpp_lr_scale=SCALE)
    assert [g.get('lr_scale') for g in groups] == [None, None, SCALE]
    assert all('lr' not in g for g in groups)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        param_groups(model)  # scale 1: nothing is ignored, nothing to warn about
        param_groups(model, lr=LR, dpp_lr_scale=SCALE)


def test_model_without_dpp_layers():
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match=r'has no DPP layers\. Convert the model first'):
        param_groups(plain, lr=LR, dpp_lr_scale=SCALE)
    groups = param_groups(plain, lr=LR)  # the weight-decay split alone is still valid
    assert [len(g['params']) for g in groups] == [1, 3] and all(g['lr'] == LR for g in groups)


@pytest.mark.parametrize('kwargs', [dict(lr=0.0), dict(lr=float('nan')), dict(lr=-1.0), dict(dpp_lr_scale=0.0),
                                    dict(dpp_lr_scale=float('inf'), lr=0.1)])
def test_bad_rates(kwargs):
    with pytest.raises(ValueError, match='must be a positive finite number'):
        param_groups(_model(), **kwargs)


def test_ddp_wrapper_is_unwrapped():
    """Groups built from a (single-process) DataParallel wrapper hold the inner model's parameters."""
    model = _model()
    groups = param_groups(torch.nn.DataParallel(model), lr=LR, dpp_lr_scale=SCALE)
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
