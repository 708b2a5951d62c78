"""`omnicompile.evaluate`: documents, passkey prompts, and dense-vs-sparse metrics on a tiny Llama.

A word-level tokenizer over a 512-token vocabulary stands in for a real one (the evaluation only
calls ``encode``); the real-weight runs are in docs/ACCURACY.md.
"""

from __future__ import annotations

import json
import math
import zlib

import pytest

from omnicompile import cli
from omnicompile.demos.models import build_model
from omnicompile.evaluate import (
    EvalSettings,
    document_ids,
    document_text,
    evaluate,
    markdown_table,
    passkey_depths,
    passkey_prompt,
    plot_layers,
)

_VOCAB = 512
_BASE = {"min_seq_len": 0, "block_size": 16, "granularity": 4, "query_chunk": 4}


class WordTokenizer:
    """Whitespace words hashed into [2, vocab); token 1 is BOS, put first when asked for special tokens."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        words = [2 + zlib.crc32(w.encode()) % (_VOCAB - 2) for w in text.split()]
        return ([1] if add_special_tokens else []) + words


@pytest.fixture(scope="module")
def model():
    return build_model("llama-tiny")


def test_document_is_long_prose_that_ships_with_python():
    text = document_text()
    assert len(text) > 200_000 and "the" in text.split()
    ids = document_ids(WordTokenizer(), 300)
    assert ids.shape == (1, 300) and ids[0, 0] == 1 and (ids[0, 1:] > 1).all()
    with pytest.raises(ValueError, match="exceeds"):
        document_ids(WordTokenizer(), 10**8)


def test_passkey_prompt_places_needle_and_ends_with_the_answer():
    tok = WordTokenizer()
    ids, answer = passkey_prompt(tok, 400, 0.25, 31415)
    assert ids.shape == (1, 400)
    assert answer.tolist() == tok.encode("31415", add_special_tokens=False)
    assert ids[0, -1:].tolist() == answer.tolist()
    needle = tok.encode("The pass key is 31415. Remember", add_special_tokens=False)
    row = ids[0].tolist()
    at = next(i for i in range(len(row)) if row[i : i + len(needle)] == needle)
    assert 0.2 < at / 400 < 0.3
    with pytest.raises(ValueError, match="cannot hold"):
        passkey_prompt(tok, 10, 0.5, 31415)
    with pytest.raises(ValueError, match="outside"):
        passkey_prompt(tok, 400, 1.5, 31415)


def test_depths_are_evenly_spread():
    assert passkey_depths(10)[0] == 0.05 and passkey_depths(10)[-1] == 0.95 and len(passkey_depths(10)) == 10
    assert passkey_depths(1) == [0.5] and passkey_depths(0) == []


def test_full_selection_matches_dense(model):
    """tau 1 without query selection selects every block: sparse equals dense, every layer ran sparse."""
    settings = EvalSettings(
        lengths=(128,), taus=(1.0,), depths=2, base_config={**_BASE, "query_selection": False}
    )
    results = evaluate(model, WordTokenizer(), settings, progress=False)
    entry = results["runs"][0]["configs"][0]
    assert entry["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert entry["top1"] == 1.0 and abs(entry["kl"]) < 1e-5
    assert [layer["decision"] for layer in entry["layers"]] == ["sparse", "sparse"]
    assert all(layer["density"] == 1.0 and layer["recall_min"] > 0.999 for layer in entry["layers"])
    dense = results["runs"][0]["passkeys_dense"]
    for d, s in zip(dense, entry["passkeys"]):
        assert d["found"] == s["found"] and s["logprob"] == pytest.approx(d["logprob"], abs=1e-3)


def test_sparse_configs_report_every_scope(model, tmp_path):
    settings = EvalSettings(
        lengths=(192,), scopes=("heads", "head"), taus=(0.5,), depths=1, base_config=_BASE
    )
    results = evaluate(model, WordTokenizer(), settings, progress=False)
    entries = results["runs"][0]["configs"]
    assert [e["budget_scope"] for e in entries] == ["heads", "head"]
    for entry in entries:
        assert math.isfinite(entry["ppl_ratio"]) and 0 <= entry["top1"] <= 1 and entry["kl"] >= -1e-6
        assert 0 < entry["density_layers"] < 1
    assert (
        entries[1]["density_layers"] <= entries[0]["density_layers"] + 1e-6
    )  # per-head K never exceeds shared
    table = markdown_table(results)
    assert table.count("\n") == 3 and "| 192 | head | 0.5 |" in table
    json.dumps(results)
    assert plot_layers(results, tmp_path / "layers.png").stat().st_size > 0


def test_cli_eval_rejects_bad_config_before_loading():
    with pytest.raises(ValueError, match="unknown field"):
        cli.main(["eval", "--config", '{"no_such_field": 1}'])
