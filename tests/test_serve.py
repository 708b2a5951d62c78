"""`omnicompile serve` (transformers' server with attn_implementation="omnisparse") on the CPU: a tiny Llama
with random weights saved to a folder, servers on loopback ports, 4 concurrent greedy requests each, the
answers of omnisparse equal to dense (sdpa), every process stopped afterwards."""

import concurrent.futures
import os
from contextlib import ExitStack

import pytest
from transformers.utils.import_utils import is_serve_available

from omnicompile.config import OmniSparseConfig
from omnicompile.evaluate import NEEDLE, QUESTION, document_text
from omnicompile.server_process import Server, complete

pytestmark = pytest.mark.skipif(
    not is_serve_available(), reason='transformers serve needs pip install "omnicompile[serving]"'
)

# tau 1 selects every block: the sparse path (selection and the reference kernel) with exact attention
SERVERS = {
    "dense": ["--attn-implementation", "sdpa"],
    "omnisparse_dense": ["--config", OmniSparseConfig(mode="dense").to_json()],
    "omnisparse_sparse": ["--config", OmniSparseConfig(min_seq_len=64, block_size=16, tau=1.0).to_json()],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from omnicompile.demos.models import save_builtin

    return save_builtin("llama-tiny", tmp_path_factory.mktemp("llama-tiny"))


def _prompts() -> list[str]:
    text = document_text()
    return [
        text[1000 * i : 1000 * i + 300 * (i + 1)] + NEEDLE.format(key=31415 + i) + QUESTION for i in range(4)
    ]


def test_serve_answers_equal_dense(checkpoint, tmp_path):
    with ExitStack() as stack:
        servers = {}
        for name, args in SERVERS.items():
            server = Server(str(checkpoint), [*args, "--device", "cpu"], tmp_path / f"{name}.log", 120)
            stack.callback(server.stop)
            server.launch()
            servers[name] = server
        for server in servers.values():
            server.wait_ready()
        answers = {}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for name, server in servers.items():
                answers[name] = list(pool.map(lambda p: complete(server.port, p, 8, 60), _prompts()))
        groups = [server.process.pid for server in servers.values()]
        logs = {name: server.log_tail(100_000) for name, server in servers.items()}
    for name, results in answers.items():
        assert [r.error for r in results] == [None] * 4, logs[name]
        assert all(r.completion_tokens > 0 and r.prompt_tokens > 100 and r.ttft is not None for r in results)
    texts = {name: [r.text for r in results] for name, results in answers.items()}
    assert texts["omnisparse_dense"] == texts["dense"]
    assert texts["omnisparse_sparse"] == texts["dense"]
    assert "loaded with attention sdpa" in logs["dense"]
    assert 'loaded with attention omnisparse {"antidiagonal_stride"' in logs["omnisparse_dense"]
    assert '"mode":"dense"' in logs["omnisparse_dense"] and '"tau":1.0' in logs["omnisparse_sparse"]
    for group in groups:  # the API servers and their model processes are gone
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)


def test_serve_rejects_what_it_cannot_run(tmp_path):
    from omnicompile.cli import main
    from omnicompile.serving import OmniSparseModelLoader, OmniSparseServe

    with pytest.raises(ValueError, match="flash_attention_2"):
        OmniSparseModelLoader(config=OmniSparseConfig(), attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="continuous batching"):
        OmniSparseServe(
            str(tmp_path),
            attn_implementation="omnisparse",
            config=OmniSparseConfig(),
            continuous_batching=True,
        )
    with pytest.raises(ValueError, match="a local folder"):
        main(["serve", str(tmp_path / "missing")])
