"""Load an AOTInductor package of an exported model: `load_package`.

Two things ``torch._inductor.aoti_load_package`` alone does not do:

- register ``torch.ops.omnisparse.attention`` (a Python custom op the package calls back), which
  importing this module does;
- keep CUDA packages from crashing the process. On the GPU image (torch 2.11.0+cu130, g++ 13.3)
  every AOTInductor CUDA package, a bare Linear one too, dies with SIGSEGV in ``std::regex``
  construction in the package's ``wrapper.so``, unless the process started with ``LD_PRELOAD``
  naming the system libstdc++ (docs/EXPORT.md, "Loading on CUDA").

A SIGSEGV cannot be caught, so for a CUDA package in a process not started with libstdc++
preloaded, `load_package`:

1. opens the process's libstdc++ again with ``RTLD_GLOBAL`` (`apply_libstdcxx_fix`), which appends
   it to the global lookup scope, searched before ``wrapper.so``'s own dependencies but after the
   libraries already in it (whether that is enough on the GPU image is what
   ``scripts/gpu_diagnose_aoti.py`` tells);
2. loads the package once in a fresh interpreter of this environment (`probe`, which does 1. too)
   and remembers the verdict per interpreter, torch and libstdc++ (`probe_cache_path`); if that
   process crashed, it raises `LibstdcxxCrashError` saying how to start the process, or with
   ``reexec=True`` restarts it with the preload (`reexec_with_preload`), instead of crashing.

The decision is a pure function (`plan_libstdcxx`) of the memory map, the start-up ``LD_PRELOAD``
and the resolved libstdc++, tested with made-up inputs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import ops  # noqa: F401  (registers torch.ops.omnisparse.*, which packages call back)

logger = logging.getLogger("omnicompile")

__all__ = [
    "LibstdcxxCrashError",
    "LibstdcxxPlan",
    "apply_libstdcxx_fix",
    "libstdcxx_plan",
    "load_package",
    "mapped_libraries",
    "package_device",
    "plan_libstdcxx",
    "preload_env",
    "probe",
    "probe_cache_path",
    "reexec_with_preload",
    "resolve_libstdcxx",
]

LIBSTDCXX = "libstdc++.so.6"
REEXEC_MARK = "OMNICOMPILE_REEXECUTED"  # set in a re-executed process: never re-execute twice
PROBE_TIMEOUT_S = 600.0


class LibstdcxxCrashError(RuntimeError):
    """Loading the package crashed a fresh process of this environment, so it would crash this one."""


def load_package(
    path: str | os.PathLike[str],
    run_single_threaded: bool = False,
    device_index: int = -1,
    *,
    check: bool = True,
    reexec: bool = False,
) -> Any:
    """Load an AOTInductor package (``torch._inductor.aoti_load_package``'s first arguments).

    For a CUDA package in a process without libstdc++ preloaded: the ``RTLD_GLOBAL`` fix, then,
    with ``check``, the fresh-process probe (module docstring). Returns the loaded model (call it
    like the exported module).

    Raises:
        LibstdcxxCrashError: the probe crashed and ``reexec`` is False (with ``reexec`` True the
            process is restarted with libstdc++ preloaded instead: the script runs again from its
            start, so call this early).
    """
    if package_device(path) == "cuda":
        plan = apply_libstdcxx_fix()
        if check and not plan.preloaded:
            verdict = _cached_probe(path, device_index, plan)
            if verdict.startswith("crash"):
                if reexec:
                    reexec_with_preload()  # returns only in a process that was restarted already
                raise LibstdcxxCrashError(
                    f"omnicompile.load_package: a fresh process of this environment loading "
                    f"{os.fspath(path)} died ({verdict}): the libstdc++ crash of docs/EXPORT.md ('Loading "
                    "on CUDA'), which would kill this process too. Start it with "
                    f"LD_PRELOAD={plan.library or LIBSTDCXX} (omnicompile.loading.preload_env), or pass "
                    "reexec=True."
                )
    return torch._inductor.aoti_load_package(
        os.fspath(path), run_single_threaded=run_single_threaded, device_index=device_index
    )


def package_device(path: str | os.PathLike[str]) -> str:
    """The device a package was compiled for (``AOTI_DEVICE_KEY`` of its wrapper metadata, e.g.
    ``"cpu"``, ``"cuda"``), read from the archive without loading it; ``""`` if it has none."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith("wrapper_metadata.json"):
                return str(json.loads(archive.read(name)).get("AOTI_DEVICE_KEY", ""))
    return ""


@dataclass(frozen=True)
class LibstdcxxPlan:
    """What `apply_libstdcxx_fix` does in this process.

    Attributes:
        library: the libstdc++ file this process binds (to open with ``RTLD_GLOBAL`` unless
            ``preloaded``); None if none is mapped or found.
        preloaded: ``library`` was preloaded at start (``LD_PRELOAD``): it binds first, nothing to do.
        mixed: more than one libstdc++ file is mapped (no fix makes them agree).
        reason: the above in words (logged).
    """

    library: str | None
    preloaded: bool
    mixed: bool
    reason: str


def plan_libstdcxx(mapped: Iterable[str], preloaded: Iterable[str], resolved: str | None) -> LibstdcxxPlan:
    """The fix from the mapped files (`mapped_libraries`), the start-up ``LD_PRELOAD`` entries and
    the resolved libstdc++ (`resolve_libstdcxx`); paths are compared after ``os.path.realpath``.

    Never a second libstdc++: the first one mapped is promoted, the resolved one only when none is.
    """
    mapped_std = _unique(os.path.realpath(p) for p in mapped if _is_libstdcxx(p))
    preloaded_std = {os.path.realpath(p) for p in preloaded if _is_libstdcxx(p)}
    mixed = len(mapped_std) > 1
    if mapped_std and mapped_std[0] in preloaded_std:
        return LibstdcxxPlan(mapped_std[0], True, mixed, f"{mapped_std[0]} is preloaded: it binds first")
    if mapped_std:
        return LibstdcxxPlan(mapped_std[0], False, mixed, f"{mapped_std[0]} (mapped) opened RTLD_GLOBAL")
    if resolved:
        return LibstdcxxPlan(resolved, False, False, f"{resolved} (none mapped yet) opened RTLD_GLOBAL")
    return LibstdcxxPlan(None, False, False, "no libstdc++ mapped or found")


def libstdcxx_plan() -> LibstdcxxPlan:
    """`plan_libstdcxx` for this process now: its maps, its start-up ``LD_PRELOAD``, the resolved
    libstdc++."""
    preloaded = _preload_list(_start_environ().get("LD_PRELOAD", ""))
    return plan_libstdcxx(mapped_libraries(), preloaded, resolve_libstdcxx())


def apply_libstdcxx_fix() -> LibstdcxxPlan:
    """Open this process's libstdc++ with ``RTLD_GLOBAL`` unless it was preloaded (`plan_libstdcxx`);
    returns the plan. Idempotent and cheap: a dlopen of a loaded library only adds it to the global
    scope. Warns when several libstdc++ files are mapped."""
    plan = libstdcxx_plan()
    if plan.mixed:
        logger.warning("omnicompile.load_package: several libstdc++ files are mapped; %s", plan.reason)
    if plan.library and not plan.preloaded:
        ctypes.CDLL(plan.library, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    logger.info("omnicompile.load_package: %s", plan.reason)
    return plan


def mapped_libraries(maps: str | None = None) -> list[str]:
    """The files mapped into this process, in first-mapped order (``/proc/self/maps``, or the given
    text of one); empty where there is no /proc."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    # address perms offset dev inode pathname: the path is the sixth field and may hold spaces.
    fields = (line.split(maxsplit=5) for line in maps.splitlines())
    return _unique(f[5] for f in fields if len(f) == 6 and f[5].startswith("/"))


def resolve_libstdcxx(compiler: str = "g++") -> str | None:
    """The libstdc++ that ``compiler`` links against (``-print-file-name``; AOTInductor builds
    ``wrapper.so`` with it), else the one ``ctypes.util.find_library`` names; None if neither."""
    if shutil.which(compiler):
        try:
            name = subprocess.run(
                [compiler, f"-print-file-name={LIBSTDCXX}"], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            name = ""
        if os.path.isabs(name) and os.path.exists(name):  # a bare name back: the compiler has none
            return os.path.realpath(name)
    return ctypes.util.find_library("stdc++")


def preload_env(env: Mapping[str, str] | None = None, library: str | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) with ``library`` first in ``LD_PRELOAD``: the environment of a
    process in which libstdc++ binds before everything else. ``library`` defaults to the libstdc++
    this process maps, else the resolved one (`plan_libstdcxx`)."""
    env = dict(os.environ if env is None else env)
    library = library or libstdcxx_plan().library
    if library:
        rest = [p for p in _preload_list(env.get("LD_PRELOAD", "")) if p != library]
        env["LD_PRELOAD"] = " ".join([library, *rest])
    return env


def reexec_with_preload() -> None:
    """Restart this process (same interpreter, options and arguments, ``sys.orig_argv``) with
    libstdc++ preloaded (`preload_env`); returns only if it was preloaded already or this process is
    itself such a restart (``OMNICOMPILE_REEXECUTED`` set)."""
    if os.environ.get(REEXEC_MARK) or libstdcxx_plan().preloaded:
        return
    env = {**preload_env(), REEXEC_MARK: "1"}
    logger.warning("omnicompile: restarting %s with LD_PRELOAD=%s", sys.orig_argv, env.get("LD_PRELOAD"))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def probe(path: str | os.PathLike[str], device_index: int = -1, code: str | None = None) -> str:
    """Load the package in a fresh interpreter of this environment (``sys.path`` passed on) through
    ``load_package(check=False)``; ``"ok"``, ``"crash (SIGSEGV)"`` (killed by a signal), ``"error"``
    (a Python error, which loading here raises too) or ``"timeout"``. ``code`` replaces the child's
    program (tests)."""
    code = code or (
        "import sys; from omnicompile.loading import load_package; "
        "load_package(sys.argv[1], device_index=int(sys.argv[2]), check=False)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, os.fspath(path), str(device_index)],
            env=env,
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    if done.returncode < 0:
        return f"crash ({signal.Signals(-done.returncode).name})"
    return "ok" if done.returncode == 0 else "error"


def probe_cache_path() -> Path:
    """Where probe verdicts are kept (``$XDG_CACHE_HOME/omnicompile/load_probe.json``)."""
    return (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omnicompile" / "load_probe.json"
    )


def _cached_probe(path: str | os.PathLike[str], device_index: int, plan: LibstdcxxPlan) -> str:
    """`probe`'s verdict, kept per (interpreter, torch, libstdc++): the crash is the environment's, a
    bare Linear package has it too. Only "ok" and crashes are kept."""
    key = json.dumps([sys.executable, torch.__version__, plan.library])
    cache = probe_cache_path()
    try:
        verdicts = json.loads(cache.read_text())
    except (OSError, ValueError):
        verdicts = {}
    if key not in verdicts:
        verdict = probe(path, device_index)
        logger.info("omnicompile.load_package: fresh-process load of %s: %s", os.fspath(path), verdict)
        if verdict != "ok" and not verdict.startswith("crash"):
            return verdict
        verdicts[key] = verdict
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(verdicts, indent=1))
        except OSError:
            pass  # unwritable cache: probe again next time
    return verdicts[key]


def _preload_list(value: str) -> list[str]:
    """The entries of an ``LD_PRELOAD`` value (separated by spaces or colons)."""
    return value.replace(":", " ").split()


def _start_environ() -> dict[str, str]:
    """The environment this process started with (``/proc/self/environ``: ``LD_PRELOAD`` acts only at
    start, later changes to ``os.environ`` do not); ``os.environ`` where there is no /proc."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def _is_libstdcxx(path: str) -> bool:
    return os.path.basename(path).startswith("libstdc++.so")


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
