"""DPP2d on a real CUDA device (marked gpu: deselected by default, ``make test-gpu`` runs them).

The Triton kernels' numerics are tested on CPU tensors through Triton's interpreter (tests/test_triton.py); these
run the same checks compiled for the GPU, and what only a GPU shows: no host-device synchronisation, the deferred
parameter check, torch.compile, autocast training steps, DDP with nccl and the CUDA benchmarks.
"""
import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import dpp_surgery
from dpp_surgery import DPP2d, convert, dpp_layers

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]

ENV = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')
INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


def _cases():
    from test_triton import ALL_CASES
    return ALL_CASES


@pytest.mark.parametrize('index', range(len(_cases())))
def test_parity_with_the_references(index):
    """Every variant x geometry x layout x dtype of tests/test_triton.py, compiled for the GPU."""
    from test_triton import ALL_CASES, _check_case
    _check_case(ALL_CASES[index], index)


def test_kernel_status_and_dispatch():
    status = dpp_surgery.kernel_status()['triton']
    # (compiled for the GPU, unless TRITON_INTERPRET was set: then the interpreter runs on the CUDA tensors)
    assert status['available'] and status['interpreter'] == INTERPRETED, status
    from dpp_surgery.layers import functional
    x = torch.randn(2, 4, 8, 8, device='cuda')
    assert functional._choose(x, DPP2d(4).geometry.resolve(8, 8), 'auto') == 'triton'
    assert functional._choose(x, DPP2d(4, (5, 13)).geometry.resolve(8, 16), 'auto') == 'torch'


def test_op_check_on_cuda():
    """The one op, its CUDA kernel and fake, by torch.library's own checks."""
    x = torch.randn(2, 3, 6, 6, device='cuda', requires_grad=True)
    alpha = torch.rand(3, device='cuda') + 0.5
    lam = torch.rand(3, device='cuda') + 0.5
    for guide in (None, torch.randn(2, 3, 3, 3, device='cuda', requires_grad=True)):
        torch.library.opcheck(torch.ops.dpp_surgery.dpp2d.default,
                              (x, guide, alpha, lam, [2, 2, 2, 2, 0, 0, 3, 3], False, 1, 1e-3))


@pytest.mark.skipif(INTERPRETED, reason="Triton's interpreter copies CUDA tensors to the host (TRITON_INTERPRET is set)")
def test_no_host_device_synchronisation():
    """Forward and backward of every guide, overlapping and not, in bfloat16 and float32: nothing waits for the
    device (CUDA's sync debug mode turns any synchronisation into an error)."""
    layers = [DPP2d(16, 2, guide='lite').cuda(), DPP2d(16, 3, 2, 1, guide='full', reward='asym').cuda()]
    xs = [torch.randn(4, 16, 20, 20, device='cuda', dtype=dt).contiguous(memory_format=fmt)
          for dt in (torch.float32, torch.bfloat16) for fmt in (torch.contiguous_format, torch.channels_last)]

    def step():
        for layer in layers:
            for x in xs:
                x = x.detach().requires_grad_(True)
                layer(x).float().sum().backward()

    step()  # (compiles the kernels and allocates the checks' pinned buffers)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        step()
        with torch.no_grad():
            layers[0].theta_alpha.add_(0.1)  # a changed parameter queues a new check, still without waiting
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_non_finite_parameter_is_reported_on_a_later_call():
    layer = DPP2d(4).cuda()
    x = torch.randn(2, 4, 8, 8, device='cuda')
    layer(x)
    with torch.no_grad():
        layer.theta_lambda[2] = float('nan')
    with pytest.raises(ValueError, match=r'theta_lambda has 1 non-finite value\(s\).*earlier call on the GPU'):
        for _ in range(5):  # the count arrives once the device has run it; synchronising makes that soon
            layer(x)
            torch.cuda.synchronize()
    with torch.no_grad():
        layer.theta_lambda[2] = 0.0
    for _ in range(3):
        layer(x)
        torch.cuda.synchronize()


