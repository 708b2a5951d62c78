"""The command line: demo, inspect with a plot, export, argument errors."""

import pytest

from omnicompile.cli import main


def test_demo_runs_small(capsys):
    assert main(["demo", "--seq-len", "256", "--structured-len", "1024", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mode=dense" in out and "mode=sparse" in out and "structured attention input" in out
    assert out.count("max |logits - eager|") == 2


def test_inspect_plots_a_layer(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sel.png"
    config = '{"min_seq_len": 128, "block_size": 16, "granularity": 4}'
    assert (
        main(
            [
                "inspect",
                "llama-tiny",
                "--seq-len",
                "256",
                "--config",
                config,
                "--plot",
                str(png),
                "--heads",
                "0",
                "3",
            ]
        )
        == 0
    )
    assert png.stat().st_size > 10_000
    assert "sparse" in capsys.readouterr().out


def test_inspect_rejects_unknown_config_fields():
    with pytest.raises(ValueError, match="taux"):
        main(["inspect", "llama-tiny", "--config", '{"taux": 1}'])


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        main(["inspect", "no-such-model"])
