"""`omnicompile.export`: AOTInductor packages of a small Llama, loaded in a fresh process and run
by the C++ runner.

One package per mode (dense, sparse), exported once for the module with a dynamic sequence length
and run at two lengths by a subprocess that first loads it without importing anything of ours,
then with `omnicompile.load_package`, recording what each attention call ran. The dense package
holds its attention as aten ops (`passes.inline_attention`): it loads without omnicompile, no op
call runs, and the C++ runner (``cpp/run_package``, built once per session) runs it too, with the
outputs of Python. The sparse package keeps the op (its length is dynamic): loading it without
``import omnicompile`` fails, and so does the C++ runner; a sparse package of static shape inlines
its calls (the masked route) and runs without Python, from C++ too. Dense packages must equal the
eager model, sparse ones the model compiled by the ``omnisparse`` backend with the same config.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import omnicompile
from omnicompile import OmniSparseConfig
from omnicompile.cpp_runner import build_runner, run_package, toolchain_reason
from omnicompile.demos.models import build_model
from omnicompile.demos.structured import structured_qkv
from omnicompile.export import export, export_program
from omnicompile.loading import package_device
from omnicompile.passes.inline_attention import inlined_attention_call
from omnicompile.recording import recording
from tests.helpers import REL_TOL, rel_error

CONFIGS = {
    "dense": OmniSparseConfig(mode="dense"),
    "sparse": OmniSparseConfig(block_size=16, min_seq_len=64),
}
LENGTHS = (80, 130)  # both >= min_seq_len; 130 ends in a partial block
VOCAB = 512
# Per mode: the package holds no Python op; the attention paths its calls record (none when inlined).
PYTHON_FREE = {"dense": True, "sparse": False}
RECORDED = {"dense": [], "sparse": ["sparse"]}

# Runs in a fresh interpreter: argv = package, inputs file, outputs file.
_LOADER = textwrap.dedent(
    """
    import json, sys, torch
    package, inputs, outputs = sys.argv[1:]
    try:
        torch._inductor.aoti_load_package(package)
        error_without_import = ""
    except RuntimeError as error:
        error_without_import = str(error)
    import omnicompile
    from omnicompile.recording import recording
    model = omnicompile.load_package(package)
    logits, decisions = [], []
    for ids in torch.load(inputs):
        with recording(measure=False) as recorder:
            logits.append(model(input_ids=ids, use_cache=False)["logits"])
        decisions.append(sorted({run.decision for run in recorder.runs}))
    torch.save(
        {"logits": logits, "decisions": decisions, "error_without_import": error_without_import},
        outputs,
    )
    """
)


def _input_ids(length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return build_model("llama-tiny")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def package(request, llama, tmp_path_factory) -> tuple[str, Path]:
    mode = request.param
    path = tmp_path_factory.mktemp(f"export_{mode}") / "llama.pt2"
    inputs = {"input_ids": _input_ids(96), "use_cache": False}
    return mode, export(llama, inputs, path, CONFIGS[mode], dynamic={"input_ids": {1: "seq"}})


def _run_package(path: Path, tmp_path: Path) -> dict:
    inputs, outputs = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save([_input_ids(n) for n in LENGTHS], inputs)
    subprocess.run(
        [sys.executable, "-c", _LOADER, str(path), str(inputs), str(outputs)], check=True, timeout=300
    )
    return torch.load(outputs)


def _reference(llama: torch.nn.Module, mode: str) -> list[torch.Tensor]:
    model = llama
    if mode == "sparse":
        model = torch.compile(llama, backend=omnicompile.backend(CONFIGS[mode]), dynamic=True)
    with torch.no_grad():
        return [model(input_ids=_input_ids(n), use_cache=False).logits for n in LENGTHS]


def test_package_runs_in_fresh_process_at_two_lengths(package, llama, tmp_path):
    mode, path = package
    assert package_device(path) == "cpu"  # so load_package applies no libstdc++ fix (tests/test_loading.py)
    result = _run_package(path, tmp_path)
    if PYTHON_FREE[mode]:
        assert result["error_without_import"] == ""
    else:
        assert "omnisparse::attention" in result["error_without_import"]
    assert result["decisions"] == [RECORDED[mode]] * len(LENGTHS)
    for got, want in zip(result["logits"], _reference(llama, mode)):
        assert got.shape == want.shape
        assert rel_error(got, want) < REL_TOL[torch.float32]


@pytest.fixture(scope="session")
def cpp_runner(tmp_path_factory) -> Path:
    """``run_package`` built once per session (about 15 s), or a skip saying what is missing."""
    reason = toolchain_reason()
    if reason is not None:
        pytest.skip(f"cannot build the C++ runner: {reason}")
    return build_runner(tmp_path_factory.mktemp("run_package_build"))


def test_cpp_runner_runs_python_free_package(package, cpp_runner, tmp_path):
    """The C++ runner's logits equal Python's for the same package and input (same kernels, same
    process-independent math: rel err < 1e-6); a package that holds the op fails there, naming it."""
    mode, path = package
    ids = _input_ids(LENGTHS[1])
    if not PYTHON_FREE[mode]:
        with pytest.raises(subprocess.CalledProcessError) as failed:
            run_package(cpp_runner, path, [ids], tmp_path)
        assert "omnisparse::attention" in failed.value.stderr
        return
    (got,) = run_package(cpp_runner, path, [ids], tmp_path)
    with torch.no_grad():
        want = omnicompile.load_package(path)(input_ids=ids, use_cache=False)["logits"]
    assert got.shape == want.shape
    assert rel_error(got, want) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("package", ["dense"], indirect=True)
def test_cpp_runner_builds_without_torch_cmake_config(package, tmp_path, monkeypatch):
    """Where torch's CMake config fails (a CUDA torch without the CUDA toolkit), `build_runner` builds
    against torch's include/ and lib/ folders instead (about 15 s); that runner runs the package too."""
    if toolchain_reason() is not None:
        pytest.skip(f"cannot build the C++ runner: {toolchain_reason()}")
    _, path = package
    monkeypatch.setattr(torch.utils, "cmake_prefix_path", str(tmp_path / "no_torch_config"))
    runner = build_runner(tmp_path / "build")
    assert runner.parent.name == "folders"
    ids = _input_ids(LENGTHS[0])
    (got,) = run_package(runner, path, [ids], tmp_path)
    with torch.no_grad():
        want = omnicompile.load_package(path)(input_ids=ids, use_cache=False)["logits"]
    assert rel_error(got, want) < 1e-6


