"""Test session setup: Triton kernels run under the interpreter, on CPU tensors.

The unit tests are written for CPU tensors (CI has no GPU), so the kernels they call run in
Triton's interpreter, also on a machine with a GPU. ``TRITON_INTERPRET`` is read when
``@triton.jit`` decorates a kernel, so it is set here, before any test module imports a kernel
module. The same kernels are checked on CUDA at realistic sizes by the GPU suite, tests/gpu (its
``__init__`` has the command; ``bash scripts/gpu_suite.sh`` runs it).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
