"""GPU suite fixtures: each module starts with the GPU memory the earlier ones held released.

Compiled models (CUDA-graph pools of ``mode="reduce-overhead"``), Dynamo caches and garbage from one
module otherwise stay allocated into the next: the full suite on an H100 ran out of memory at the
32K band test (75.9 GiB held), which passes alone.
"""

import gc

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _release_gpu_memory():
    yield
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
