"""Converted models behave like ordinary modules: pickle, torch.save, deepcopy, spawned workers, TorchScript."""
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import timm
from torch import nn
from torch.nn import functional as F

import dpp_surgery
from dpp_surgery import DPP2d, convert, dpp_layers

from pickle_worker import run_models

# (model, input side, convert options, a dynamic class the conversion must have made)
CASES = [
    ('resnet18', 64, {}, 'BasicBlockDPPPost'),
    ('resnet18', 64, {'placement': 'post'}, 'Conv2dDPPPost'),
    ('resnet18', 64, {'placement': 'pre'}, 'Conv2dDPPPre'),
    ('inception_v3', 75, {'targets': ('max_pool',)}, 'InceptionBDPP'),
    ('tf_efficientnet_lite0', 64, {}, 'InvertedResidualDPPPost'),
]
CASE_IDS = ['block', 'post', 'pre', 'functional-pool', 'same-padding-block']


def _converted(name: str, side: int, options: dict) -> nn.Module:
    model = timm.create_model(name, num_classes=7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        convert(model, input_size=(3, side, side), **options)
    # non-init DPP parameters, so that a copy that lost them would not match
    with torch.no_grad():
        for _, layer in dpp_layers(model):
            layer.theta_alpha.uniform_(-1, 1)
            layer.theta_lambda.uniform_(-1, 1)
    return model.eval()


def _classes(model: nn.Module):
    return [type(m) for m in model.modules()]


def _check_same(copy_: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    assert copy_ is not model
    assert _classes(copy_) == _classes(model)
    assert [n for n, _ in dpp_layers(copy_)] == [n for n, _ in dpp_layers(model)]
    with torch.no_grad():
        assert torch.equal(copy_.eval()(x), model(x))
    a, b = model.state_dict(), copy_.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope='module', params=CASES, ids=CASE_IDS)
def converted(request):
    name, side, options, expected_class = request.param
    model = _converted(name, side, options)
    names = {type(m).__name__ for m in model.modules()}
    assert any(n.startswith(expected_class) and 'DPP' in n for n in names), names
    return model, torch.randn(2, 3, side, side)


def test_torch_save_load(converted):
    model, x = converted
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    _check_same(torch.load(buf, weights_only=False), model, x)


def test_pickle_round_trip(converted):
    model, x = converted
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        _check_same(pickle.loads(pickle.dumps(model, protocol=protocol)), model, x)


def test_deepcopy(converted):
    model, x = converted
    clone = copy.deepcopy(model)
    _check_same(clone, model, x)
    # the copy is independent: changing it leaves the original alone
    with torch.no_grad():
        dpp_layers(clone)[0][1].theta_lambda.add_(1.0)
    assert not torch.equal(dpp_layers(clone)[0][1].theta_lambda, dpp_layers(model)[0][1].theta_lambda)


def test_unpickled_model_keeps_working_with_the_library(converted, tmp_path):
    model, x = converted
    clone = pickle.loads(pickle.dumps(model))
    # still recognised as converted (the same plan as the original's), saved and rebuilt from a checkpoint, trained
    def sites(m):
        return [(s.name, s.kind, s.action) for s in dpp_surgery.plan(m, input_size=x.shape[1:]).sites]
    assert sites(clone) == sites(model)
    assert any(kind == 'dpp' for _, kind, _ in sites(clone))
    path = dpp_surgery.save(clone, str(tmp_path / 'm.safetensors'))
    rebuilt = dpp_surgery.load(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-5, atol=1e-5)
    clone.train()
    clone(x).sum().backward()
    assert all(layer.theta_lambda.grad is not None for _, layer in dpp_layers(clone))


def test_spawned_worker_round_trip():
    """Models sent to a spawned process (as DataLoader workers or torch.multiprocessing pools do)."""
    cases = [(_converted(*case[:3]), torch.randn(1, 3, case[1], case[1])) for case in CASES[:4]]
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=run_models, args=(cases, queue, torch.get_num_threads()))
    proc.start()
    try:
        results = queue.get(timeout=180)
    finally:
        proc.join(timeout=60)
    assert proc.exitcode == 0 and len(results) == len(cases)
    for (model, x), (y, names) in zip(cases, results):
        assert names == [type(m).__qualname__ for m in model.modules()]
        with torch.no_grad():
            assert torch.equal(torch.from_numpy(y), model(x))


class _Toy(nn.Module):
    """A functional pool and a strided conv in one module: converted twice, its class is derived twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.head(F.max_pool2d(self.conv(x), 2))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.body = _Toy()

    def forward(self, x):
        return self.body(self.stem(x))


def test_class_derived_twice_pickles():
    model = _Net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        convert(model, input_size=(3, 32, 32), targets=('max_pool',))
        convert(model, input_size=(3, 32, 32), targets=('strided_conv',), placement='post')
    assert type(model.body).__name__ == '_ToyDPP' and type(model.body.conv).__name__ == 'Conv2dDPPPost'
    x = torch.randn(2, 3, 32, 32)
    _check_same(pickle.loads(pickle.dumps(model)), model, x)
    _check_same(copy.deepcopy(model), model, x)


@pytest.mark.filterwarnings('ignore:`torch.jit.*` is deprecated:FutureWarning')  # TorchScript, upstream
def test_torchscript_script_is_refused_clearly_and_trace_works():
    model = _converted('resnet18', 64, {})
    with pytest.raises(RuntimeError, match=r'DPP2d does not support torch\.jit\.script.*torch\.jit\.trace'):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match='torch.compile'):
        torch.jit.script(DPP2d(4))
    x = torch.randn(1, 3, 64, 64)
    with pytest.warns(torch.jit.TracerWarning, match=r'DPP2d resolves its windows from the traced input size') as w:
        traced = torch.jit.trace(model, x)
    # only our warning, no pile of shape-check warnings from inside the layer
    assert {str(r.message)[:40] for r in w if issubclass(r.category, torch.jit.TracerWarning)} == {
        'torch.jit.trace: DPP2d resolves its wind'}
    other = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(traced(other), model(other))
