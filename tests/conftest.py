"""Test session setup: Triton kernels run under the interpreter, on CPU tensors.

The unit tests are written for CPU tensors (CI has no GPU), so the kernels they call run in
Triton's interpreter, also on a machine with a GPU. ``TRITON_INTERPRET`` is read when
``@triton.jit`` decorates a kernel, so it is set here, before any test module imports a kernel
module. The same kernels are checked on CUDA at realistic sizes by the GPU suite, tests/gpu (its
``__init__`` has the command; ``bash scripts/gpu_suite.sh`` runs it).

Inductor's compiled graphs are cached in a folder of this session (unless ``TORCHINDUCTOR_CACHE_DIR``
is set): the shared default cache keys a graph without the Python of the custom ops it calls, so a
graph compiled before a change of an op's fake (its output strides) would be reused and fail.
"""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="omnicompile_inductor_"))
