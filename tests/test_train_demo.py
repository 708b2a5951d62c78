"""The training demonstration: its recall data, and the tiny setting end to end on the CPU."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from omnicompile.demos import train_demo
from omnicompile.demos.train_demo import RecallTask


def test_recall_answers_are_the_values_bound_to_their_key_by_a_context_pair_token() -> None:
    task = RecallTask(seq_len=160, pairs=10, queries=6, keys=12, values=7, fillers=5)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    ids, labels = task.batch(6, torch.Generator().manual_seed(seed), "cpu")
    assert ids.shape == labels.shape == (6, 160) and (ids[:, 0] == 0).all()
    assert ids.max() < task.vocab_size == 1 + 5 + 12 + 7 + 12 * 7
    first_key = 1 + task.fillers
    first_value = first_key + task.keys
    first_pair = first_value + task.values
    context_end = 3 * 160 // 4
    for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
        answers = [p for p, label in enumerate(row_labels) if label != -100]
        assert len(answers) == task.queries and all(p > context_end for p in answers)
        context = row_ids[:context_end]
        assert not any(first_key <= t < first_pair for t in context)  # no bare key or value tokens
        bound = {divmod(t - first_pair, task.values) for t in context if t >= first_pair}
        assert len(bound) == task.pairs == len({key for key, _ in bound})
        for p in answers:
            key, value = row_ids[p - 1] - first_key, row_labels[p] - first_value
            assert 0 <= key < task.keys and row_ids[p] == row_labels[p]
            assert (key, value) in bound


def test_recall_task_rejects_impossible_layouts() -> None:
    with pytest.raises(ValueError, match="distinct keys"):
        RecallTask(seq_len=4096, pairs=20, queries=5, keys=10, values=10)
    with pytest.raises(ValueError, match="more than"):
        RecallTask(seq_len=4096, pairs=4, queries=5, keys=10, values=10)
    with pytest.raises(ValueError, match="do not fit"):
        RecallTask(seq_len=64, pairs=12, queries=9, keys=16, values=16)
    RecallTask(seq_len=64, pairs=12, queries=8, keys=16, values=16)  # the largest that fits


@pytest.mark.slow
def test_tiny_setting_trains_evaluates_and_saves(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    train_demo.add_arguments(parser)
    args = parser.parse_args(["--tiny", "--out", str(tmp_path), "--device", "cpu"])
    assert train_demo.run(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    results = report["results"]
    assert set(results) == {
        "dense",
        "sparse, training-free",
        "sparse, after sparse fine-tune",
        "dense, after sparse fine-tune",
    }
    for name, result in results.items():
        assert 0.0 <= result["accuracy"] <= 1.0
        if name.startswith("sparse"):
            assert len(result["layers"]) == train_demo.TINY.layers
            for layer in result["layers"]:
                assert layer["decision"] == "sparse"
                assert (
                    0.0 < layer["density"] <= 1.0 and 0.0 < layer["recall_min"] <= layer["recall_mean"] <= 1.0
                )
    assert len(report["phase_accuracy"]) == len(train_demo.TINY.dense_phases)
    for folder in ("dense", "sparse_finetuned"):
        assert (tmp_path / folder / "model.safetensors").is_file() and (
            tmp_path / folder / "config.json"
        ).is_file()
    # --init starts from the saved dense weights and skips dense training: same dense accuracy.
    again = tmp_path / "again"
    args = parser.parse_args(
        [
            "--tiny",
            "--out",
            str(again),
            "--device",
            "cpu",
            "--init",
            str(tmp_path / "dense"),
            "--finetune-steps",
            "1",
            "--finetune-lr",
            "0.002",
        ]
    )
    assert train_demo.run(args) == 0
    rerun = json.loads((again / "report.json").read_text())
    assert rerun["phase_accuracy"] == {} and rerun["results"]["dense"] == results["dense"]
    assert rerun["setting"]["finetune_lr"] == 0.002 and rerun["setting"]["finetune"]["steps"] == 1

    # Past the trained length the RoPE is interpolated (linear scaling by S / trained length): the
    # rotary frequencies are divided by that factor; up to the trained length the model is as saved.
    as_saved, longer = (train_demo.load_model(tmp_path / "dense", n, trained_len=256) for n in (256, 1024))
    assert as_saved.config.rope_parameters["rope_type"] == "default"
    assert (
        longer.config.rope_parameters["rope_type"] == "linear"
        and longer.config.rope_parameters["factor"] == 4
    )
    torch.testing.assert_close(longer.model.rotary_emb.inv_freq, as_saved.model.rotary_emb.inv_freq / 4)
