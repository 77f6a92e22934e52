"""One rank of the 2-process DDP test (tests/test_finetune.py): ``torchrun ... ddp_worker.py STATE_DIR
<dpp-surgery finetune arguments>``.

Runs ``dpp-surgery finetune`` through its CLI entry point, exactly as ``torchrun -m dpp_surgery finetune`` would,
and then writes this rank's model (its state_dict before and after training) to ``STATE_DIR/rank<RANK>.pt``. Only
rank 0 writes checkpoints, so this is how the test sees the other rank's weights. The model is captured by
wrapping ``dpp_surgery.training.finetune.build_model``, which ``finetune`` calls once per run; the wrapper also freezes the
model's BatchNorm layers (see :func:`freeze_batchnorm`).
"""
import os
import sys
import types

import torch
from torch import nn

from dpp_surgery import cli
from dpp_surgery.training import finetune as train


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Keep every BatchNorm layer in eval mode (running statistics; weight and bias still train), whatever
    ``model.train()`` says.

    With train-mode BatchNorm, each DDP rank normalises over its own half-batch, so DDP is not the same as one
    process with the global batch; and at this test's tiny batches the pretrained network is so ill-conditioned
    (near-constant channels on Fashion-MNIST's flat backgrounds) that rounding differences of 1e-7 grow to 1e-2 in
    three steps. With eval-mode BatchNorm every image's loss is independent of the others in its batch, DDP's
    averaged gradient is exactly the gradient of the mean loss over the global batch, and the training is smooth
    enough to compare at a tight tolerance.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.train = types.MethodType(lambda self, mode=True: self, m)
    return model


def main() -> int:
    state_dir, argv = sys.argv[1], sys.argv[2:]
    captured = {}
    build_model = train.build_model

    def capturing_build_model(*args, **kwargs):
        model, teacher = build_model(*args, **kwargs)
        freeze_batchnorm(model)
        captured['model'] = model
        captured['init'] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model, teacher

    train.build_model = capturing_build_model
    rc = cli.main(['finetune'] + argv)
    if rc == 0:
        os.makedirs(state_dir, exist_ok=True)
        final = {k: v.detach().clone() for k, v in captured['model'].state_dict().items()}
        torch.save({'init': captured['init'], 'final': final},
                   os.path.join(state_dir, f'rank{os.environ["RANK"]}.pt'))
    return rc


if __name__ == '__main__':
    sys.exit(main())
