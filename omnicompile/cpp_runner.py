"""Build and call ``cpp/run_package``, a C++ program that runs an AOTInductor package without Python.

``run_package PACKAGE INPUTS OUTPUTS`` (``cpp/run_package/main.cpp``) loads the package with
``torch::inductor::AOTIModelPackageLoader``, reads the flat input tensors that Python saved with
``torch.save`` (a list), runs the package once on its device and writes the flat outputs (a tuple
of CPU tensors that ``torch.load`` reads). It links libtorch only: a package whose attention calls
were all inlined at export (`passes.inline_attention`) runs in it; one that still holds
``omnisparse::attention`` fails there (no Python op registry).

`build_runner` configures and builds it with CMake against the installed torch: through torch's
CMake config (``torch.utils.cmake_prefix_path``), else, where that fails (a CUDA torch's config
looks for the CUDA toolkit, which a pip install lacks), against torch's ``include/`` and ``lib/``
folders directly; `toolchain_reason` says what is missing for either;
`run_package` calls it. The C++ sources live in the repository checkout (`SOURCE_DIR` when
omnicompile is installed editable; an installed wheel has none: pass the checkout's folder).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

logger = logging.getLogger("omnicompile")

SOURCE_DIR = Path(__file__).resolve().parents[1] / "cpp" / "run_package"
_LOADER_HEADER = "torch/csrc/inductor/aoti_package/model_package_loader.h"


def toolchain_reason(source_dir: str | os.PathLike[str] = SOURCE_DIR) -> str | None:
    """None when `build_runner` can build ``source_dir`` here, else what is missing (the sources,
    cmake, a C++ compiler or torch's C++ headers)."""
    if not (Path(source_dir) / "CMakeLists.txt").is_file():
        return f"no C++ sources at {source_dir} (a repository checkout has them in cpp/run_package)"
    if shutil.which("cmake") is None:
        return "cmake is not on PATH"
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if cxx):
        return "no C++ compiler (c++, g++, clang++ or $CXX) on PATH"
    if not (Path(torch.__file__).parent / "include" / _LOADER_HEADER).is_file():
        return f"torch has no C++ header {_LOADER_HEADER}"
    return None


def build_runner(
    build_dir: str | os.PathLike[str], source_dir: str | os.PathLike[str] = SOURCE_DIR, jobs: int = 2
) -> Path:
    """Configure (Release) and build ``run_package`` from ``source_dir`` under ``build_dir`` (reused: a
    second call only rebuilds what changed) through torch's CMake config, else against torch's folders
    (module docstring); returns the executable. ``subprocess.CalledProcessError`` carries CMake's
    output on failure; ``RuntimeError`` when `toolchain_reason` names something missing."""
    reason = toolchain_reason(source_dir)
    if reason is not None:
        raise RuntimeError(f"cannot build run_package: {reason}")
    build = Path(build_dir)
    try:
        return _cmake(
            source_dir, build / "config", [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], jobs
        )
    except subprocess.CalledProcessError as error:
        logger.info(
            "run_package: torch's CMake config failed, building against its folders: %s", error.stderr
        )
    folders = [
        f"-DTORCH_ROOT={Path(torch.__file__).parent}",
        f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    return _cmake(source_dir, build / "folders", folders, jobs)


def _cmake(source_dir: str | os.PathLike[str], build: Path, options: list[str], jobs: int) -> Path:
    build.mkdir(parents=True, exist_ok=True)
    configure = ["cmake", "-S", str(source_dir), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *options]
    for command in (configure, ["cmake", "--build", str(build), "-j", str(jobs)]):
        subprocess.run(command, check=True, capture_output=True, text=True)
    return build / "run_package"


def run_package(
    runner: str | os.PathLike[str],
    package: str | os.PathLike[str],
    inputs: Sequence[torch.Tensor],
    work_dir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> tuple[torch.Tensor, ...]:
    """The package's flat outputs (CPU tensors) for its flat tensor ``inputs`` (in the order of its
    call spec: the example inputs' tensors, flattened; non-tensor inputs are baked in), run by the
    C++ ``runner`` in a process of its own (``env``: its environment, default this one's).
    ``subprocess.CalledProcessError`` carries the runner's output when it fails."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    inputs_file, outputs_file = work / "inputs.pt", work / "outputs.pt"
    torch.save([t.detach().cpu() for t in inputs], inputs_file)
    command = [str(runner), str(package), str(inputs_file), str(outputs_file)]
    subprocess.run(command, check=True, capture_output=True, text=True, env=env, timeout=timeout)
    return tuple(torch.load(outputs_file))
