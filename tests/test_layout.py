"""The repository layout: Python started at the root must not let the source folder kernels/ shadow the
PyPI package ``kernels`` (transformers >= 5.25 imports it), and omnicompile.kernels stays ours."""

from __future__ import annotations

import ast
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


_PACKAGES = {"omnicompile": "omnicompile", "omnicompile.passes": "passes", "omnicompile.kernels": "kernels"}


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, from the source folders."""
    modules = {}
    for prefix, folder in _PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([prefix, *parts])] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, module-level and function-local alike (read with ast)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    """Each package module's imports of other package modules."""
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_import_graph_has_no_cycle_and_kernels_stay_the_ground_floor():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # kernels/ imports only kernels/ (its stages take explicit parameters, issue 17).
    above = {
        dep
        for name, deps in graph.items()
        if name.startswith("omnicompile.kernels")
        for dep in deps
        if not dep.startswith("omnicompile.kernels")
    }
    assert not above, above


def test_the_core_imports_the_demos_only_from_the_cli():
    graph = _graph()
    assert "omnicompile.demos.demo" in graph
    importers = {
        name
        for name, deps in graph.items()
        if not name.startswith("omnicompile.demos") and any(d.startswith("omnicompile.demos") for d in deps)
    }
    assert importers == {"omnicompile.cli"}, importers


def test_kernels_import_only_kernels_torch_triton_and_the_standard_library():
    allowed = {"torch", "triton", *sys.stdlib_module_names}
    outside = set()
    for path in (ROOT / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            outside.update(f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] not in allowed)
    assert not outside, sorted(outside)


# One naming scheme per op package of kernels/ (issue 17): a package with Triton kernels (triton_*.py)
# has its pure-PyTorch reference in reference.py; a Triton module's public functions are `supported`
# and functions named as the reference functions they accelerate (a backward `<name>_backward`: the
# Triton gradients of the reference `<name>`, whose own backward is autograd's); the launch config is
# one type, `LaunchConfig`, in the package's launch.py, beside its defaults and launch helpers.
_JIT = {"jit", "autotune", "heuristics"}


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """The module-level functions of ``tree``, those under a top-level ``if`` / ``try`` too."""
    found, pending = {}, list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, (ast.If, ast.Try)):
            pending += node.body + node.orelse + getattr(node, "finalbody", [])
    return found


def _is_jit(fn: ast.FunctionDef) -> bool:
    """A Triton kernel (``@triton.jit`` and the like): launched, never called as a Python function."""
    for decorator in fn.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr in _JIT:
            return True
    return False


def _launch_types(tree: ast.Module) -> set[str]:
    """Launch-config types named in ``tree``: classes with a ``num_warps`` field and the annotations of
    ``launch`` / ``tiles`` parameters."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
            isinstance(s, ast.AnnAssign) and getattr(s.target, "id", None) == "num_warps" for s in node.body
        ):
            names.add(node.name)
        elif isinstance(node, ast.arg) and node.arg in ("launch", "tiles") and node.annotation is not None:
            names.update(
                n.id for n in ast.walk(node.annotation) if isinstance(n, ast.Name) and n.id != "None"
            )
    return names


def test_op_packages_share_one_naming_scheme():
    problems, launch_types = [], set()
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        tree = ast.parse(path.read_text())
        types = _launch_types(tree)
        launch_types |= types
        defined = {node.name for node in tree.body if isinstance(node, ast.ClassDef) and node.name in types}
        if defined and path.name != "launch.py":
            problems.append(f"{path.relative_to(ROOT)}: launch config {sorted(defined)} outside launch.py")
    if len(launch_types) > 1:
        problems.append(f"launch-config types {sorted(launch_types)}: one name for every package")
    for package in sorted({path.parent for path in (ROOT / "kernels").glob("*/triton_*.py")}):
        reference = package / "reference.py"
        if not reference.exists():
            problems.append(f"{package.relative_to(ROOT)}: Triton kernels without a reference.py")
            continue
        references = set(_functions(ast.parse(reference.read_text())))
        for path in sorted(package.glob("triton_*.py")):
            functions = _functions(ast.parse(path.read_text()))
            if "supported" not in functions:
                problems.append(f"{path.relative_to(ROOT)}: no supported(...)")
            for name, fn in functions.items():
                if name.startswith("_") or name == "supported" or _is_jit(fn):
                    continue
                if name not in references and name.removesuffix("_backward") not in references:
                    problems.append(f"{path.relative_to(ROOT)}: {name} is not a function of reference.py")
    assert not problems, problems


def _private_uses(source: str) -> list[str]:
    """Private names (``_x``, not dunders) of this project's modules that ``source`` imports
    (``from .m import _x``) or reads off an imported name (``m._x``)."""

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    tree, bound, uses = ast.parse(source), set(), []
    for node in ast.walk(tree):
        ours = isinstance(node, ast.ImportFrom) and (
            node.level or (node.module or "").startswith("omnicompile")
        )
        if ours:
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if private(alias.name):
                    uses.append(f"line {node.lineno}: import of {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("omnicompile"):
                    bound.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            if isinstance(node.value, ast.Name) and node.value.id in bound:
                uses.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return uses


def test_the_private_name_check_sees_both_forms():
    source = "from .a import _b, c\nfrom . import m\nimport torch\nm._d, c.e, torch._dynamo, m.__doc__\n"
    assert _private_uses(source) == ["line 1: import of _b", "line 4: m._d"]


def test_no_module_imports_a_private_name_of_another():
    uses = [
        f"{path.relative_to(ROOT)} {use}"
        for folder in ("kernels", "omnicompile", "passes")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for use in _private_uses(path.read_text())
    ]
    assert not uses, uses
