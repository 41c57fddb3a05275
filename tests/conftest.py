"""Test setup. TRITON_INTERPRET must be set before triton is first imported, so that the Triton
kernels run on the CPU through the interpreter when no GPU is present."""
import os

import pytest

try:
    import torch
    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from g2g_fast import cpu_threads  # noqa: E402
from fakes import big_zeros, random_state, resnet50_ft_shapes, vgg16_state  # noqa: E402


# CPU threads follow the machine's load (g2g_fast/cpu_threads.py): on a shared machine two spinning
# OpenMP threads beside another busy process made the suite ~10x slower. The count is re-decided
# between tests only, so within a test it is fixed and the test's numbers are deterministic.
_threads_line = cpu_threads.setup()


def pytest_report_header(config):
    return [_threads_line]


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same RNG state and fp32 matmuls without TF32."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu_threads.tick()
    with cpu_threads.held():
        yield


requires_cuda = pytest.mark.skipif(not _has_cuda, reason="needs a CUDA GPU (none available)")


@pytest.fixture(scope="session")
def id_file(tmp_path_factory):
    state = random_state(resnet50_ft_shapes(), torch.Generator().manual_seed(0))
    # The classifier is dropped on load; keep its 17.7M weights out of the file to stay fast.
    state["classifier.weight"] = big_zeros(8631, 2048, 1, 1)
    path = tmp_path_factory.mktemp("id") / "resnet50_ft.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="session")
def vgg_file(tmp_path_factory):
    state = vgg16_state(torch.Generator().manual_seed(4))
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(state, path)
    return path, state
