"""The GPU suite: correctness on CUDA at realistic sizes (``pytest -m gpu``; timings live in benchmarks/).

Every module here sets ``pytestmark = ON_CUDA``: marked ``gpu``, skipped with its reason without a CUDA
device or under the Triton interpreter, which tests/conftest.py turns on by default. On a GPU machine,
with the package installed, from the repository root (``-P`` keeps the root off ``sys.path``: its source
folders lack ``omnicompile.kernels``, and transformers would import ``kernels/`` as the hub package)::

    TRITON_INTERPRET=0 python3 -P -m pytest -q -ra -m gpu tests/gpu
"""

import pytest
import torch

from omnicompile.kernels.triton_utils import interpreting

ON_CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(interpreting(), reason="Triton interpreter on: run with TRITON_INTERPRET=0"),
]
