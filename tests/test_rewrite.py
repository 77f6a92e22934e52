"""The rewrite engine (dpp_surgery.surgery.rewrite): each change recorded, every change taken back, hooks kept."""
import pytest
import torch
from torch import nn

from dpp_surgery.surgery.rewrite import Undo, add_child, set_attr, set_child, set_class


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)))


class _Twice(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


def test_every_change_is_recorded_and_reverted_newest_first():
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    before = model(x)
    conv, pool = model[0], model[1][1]
    undo = Undo()
    set_attr(conv, 'stride', (1, 1), undo, where='0')
    old = set_child(model, '1.1', nn.Identity(), undo)
    add_child(conv, 'extra', nn.ReLU(), undo, where='0')
    set_class(conv, _Twice, undo, where='0')
    assert old is pool and isinstance(model[1][1], nn.Identity) and type(conv) is _Twice and conv.stride == (1, 1)
    assert [(c.kind, c.where, c.name) for c in undo.changes] == [
        ('set_attr', '0', 'stride'), ('set_child', '1', '1'), ('add_child', '0', 'extra'), ('set_class', '0', '__class__')]
    assert undo.changes[1].before == 'MaxPool2d' and undo.changes[1].after == 'Identity'
    assert undo.changes[3].before == 'Conv2d' and undo.changes[3].after == '_Twice' and len(undo) == 4
    assert not torch.equal(model(x), before)
    undo.revert()
    assert model[1][1] is pool and type(conv) is nn.Conv2d and conv.stride == (2, 2) and 'extra' not in conv._modules
    assert torch.equal(model(x), before) and len(undo) == 0
    undo.revert()  # nothing left: a second revert changes nothing
    assert torch.equal(model(x), before)


def test_set_child_moves_the_hooks_and_revert_puts_the_old_module_back():
    model = _model()
    seen = []
    model[1][1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    undo = Undo()
    set_child(model, '1.1', nn.AvgPool2d(4), undo)
    model(torch.randn(1, 3, 16, 16))
    assert seen == [(1, 4, 2, 2)]  # the hook runs on the new module's output
    undo.revert()
    model(torch.randn(1, 3, 16, 16))
    assert seen[-1] == (1, 4, 4, 4)


def test_add_child_refuses_an_existing_attribute_and_records_nothing():
    model = _model()
    undo = Undo()
    with pytest.raises(ValueError, match='already has an attribute named weight'):
        add_child(model[0], 'weight', nn.ReLU(), undo)
    assert len(undo) == 0


def test_block_stride1_records_its_changes_in_an_undo():
    from dpp_surgery.surgery.blocks import block_stride1

    block = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.MaxPool2d(2), nn.AvgPool2d(3, 2, 1))
    undo = block_stride1(block)
    assert block[0].stride == (1, 1) and isinstance(block[1], nn.Identity) and block[2].stride == (1, 1)
    assert [c.kind for c in undo.changes] == ['set_attr', 'set_child', 'set_attr']
    undo.revert()
    assert block[0].stride == (2, 2) and isinstance(block[1], nn.MaxPool2d) and block[2].stride == 2
