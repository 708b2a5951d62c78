"""`omnicompile.loading`: the libstdc++ decision on made-up process states, the CUDA path of
`load_package` with a faked probe, the probe's and the re-exec's real subprocesses.

A real package load through `load_package` (CPU) is in tests/test_export.py, whose packages it uses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import omnicompile
from omnicompile import loading
from omnicompile.loading import LibstdcxxCrashError, LibstdcxxPlan, plan_libstdcxx

SYSTEM = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.33"
BUNDLED = "/opt/conda/lib/libstdc++.so.6.0.34"

MAPS = textwrap.dedent(
    f"""\
    5581f0a00000-5581f0a01000 r--p 00000000 08:01 131 /usr/bin/python3.12
    5581f1000000-5581f1021000 rw-p 00000000 00:00 0 [heap]
    7f0000000000-7f0000001000 r--p 00000000 08:01 200 /opt/my libs/libfoo.so
    7f0000100000-7f0000200000 r-xp 00000000 08:01 201 {SYSTEM}
    7f0000200000-7f0000201000 r--p 00100000 08:01 201 {SYSTEM}
    7f0000300000-7f0000301000 rw-p 00000000 00:00 0
    7f0000400000-7f0000401000 r-xp 00000000 08:01 202 /usr/lib/x86_64-linux-gnu/libgcc_s.so.1
    """
)


def test_mapped_libraries_lists_files_once_in_map_order():
    assert loading.mapped_libraries(MAPS) == [
        "/usr/bin/python3.12",
        "/opt/my libs/libfoo.so",
        SYSTEM,
        "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
    ]


@pytest.mark.parametrize(
    "mapped, preloaded, resolved, want",
    [
        # the process started with LD_PRELOAD of the libstdc++ it maps: nothing to do
        ([SYSTEM], [SYSTEM], SYSTEM, (SYSTEM, True, False)),
        # mapped, not preloaded: promote what is mapped, never the resolved one beside it
        ([SYSTEM], [], BUNDLED, (SYSTEM, False, False)),
        (["/x/libc.so.6", BUNDLED, SYSTEM], [SYSTEM], SYSTEM, (BUNDLED, False, True)),
        # another library preloaded: not ours
        ([SYSTEM], ["/usr/lib/libjemalloc.so"], None, (SYSTEM, False, False)),
        # nothing mapped yet: the resolved one; nothing at all: nothing
        (["/x/libc.so.6"], [], SYSTEM, (SYSTEM, False, False)),
        ([], [], None, (None, False, False)),
    ],
)
def test_plan_libstdcxx(mapped, preloaded, resolved, want):
    plan = plan_libstdcxx(mapped, preloaded, resolved)
    assert (plan.library, plan.preloaded, plan.mixed) == want


def test_plan_compares_real_paths(tmp_path):
    real = tmp_path / "libstdc++.so.6.0.33"
    real.touch()
    (tmp_path / "libstdc++.so.6").symlink_to(real.name)
    plan = plan_libstdcxx([str(real)], [str(tmp_path / "libstdc++.so.6")], None)
    assert plan.preloaded and plan.library == str(real)


def _fake_compiler(tmp_path: Path, prints: str) -> str:
    compiler = tmp_path / "fake-g++"
    compiler.write_text(f"#!/bin/sh\necho '{prints}'\n")
    compiler.chmod(0o755)
    return str(compiler)


def test_resolve_libstdcxx_asks_the_compiler_then_find_library(tmp_path, monkeypatch):
    library = tmp_path / "libstdc++.so.6.0.33"
    library.touch()
    (tmp_path / "libstdc++.so.6").symlink_to(library.name)
    assert loading.resolve_libstdcxx(_fake_compiler(tmp_path, str(tmp_path / "libstdc++.so.6"))) == str(
        library
    )
    monkeypatch.setattr(loading.ctypes.util, "find_library", lambda name: f"lib{name}.so.6")
    # a compiler without the library prints the bare name back
    assert loading.resolve_libstdcxx(_fake_compiler(tmp_path, "libstdc++.so.6")) == "libstdc++.so.6"
    assert loading.resolve_libstdcxx(str(tmp_path / "no-such-compiler")) == "libstdc++.so.6"


def test_preload_env_puts_libstdcxx_first_once():
    env = loading.preload_env({"LD_PRELOAD": f"/lib/libjemalloc.so {SYSTEM}", "A": "1"}, SYSTEM)
    assert env == {"LD_PRELOAD": f"{SYSTEM} /lib/libjemalloc.so", "A": "1"}
    assert loading.preload_env({"A": "1"}, SYSTEM) == {"A": "1", "LD_PRELOAD": SYSTEM}


def test_preload_env_defaults_to_the_libstdcxx_this_process_maps():
    mapped = [os.path.realpath(p) for p in loading.mapped_libraries() if "libstdc++.so" in p]
    assert mapped, "torch is imported, so libstdc++ is mapped"
    assert loading.preload_env({})["LD_PRELOAD"] == mapped[0]


def _archive(path: Path, metadata: dict | None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/archive_format", "pt2")
        if metadata is not None:
            archive.writestr("m/data/aotinductor/model/abc.wrapper_metadata.json", json.dumps(metadata))
    return path


def test_package_device_reads_the_wrapper_metadata(tmp_path):
    assert loading.package_device(_archive(tmp_path / "a.pt2", {"AOTI_DEVICE_KEY": "cuda"})) == "cuda"
    assert loading.package_device(_archive(tmp_path / "b.pt2", None)) == ""


@pytest.fixture
def fake_cuda(tmp_path, monkeypatch):
    """A CUDA package as far as `load_package` can tell, a loader that only records, no real fix, and
    a probe cache in tmp_path; returns the probe verdicts asked for (a list) and the loads."""
    probes: list[str] = []
    loads: list[str] = []
    verdict = {"value": "ok"}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "package_device", lambda path: "cuda")
    monkeypatch.setattr(
        loading, "apply_libstdcxx_fix", lambda: LibstdcxxPlan(SYSTEM, False, False, "promoted (fake)")
    )
    monkeypatch.setattr(
        loading, "probe", lambda path, device_index: probes.append(verdict["value"]) or verdict["value"]
    )
    monkeypatch.setattr(
        torch._inductor, "aoti_load_package", lambda path, **kw: loads.append(path) or "model"
    )
    return verdict, probes, loads


def test_load_package_probes_once_and_loads(fake_cuda):
    verdict, probes, loads = fake_cuda
    assert omnicompile.load_package("m.pt2") == "model"
    assert omnicompile.load_package("m.pt2") == "model"
    assert probes == ["ok"] and loads == ["m.pt2", "m.pt2"]  # the verdict is kept on disk
    assert list(json.loads(loading.probe_cache_path().read_text()).values()) == ["ok"]


def test_load_package_raises_instead_of_crashing(fake_cuda):
    verdict, probes, loads = fake_cuda
    verdict["value"] = "crash (SIGSEGV)"
    for _ in range(2):
        with pytest.raises(
            LibstdcxxCrashError,
            match=re.escape("died (crash (SIGSEGV)): the libstdc++ crash")
            + f".*LD_PRELOAD={re.escape(SYSTEM)}",
        ):
            omnicompile.load_package("m.pt2")
    assert probes == ["crash (SIGSEGV)"] and loads == []


def test_load_package_reexec_on_crash(fake_cuda, monkeypatch):
    verdict, _, loads = fake_cuda
    verdict["value"] = "crash (SIGSEGV)"
    restarts: list[bool] = []
    monkeypatch.setattr(loading, "reexec_with_preload", lambda: restarts.append(True))
    with pytest.raises(LibstdcxxCrashError):  # the fake restart returns, so the error follows
        omnicompile.load_package("m.pt2", reexec=True)
    assert restarts == [True] and loads == []


def test_a_restarted_process_never_restarts_again(monkeypatch):
    monkeypatch.setenv(loading.REEXEC_MARK, "1")
    monkeypatch.setattr(loading.os, "execve", lambda *args: pytest.fail("restarted twice"))
    loading.reexec_with_preload()


def test_load_package_python_errors_are_left_to_the_load(fake_cuda):
    verdict, probes, loads = fake_cuda
    verdict["value"] = "error"
    omnicompile.load_package("m.pt2")
    omnicompile.load_package("m.pt2")
    assert probes == ["error", "error"] and loads == ["m.pt2", "m.pt2"]  # not kept: asked again


def test_load_package_preloaded_needs_no_probe(fake_cuda, monkeypatch):
    _, probes, loads = fake_cuda
    monkeypatch.setattr(
        loading, "apply_libstdcxx_fix", lambda: LibstdcxxPlan(SYSTEM, True, False, "preloaded (fake)")
    )
    omnicompile.load_package("m.pt2")
    assert probes == [] and loads == ["m.pt2"]


@pytest.mark.parametrize(
    "code, want",
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "crash (SIGSEGV)"),
        ("raise SystemExit(3)", "error"),
        ("import omnicompile.loading", "ok"),  # the child finds omnicompile (sys.path passed on)
    ],
)
def test_probe_reports_how_the_child_ended(code, want, tmp_path):
    assert loading.probe(tmp_path / "m.pt2", code=code) == want


# Runs in a fresh interpreter: a CUDA package whose probe crashes, loaded with reexec=True.
_REEXEC = textwrap.dedent(
    """
    import os, torch
    from omnicompile import loading
    print("start", os.environ.get("LD_PRELOAD"), flush=True)
    loading.package_device = lambda path: "cuda"
    loading.probe = lambda path, device_index: "crash (SIGSEGV)"
    torch._inductor.aoti_load_package = lambda path, **kw: "model"
    print("loaded", loading.load_package("m.pt2", reexec=True), flush=True)
    """
)


def test_reexec_restarts_the_process_with_libstdcxx_preloaded():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", loading.REEXEC_MARK)}
    done = subprocess.run(
        [sys.executable, "-c", _REEXEC], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    first, restarted, loaded = done.stdout.splitlines()
    assert first == "start None"
    assert restarted.startswith("start /") and "libstdc++.so" in restarted
    assert loaded == "loaded model"  # the restart saw its preload: else the faked crash would raise
