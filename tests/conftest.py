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


@pytest.fixture
def one_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures('one_thread')``): small models at small
    sizes gain nothing from 2 threads, and 2 OpenMP threads stall on a busy 2-core machine (``_seed`` restores the
    count)."""
    torch.set_num_threads(1)


@pytest.fixture(scope='session')
def other_runtime():
    """``run(path, runtime, x) -> outputs``: an ONNX file run in OpenVINO or tract (``run_once``) in one spawned
    worker process for the whole session. OpenVINO's native threads and allocations stay out of the test process,
    where another test interrupts exports with SIGALRM (the coverage benchmark's time limit): with OpenVINO's
    libraries loaded, such an interruption has crashed the interpreter."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from dpp_surgery.export.runtimes import run_once

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context('spawn')) as pool:
        yield lambda path, runtime, x: pool.submit(run_once, str(path), runtime, x, 2).result(timeout=600)


def kernel_available() -> bool:
    from dpp_surgery import kernel_status
    return kernel_status()['loaded']


IMPLS = [pytest.param('kernel', id='kernel'), pytest.param('torch', id='torch')]