def _converted(name='resnet18', size=64):
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        convert(model, input_size=(3, size, size))
    assert dpp_layers(model)
    return model.cuda()


def test_torch_compile_of_a_converted_model():
    model = _converted().eval()
    x = torch.randn(4, 3, 64, 64, device='cuda')
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
    model.train()
    out = torch.compile(model)(x)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_autocast_training_steps(dtype):
    """A converted resnet trains under autocast: DPP gets and returns the low-precision activation, the loss stays
    finite and the DPP parameters move."""
    model = _converted().train().to(memory_format=torch.channels_last)
    layer = dpp_layers(model)[0][1]
    seen = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(inp=args[0].dtype, out=out.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler('cuda', enabled=dtype == torch.float16)
    before = layer.theta_lambda.detach().clone()
    x = torch.randn(16, 3, 64, 64, device='cuda').contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device='cuda')
    for _ in range(3):
        with torch.autocast('cuda', dtype=dtype):
            loss = F.cross_entropy(model(x).float(), y)
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    assert seen == {'inp': dtype, 'out': dtype}
    assert not torch.equal(layer.theta_lambda.detach(), before)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='DDP with nccl needs 2 GPUs')
def test_ddp_nccl_two_ranks(tmp_path):
    """finetune under torchrun on 2 GPUs (nccl), bfloat16 autocast: both ranks end with the same weights, which
    moved from the start."""
    from test_finetune import CLI_SMALL, needs_data
    if needs_data.args[0]:
        pytest.skip(needs_data.kwargs['reason'])
    out, states = str(tmp_path / 'ddp'), str(tmp_path / 'states')
    worker = os.path.join(os.path.dirname(__file__), 'ddp_worker.py')
    small = [a for flag in CLI_SMALL for a in (['--amp', '--amp-dtype', 'bfloat16'] if flag == '--no-amp' else [flag])]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', worker, states,
           '--output', out, '--train-subset', '96', '--epochs', '1', '--device', 'auto'] + small
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [torch.load(os.path.join(states, f'rank{r}.pt'), weights_only=True) for r in range(2)]
    moved = 0
    for key, value in ranks[0]['final'].items():
        assert torch.equal(value, ranks[1]['final'][key]), key
        moved += not torch.equal(value, ranks[0]['init'][key])
    assert moved > 0


def test_bench_layer_and_train_on_cuda(tmp_path, capsys):
    from dpp_surgery.tools import bench
    path = tmp_path / 'layer.json'
    assert bench.main(['--record', str(path), 'layer', '--device', 'cuda', '--shape', '4', '32', '16', '16',
                       '--repeat', '3', '--inner', '2']) == 0
    text = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert text == bench.render(result) + '\n'
    assert 'CUDA events' in text and 'forward bandwidth / peak' in text
    assert '| DPP lite-sym 2x2 | bfloat16 | channels_last |' in text
    assert 'PyTorch path, torch.compile) | bfloat16 | channels_last |' in text
    # the 6 Triton targets in bfloat16 channels_last, and the compiled forms' 2 guides x 2 dtypes x 2 layouts x 2
    assert len(result['checks']) == len(result['targets']) == 6 + 16
    assert result['device'] == 'cuda' and result['compiled'] and result['peak_bandwidth'] > 0
    assert all(r['fwd_ms'] > 0 and r['bandwidth'] > 0 and r['memory_x'] > 0 for r in result['rows'])
    path = tmp_path / 'train.json'
    assert bench.main(['--json', str(path), 'train', '--device', 'cuda', '--models', 'resnet18', '--img-size', '64',
                       '-b', '8', '--repeat', '2', '--amp-dtype', 'bfloat16', '--channels-last']) == 0
    rows = json.loads(path.read_text())['rows']
    assert rows[0]['converted_ms'] > 0 and rows[0]['flop_ratio'] > 0
