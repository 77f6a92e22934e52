"""Checks of optimizer parameter groups for models with DPP layers (tests only)."""
from __future__ import annotations

from typing import Optional, Sequence

from dpp_surgery import DPP2d, dpp_parameters


def check_param_groups(model, groups: Sequence[dict], weight_decay: float, dpp_lr_scale: float,
                       lr: Optional[float] = None, lr_scale: bool = False) -> None:
    """Assert, unconditionally, how ``groups`` (``param_groups(...)`` or an optimizer's ``param_groups``) hold
    ``model``'s parameters:

    - the model has DPP layers, and ``dpp_parameters`` lists theta_alpha and theta_lambda of each;
    - every model parameter is in exactly one group, and the groups hold nothing else;
    - all DPP parameters share one group, which holds nothing else and has weight decay 0;
    - ``lr_scale`` (groups built without ``lr``, for timm's schedulers): the DPP group's ``lr_scale`` is
      ``dpp_lr_scale`` and no other group has one; else no group has an ``lr_scale`` (each carries its own ``lr``,
      and ``lr`` must be given);
    - Full guide filters (``guide_weight``) are decayed like conv weights (``param_groups``' documented choice):
      their group has ``weight_decay`` and no ``lr_scale``;
    - with ``lr``: the DPP group's learning rate is ``lr * dpp_lr_scale``, every other group's ``lr``.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DPP2d)]
    assert layers, 'the model has no DPP layers'
    dpp = dpp_parameters(model)
    expected = {id(getattr(m, p)) for _, m in layers for p in ('theta_alpha', 'theta_lambda')}
    assert len(dpp) == 2 * len(layers) and {id(p) for _, p in dpp} == expected, \
        f'dpp_parameters lists {[n for n, _ in dpp]}, not theta_alpha and theta_lambda of {[n for n, _ in layers]}'

    where = {}  # id(parameter) -> indices of the groups holding it
    for i, g in enumerate(groups):
        for p in g['params']:
            where.setdefault(id(p), []).append(i)
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert len(where.get(id(p), [])) == 1, f'{name} is in groups {where.get(id(p), [])}, not exactly one'
    assert set(where) == {id(p) for p in params.values()}, 'a group holds a parameter the model does not have'

    (dpp_group,) = {where[id(p)][0] for _, p in dpp}  # one group for all of them
    g = groups[dpp_group]
    assert {id(p) for p in g['params']} == expected, 'the DPP group holds other parameters'
    assert g['weight_decay'] == 0.0
    if lr_scale:
        assert g['lr_scale'] == dpp_lr_scale
    else:
        assert lr is not None, 'groups that carry their own lr are checked against the base lr'
        assert 'lr_scale' not in g, f'the DPP group has lr_scale {g["lr_scale"]} and its own lr'
    for i, other in enumerate(groups):
        if i != dpp_group:
            assert 'lr_scale' not in other, f'group {i} is not the DPP group but has lr_scale {other["lr_scale"]}'

    guides = [m.guide_weight for _, m in layers if m.guide_weight is not None]
    for p in guides:
        assert groups[where[id(p)][0]]['weight_decay'] == weight_decay

    if lr is not None:
        for i, other in enumerate(groups):
            want = lr * dpp_lr_scale if i == dpp_group else lr
            assert abs(other['lr'] - want) <= 1e-12 * want, (i, other['lr'], want)
