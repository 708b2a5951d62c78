"""Why do AOTInductor CUDA packages crash at load, and does `omnicompile.load_package` fix it? (GPU.)

One command, every step reporting and going on when another failed:

1. ``maps``: the libstdc++ / libgcc lines of ``/proc/self/maps`` after ``import torch``, the
   libstdc++ that ``g++`` resolves to, and what `omnicompile.loading` would do in this process.
2. ``build``: a bare Linear+ReLU CUDA package (`gpu_check_aoti_runtime.build`), and the ``NEEDED``
   entries of its ``wrapper.so``.
3. Fresh processes, run at once, each loading and running the package
   (`gpu_check_aoti_runtime.load_and_run`; a SIGSEGV is only an exit status):
   ``plain`` (no fix), ``preload`` (``LD_PRELOAD`` = that libstdc++), ``promote_first`` (libstdc++
   opened ``RTLD_GLOBAL`` before ``import torch``), ``load_package`` (`omnicompile.load_package`,
   nothing else: the fix as users get it; its fresh-process probe's verdict says whether the
   ``RTLD_GLOBAL`` promotion after ``import torch`` is enough), ``load_package_reexec`` (the same
   with ``reexec=True``: restarted with the preload where the probe crashed), and ``plain`` and
   ``preload`` again under ``LD_DEBUG=bindings,scopes``.
4. ``bindings``: from the two ``LD_DEBUG`` logs, every binding of a regex / locale / ctype / facet
   symbol and every binding of ``wrapper.so`` (which file binds which symbol to which library), the
   symbols bound differently with and without the preload and the files the crashing run bound
   them to (``culprits``: the root cause), and the lookup scopes of ``wrapper.so``.

Writes ``diagnose.json`` (every step's result), ``diagnose.txt`` (what was printed) and
``bindings_<run>.txt`` (the filtered binding tables) to ``--out``. About 2-3 minutes on an H100.

Usage: ``python3 scripts/gpu_diagnose_aoti.py --out DIR`` (from the repository root, omnicompile
installed); exits 1 if neither ``load_package`` run loaded and ran the package.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_MAPS_AFTER_TORCH = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import gpu_check_aoti_runtime as check  # noqa: E402  (reused: the package and the child's load)

SYMBOLS = re.compile(r"regex|locale|ctype|facet|collate")
BINDING = re.compile(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: \S+ symbol `([^']+)'(?: \[([^\]]+)\])?")
LINES: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


def step(results: dict[str, Any], name: str, run: Callable[[], Any]) -> Any:
    """Run one step; its result (or error) goes into ``results[name]``; never raises."""
    start = time.perf_counter()
    try:
        results[name] = run()
    except Exception as error:  # noqa: BLE001  (a failed step is reported, the next one runs)
        results[name] = {"error": f"{type(error).__name__}: {error}"}
    say(f"[{name}] {time.perf_counter() - start:.1f} s: {json.dumps(results[name], default=str)[:3000]}")
    return results[name]


def maps_step() -> dict[str, Any]:
    from omnicompile import loading

    gxx = shutil.which("g++")
    version = subprocess.run([gxx, "--version"], capture_output=True, text=True).stdout if gxx else ""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.executable,
        "gxx": version.split("\n")[0] or None,
        "resolved_libstdcxx": loading.resolve_libstdcxx(),
        "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
        "maps_after_import_torch": [
            line for line in _MAPS_AFTER_TORCH.splitlines() if re.search(r"libstdc\+\+|libgcc", line)
        ],
        "mapped_files_after_import_torch": len(loading.mapped_libraries(_MAPS_AFTER_TORCH)),
        "plan_after_import_omnicompile": dataclasses.asdict(loading.libstdcxx_plan()),
    }


def build_step(device: str, work: Path) -> dict[str, Any]:
    path, seq = check.build("plain", device, str(work))
    needed: list[str] = []
    if shutil.which("readelf"):
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("wrapper.so"))
            wrapper = Path(archive.extract(name, work / "extracted"))
        dynamic = subprocess.run(["readelf", "-d", str(wrapper)], capture_output=True, text=True).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    return {"package": path, "seq": seq, "wrapper_needed": needed}


@dataclass(frozen=True)
class Run:
    """One fresh-process load: ``prefix`` runs first, ``way`` and ``kwargs`` go to `load_and_run`."""

    name: str
    env: dict[str, str]
    prefix: str = ""
    way: str = "package"
    kwargs: dict[str, Any] = field(default_factory=dict)


def child(package: dict[str, Any], device: str, work: Path, run: Run, timeout: float) -> dict[str, Any]:
    """Load and run the package in a fresh interpreter; its exit status, time, output's end and, for
    `omnicompile.load_package`, its probe's verdict."""
    code = (
        f"{run.prefix}import sys; sys.path.insert(0, {str(SCRIPTS)!r}); "
        "import gpu_check_aoti_runtime as check; "
        f"check.load_and_run({package['package']!r}, {device!r}, {package['seq']}, {run.way!r}, "
        f"{run.kwargs!r})"
    )
    cache = work / f"cache_{run.name}"  # each run its own probe verdict
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", code],
            cwd=work,
            env={**run.env, "XDG_CACHE_HOME": str(cache)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status, output = "timeout", f"{expired.stdout or ''}{expired.stderr or ''}"
    verdicts = cache / "omnicompile" / "load_probe.json"
    return {
        "ok": "ran, output" in output and status == 0,
        "status": status,
        "signal": _signal_name(status),
        "seconds": round(time.perf_counter() - start, 1),
        "probe": list(json.loads(verdicts.read_text()).values()) if verdicts.exists() else None,
        "output_end": output.strip()[-1500:],
    }


def children_step(package: dict[str, Any], device: str, work: Path, timeout: float) -> dict[str, Any]:
    from omnicompile import loading

    library = loading.resolve_libstdcxx()
    base = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base.pop("LD_PRELOAD", None)
    preload = loading.preload_env(base, library)
    promote = f"import ctypes, os; ctypes.CDLL({library!r}, mode=os.RTLD_NOW | os.RTLD_GLOBAL); "

    def debug(env: dict[str, str], name: str) -> dict[str, str]:
        return {**env, "LD_DEBUG": "bindings,scopes", "LD_DEBUG_OUTPUT": str(work / f"lddebug_{name}")}

    runs = [
        Run("plain", base),
        Run("preload", preload),
        Run("promote_first", base, prefix=promote),
        Run("load_package", base, way="omnicompile"),
        Run("load_package_reexec", base, way="omnicompile", kwargs={"reexec": True}),
        Run("debug_plain", debug(base, "plain")),
        Run("debug_preload", debug(preload, "preload")),
    ]
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {run.name: pool.submit(child, package, device, work, run, timeout) for run in runs}
        return {name: future.result() for name, future in futures.items()}


def bindings_step(work: Path, out: Path) -> dict[str, Any]:
    """Filter the LD_DEBUG logs of the two debug runs; what differs between them names the culprit."""
    tables: dict[str, dict[tuple[str, str], str]] = {}
    summary: dict[str, Any] = {}
    for run in ("plain", "preload"):
        table, scopes = _read_ld_debug(sorted(work.glob(f"lddebug_{run}.*")))
        tables[run] = table
        pairs = collections.Counter((src, dst) for (src, _), dst in table.items())
        lines = [f"{n:6d}  {src} -> {dst}" for (src, dst), n in pairs.most_common()]
        lines += ["", "symbol bindings (from file: symbol -> to file):"]
        lines += [f"{src}: {sym} -> {dst}" for (src, sym), dst in sorted(table.items())]
        lines += ["", "wrapper.so lookup scopes:", *scopes]
        (out / f"bindings_{run}.txt").write_text("\n".join(lines) + "\n")
        wrapper = collections.Counter(dst for (src, _), dst in table.items() if src == "wrapper.so")
        summary[run] = {"bindings": len(table), "wrapper_binds_to": dict(wrapper), "wrapper_scopes": scopes}
    plain, preload = tables["plain"], tables["preload"]
    differ = sorted(key for key in plain if plain[key] != preload.get(key, plain[key]))
    # where the crashing run bound what the preloaded run bound to libstdc++: the culprits
    summary["culprits"] = dict(collections.Counter(plain[key] for key in differ))
    summary["differ"] = [
        f"{src}: {sym}: {plain[src, sym]} (plain) vs {preload[src, sym]} (preload)" for src, sym in differ
    ][:200]
    return summary


def _read_ld_debug(files: list[Path]) -> tuple[dict[tuple[str, str], str], list[str]]:
    """``{(from file, symbol): to file}`` for regex/locale symbols and every symbol of wrapper.so, and
    the scope lines of wrapper.so."""
    table: dict[tuple[str, str], str] = {}
    scopes: list[str] = []
    in_wrapper = False
    for file in files:
        with open(file, errors="replace") as lines:
            for raw in lines:
                if "binding file" in raw and not (SYMBOLS.search(raw) or "wrapper.so" in raw):
                    continue  # most of the log; only these bindings are kept
                line = raw.split(":", 1)[1].strip() if re.match(r"\s*\d+:", raw) else raw.strip()
                if line.startswith("object="):
                    in_wrapper = "wrapper.so" in line
                    if in_wrapper:
                        scopes.append(line)
                elif in_wrapper and line.startswith("scope"):
                    scopes.append(line[:8000])
                match = BINDING.search(line)
                if match and (SYMBOLS.search(match[3]) or match[1].endswith("wrapper.so")):
                    table[_file(match[1]), f"{match[3]} [{match[4] or ''}]"] = _file(match[2])
    return table, list(dict.fromkeys(scopes))


def _file(path: str) -> str:
    """A bound file as one name for both runs: ``wrapper.so`` for the package's, else its real path."""
    return "wrapper.so" if path.endswith("wrapper.so") else os.path.realpath(path)


def _signal_name(status: Any) -> str | None:
    return signal.Signals(-status).name if isinstance(status, int) and status < 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")) / "diagnose_aoti")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per child process")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        step(results, "maps", maps_step)
        package = step(results, "build", lambda: build_step(args.device, work))
        if "package" in package:
            step(results, "children", lambda: children_step(package, args.device, work, args.timeout))
            step(results, "bindings", lambda: bindings_step(work, args.out))
    children = results.get("children")
    runs = children if isinstance(children, dict) and "error" not in children else {}
    for name, result in runs.items():
        say(
            f"{name}: {'ok' if result['ok'] else 'FAILED'} (status {result['status']}, "
            f"{result['signal'] or '-'}, {result['seconds']} s, probe {result['probe']})"
        )
    fixed = any(runs.get(name, {}).get("ok") for name in ("load_package", "load_package_reexec"))
    say(f"omnicompile.load_package {'loads and runs' if fixed else 'did NOT load and run'} the package")
    (args.out / "diagnose.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "diagnose.txt").write_text("\n".join(LINES) + "\n")
    return 0 if fixed else 1


if __name__ == "__main__":
    sys.exit(main())