def test_hand_written_attention_is_rewritten():
    model = build_model("llama-tiny", attn_implementation="eager")
    inputs = {"input_ids": _input_ids(40), "use_cache": False}
    exported = export_program(model, inputs, CONFIGS["dense"], dynamic={"input_ids": {1: "seq"}})
    assert [(s.pattern, s.status) for s in exported.report.sites] == [("eager", "replaced")] * 2
    targets = {node.target for node in exported.program.graph.nodes}
    assert torch.ops.omnisparse.attention.default in targets
    assert not any("softmax" in str(target) for target in targets)
    ids = _input_ids(57)
    with torch.no_grad():
        got = exported.program.module()(input_ids=ids, use_cache=False)["logits"]
        want = model(input_ids=ids, use_cache=False).logits
    assert rel_error(got, want) < REL_TOL[torch.float32]


class _NoAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).softmax(-1)


class _Attention(torch.nn.Module):
    """One causal SDPA over a fused projection; ``flag`` is a non-tensor input."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(32, 96)

    def forward(self, x: torch.Tensor, flag: bool = False) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.proj(x).view(batch, seq, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, 32)


def test_model_without_attention_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="nothing in _NoAttention can become OmniSparse attention"):
        export(_NoAttention(), (torch.randn(2, 16),), tmp_path / "none.pt2")


@pytest.mark.parametrize(
    "dynamic, error, match",
    [
        ({"y": {1: "seq"}}, ValueError, r"input\(s\) \['y'\], but the inputs are \['flag', 'x'\]"),
        ({"x": {3: "seq"}}, ValueError, "dynamic dim 3 of 'x' is not a dim of its shape"),
        ({"flag": {0: "seq"}}, TypeError, "'flag', which is a bool, not a tensor"),
        ({"x": {1: 64}}, TypeError, "give a name or a torch.export.Dim"),
        (
            {"x": {2: "hidden"}},
            ValueError,
            "unsupported dynamic dimension",
        ),  # the projection fixes the hidden size
    ],
)
def test_bad_dynamic_dims_are_errors(dynamic, error, match):
    with pytest.raises(error, match=match):
        export_program(_Attention(), {"x": torch.randn(1, 48, 32), "flag": True}, dynamic=dynamic)


@pytest.mark.parametrize(
    "config, dynamic, route, reason",
    [
        (CONFIGS["dense"], {"x": {1: "seq"}}, "aten", "mode='dense'"),
        (OmniSparseConfig(min_seq_len=64), None, "aten", "kv length 48 < min_seq_len 64"),
        (OmniSparseConfig(block_size=16, min_seq_len=16), None, "masked", "the sparse method on the CPU"),
        (CONFIGS["sparse"], {"x": {1: "seq"}}, "op", "dynamic shapes"),
    ],
)
def test_inline_routes(config, dynamic, route, reason):
    """Static dims are static in the captured graph (only those asked for are symbolic), so the
    routes of `passes.inline_attention` see them; the inlined program equals the model."""
    model, x = _Attention(), torch.randn(1, 48, 32)
    exported = export_program(model, (x,), config, dynamic=dynamic, inline=True)
    ((got_route, got_reason),) = [(r.route, r.reason) for r in exported.inlined]
    assert got_route == route and reason in got_reason
    targets = {node.target for node in exported.program.graph.nodes}
    assert (torch.ops.omnisparse.attention.default in targets) == (route == "op")
    assert rel_error(exported.program.module()(x), model(x)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("window", [None, 80])
def test_masked_route_equals_the_ops_sparse_path(window):
    """`inlined_attention_call` (the CPU route of a static sparse call) equals the op's sparse path on a
    selection that drops blocks; traced by torch.export with no data-dependent shape."""
    q, k, v = structured_qkv("structured", 1, 4, 2, 200, 32, seed=3)
    config = OmniSparseConfig(block_size=16, min_seq_len=64, tau=0.8).to_json()
    args = (q, k, v, None, 0.0, True, None, True, config, "site", window, None, None, True)
    with recording() as recorder:
        want = torch.ops.omnisparse.attention(*args)
    assert recorder.runs[0].decision == "sparse" and recorder.runs[0].stats["density"] < 0.9
    got = inlined_attention_call(*args)
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() < 1e-5

    class Call(torch.nn.Module):
        def forward(self, q, k, v):
            return inlined_attention_call(q, k, v, *args[3:])

    traced = torch.export.export(Call(), (q, k, v)).module()(q, k, v)
    assert all(torch.equal(t, g) for t, g in zip(traced, got))


def test_static_sparse_package_runs_without_python(llama, tmp_path):
    """A sparse package of static shape on the CPU (`inline_attention`'s masked route at every call)
    loads without omnicompile and equals the model compiled by the backend; so does the C++ runner's
    run of it, where one can be built."""
    ids = _input_ids(LENGTHS[1])
    path = export(llama, {"input_ids": ids, "use_cache": False}, tmp_path / "static.pt2", CONFIGS["sparse"])
    compiled = torch.compile(llama, backend=omnicompile.backend(CONFIGS["sparse"]))
    with torch.no_grad():
        want = compiled(input_ids=ids, use_cache=False).logits
    inputs, outputs = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(ids, inputs)
    loader = (
        "import sys, torch; p, i, o = sys.argv[1:]; "
        "torch.save(torch._inductor.aoti_load_package(p)(input_ids=torch.load(i), use_cache=False), o)"
    )
    subprocess.run(
        [sys.executable, "-c", loader, str(path), str(inputs), str(outputs)], check=True, timeout=300
    )
    got = torch.load(outputs)["logits"]
    assert rel_error(got, want) < REL_TOL[torch.float32]
    if toolchain_reason() is None:
        (from_cpp,) = run_package(build_runner(tmp_path / "build"), path, [ids], tmp_path)
        assert rel_error(from_cpp, got) < 1e-6


def test_positional_input_with_two_dynamic_dims():
    model = _Attention()
    exported = export_program(
        model, (torch.randn(2, 48, 32),), CONFIGS["dense"], dynamic={"x": {0: "b", 1: "seq"}}
    )
    x = torch.randn(3, 70, 32)
    assert rel_error(exported.program.module()(x), model(x)) < REL_TOL[torch.float32]


def test_unknown_target_and_missing_tensorrt_extra(tmp_path, monkeypatch):
    x = (torch.randn(1, 48, 32),)
    with pytest.raises(ValueError, match="target 'onnx' is not one of"):
        export(_Attention(), x, tmp_path / "a.pt2", target="onnx")
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # importing it now raises ImportError
    with pytest.raises(ImportError, match=r"pip install omnicompile\[tensorrt\]"):
        export(_Attention(), x, tmp_path / "a.ep", target="tensorrt")
