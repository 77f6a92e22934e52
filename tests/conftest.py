import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter (impl='triton'). Triton reads
# this when the kernels are defined, so it is set before anything imports them; tests marked gpu need a device.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

# Two threads, as on the project's machines, and reproducible seeds.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # (finetune and the benchmarks set the process's threads)


def kernel_available() -> bool:
    from dpp_surgery import kernel_status
    return kernel_status()['loaded']


IMPLS = [pytest.param('kernel', id='kernel'), pytest.param('torch', id='torch')]
