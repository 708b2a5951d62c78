"""The repository layout: Python started at the root must not let the source folder kernels/ shadow the
PyPI package ``kernels`` (transformers >= 5.25 imports it), and omnicompile.kernels stays ours."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib.util, omnicompile, omnicompile.kernels.masks as masks
assert masks.__file__.startswith({root!r}), masks.__file__
try:
    import kernels
except ModuleNotFoundError:
    print("absent")
else:
    assert not kernels.__file__.startswith({root!r}), kernels.__file__
    # Imports the PyPI kernels where it is installed.
    import transformers.integrations.hub_kernels  # noqa: F401
    print("pypi")
"""


def test_python_started_at_the_root_imports_the_pypi_kernels():
    probe = _PROBE.format(root=str(ROOT / "kernels"))
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    pypi_installed = importlib.util.find_spec("kernels") is not None  # pytest runs with the root off sys.path
    assert result.stdout.split() == ["pypi" if pypi_installed else "absent"]


def test_stable_seed_is_the_same_in_another_process():
    from tests.helpers import stable_seed

    code = "from tests.helpers import stable_seed; print(stable_seed('torch.bfloat16', True, (1, 2)))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == stable_seed("torch.bfloat16", True, (1, 2))
