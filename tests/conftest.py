import os

import pytest
import torch

# Triton's interpreter must be chosen before anything imports triton, and
# TorchInductor (behind the compiled CPU codecs) imports it: choose it for the
# whole session where there is no GPU, so that test_kernels.py can run the
# kernels through it whichever test compiled something first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (CI runs one worker per core) each worker computes on
    # one thread: two workers of two threads each on two cores would contend.
    torch.set_num_threads(1)
