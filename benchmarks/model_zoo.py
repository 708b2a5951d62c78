"""Model zoo (issue 19): tiny random-weight transformers models compiled with the backend in dense mode.

For every architecture and attention implementation (``sdpa`` and ``eager`` where the model has both):
build the model from a tiny config (fp32, CPU, eval), run it compiled with ``backend="omnisparse"``
(`omnicompile.explain`, ``mode="dense"``) and uncompiled on the same inputs, and record the attention
sites rewritten against the attention computations the architecture has, the relative error
||compiled - eager|| / ||eager|| of every compared output (the largest is reported), and the reason of
every untouched site. A model that fails to build, compile or run is a row with its error.

Inputs: a batch of 2 sequences of 16 tokens, the first left-padded by 3 (models that take an
attention mask); errors are measured at the unpadded positions only (a query row that sees no key is
where the op and eager attention may differ: README, "Fully masked rows").

    .venv/bin/python benchmarks/model_zoo.py                  # every model; writes the CSV and docs/MODELS.md
    .venv/bin/python benchmarks/model_zoo.py --only llama gpt2 --no-docs
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig

from omnicompile import explain
from omnicompile.config import OmniSparseConfig

ROOT = Path(__file__).resolve().parents[1]
DENSE = OmniSparseConfig(mode="dense")
# Sparse mode on the same inputs: blocks of 16 tokens, no length floor, no density fallback.
SPARSE = OmniSparseConfig(block_size=16, min_seq_len=16, dense_fallback_density=1.0)
REL_TOL = 1e-4  # tests/helpers.py REL_TOL[torch.float32]
BATCH, SEQ, PAD, DECODER_SEQ, VOCAB = 2, 16, 3, 7, 128
LAYERS = 2
IMAGE_TOKEN = 3  # llava: 4 image tokens at positions 5-8 (16x16 image, 8x8 patches)
# The usual names of a small text config: hidden 64, 4 query heads of 16, 2 KV heads, 2 layers.
TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
TEXT_MHA = {k: v for k, v in TEXT.items() if k != "num_key_value_heads"}
VISION = {
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


@dataclass(frozen=True)
class Spec:
    """One architecture: how to build it and what to feed and compare.

    Attributes:
        name: row name; model_type: `AutoConfig.for_model` key; auto: the Auto class name.
        config: config overrides; sites: the attention computations of the tiny model.
        inputs: ``"text"`` (input_ids, attention_mask), ``"seq2seq"`` (+ decoder_input_ids),
            ``"image"`` (pixel_values), ``"text_image"`` (both), ``"text_image_tokens"`` (both, the
            image at image tokens of the padded text), ``"audio"`` (input_features).
        outputs: the output fields compared; padded: whether their positions follow the padded
            input (compared at unpadded positions only).
    """

    name: str
    model_type: str
    auto: str
    config: dict[str, Any]
    sites: int = LAYERS
    inputs: str = "text"
    outputs: tuple[str, ...] = ("logits",)
    padded: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _decoder(name: str, model_type: str | None = None, sites: int = LAYERS, **config: Any) -> Spec:
    return Spec(name, model_type or name, "AutoModelForCausalLM", {**TEXT, **config}, sites)


def _encoder(name: str, model_type: str | None = None, **config: Any) -> Spec:
    return Spec(name, model_type or name, "AutoModel", {**TEXT_MHA, **config}, outputs=("last_hidden_state",))


SPECS: list[Spec] = [
    _decoder("llama"),
    _decoder("mistral"),
    _decoder("mixtral", num_local_experts=2, num_experts_per_tok=1),
    _decoder("qwen2"),
    _decoder("qwen3", head_dim=16),
    _decoder("qwen3_moe", head_dim=16, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32),
    _decoder("gemma", head_dim=16),
    _decoder("gemma2", head_dim=16, sliding_window=8),
    _decoder("gemma3_text", head_dim=16, sliding_window=8,
             layer_types=["sliding_attention", "full_attention"]),
    _decoder("phi3", pad_token_id=0),
    _decoder("phi", resid_pdrop=0.0),
    _decoder("olmo2"),
    _decoder("starcoder2"),
    _decoder("stablelm"),
    _decoder("cohere"),
    _decoder("granite"),
    _decoder("smollm3", pad_token_id=0),
    _decoder("falcon", new_decoder_architecture=True, num_kv_heads=2),
    _decoder("gpt_neox", num_attention_heads=4),
    Spec("gpt2", "gpt2", "AutoModelForCausalLM", {"vocab_size": VOCAB, "n_embd": 64, "n_layer": LAYERS,
         "n_head": 4, "n_positions": 64}),
    Spec("gptj", "gptj", "AutoModelForCausalLM", {"vocab_size": VOCAB, "n_embd": 64, "n_layer": LAYERS,
         "n_head": 4, "n_positions": 64, "rotary_dim": 8}),
    Spec("gpt_bigcode", "gpt_bigcode", "AutoModelForCausalLM", {"vocab_size": VOCAB, "n_embd": 64,
         "n_layer": LAYERS, "n_head": 4, "n_positions": 64}),
    Spec("bloom", "bloom", "AutoModelForCausalLM", {"vocab_size": VOCAB, "hidden_size": 64, "n_layer": LAYERS,
         "n_head": 4}),
    Spec("opt", "opt", "AutoModelForCausalLM", {"vocab_size": VOCAB, "hidden_size": 64, "ffn_dim": 64,
         "num_hidden_layers": LAYERS, "num_attention_heads": 4, "word_embed_proj_dim": 64,
         "max_position_embeddings": 64}),
    _encoder("bert"),
    _encoder("roberta", pad_token_id=1),
    _encoder("electra", embedding_size=64),
    _encoder("albert", embedding_size=64),
    _encoder("deberta_v2", model_type="deberta-v2"),
    _encoder("modernbert", global_attn_every_n_layers=2, local_attention=8, pad_token_id=0),
    Spec("distilbert", "distilbert", "AutoModel", {"vocab_size": VOCAB, "dim": 64, "hidden_dim": 64,
         "n_layers": LAYERS, "n_heads": 4, "max_position_embeddings": 64}, outputs=("last_hidden_state",)),
    Spec("t5", "t5", "AutoModelForSeq2SeqLM", {"vocab_size": VOCAB, "d_model": 64, "d_kv": 16, "d_ff": 64,
         "num_layers": LAYERS, "num_heads": 4}, sites=3 * LAYERS, inputs="seq2seq", padded=False),
    Spec("bart", "bart", "AutoModelForSeq2SeqLM", {"vocab_size": VOCAB, "d_model": 64,
         "encoder_layers": LAYERS, "decoder_layers": LAYERS, "encoder_attention_heads": 4,
         "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
         "max_position_embeddings": 64}, sites=3 * LAYERS, inputs="seq2seq", padded=False),
    Spec("whisper", "whisper", "AutoModelForSpeechSeq2Seq", {"vocab_size": VOCAB, "d_model": 64,
         "encoder_layers": LAYERS, "decoder_layers": LAYERS, "encoder_attention_heads": 4,
         "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_mel_bins": 8,
         "max_source_positions": 8, "max_target_positions": 32, "pad_token_id": 0, "bos_token_id": 1,
         "eos_token_id": 2, "decoder_start_token_id": 1}, sites=3 * LAYERS, inputs="audio",
         padded=False),
    Spec("vit", "vit", "AutoModel", VISION, inputs="image", outputs=("last_hidden_state",), padded=False),
    Spec("dinov2", "dinov2", "AutoModel", {**VISION, "mlp_ratio": 1}, inputs="image",
         outputs=("last_hidden_state",), padded=False),
    Spec("clip", "clip", "AutoModel", {"text_config": {**TEXT_MHA}, "vision_config": VISION,
         "projection_dim": 32}, sites=2 * LAYERS, inputs="text_image",
         outputs=("text_embeds", "image_embeds"), padded=False),
    Spec("siglip", "siglip", "AutoModel", {"text_config": {**TEXT_MHA}, "vision_config": VISION},
         sites=2 * LAYERS, inputs="text_image", outputs=("text_embeds", "image_embeds"), padded=False),
    Spec("llava", "llava", "AutoModelForImageTextToText", {"text_config": {"model_type": "llama", **TEXT},
         "vision_config": {"model_type": "clip_vision_model", **VISION, "image_size": 16},
         "image_token_index": IMAGE_TOKEN, "vision_feature_layer": -1, "image_seq_length": 4},
         sites=2 * LAYERS, inputs="text_image_tokens"),
]  # fmt: skip


def _inputs(spec: Spec, config: Any) -> dict[str, Any]:
    """The model inputs of ``spec`` (seeded): padded text, images or audio features."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, :PAD] = 0
    if spec.inputs == "text":
        return {"input_ids": ids, "attention_mask": mask}
    if spec.inputs == "seq2seq":
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :DECODER_SEQ]}
    if spec.inputs == "audio":
        frames = 2 * config.max_source_positions  # Whisper's conv stride 2
        features = torch.randn(BATCH, config.num_mel_bins, frames, generator=gen)
        return {"input_features": features, "decoder_input_ids": ids[:, :DECODER_SEQ]}
    vision = getattr(config, "vision_config", config)
    pixels = torch.randn(BATCH, 3, vision.image_size, vision.image_size, generator=gen)
    if spec.inputs == "image":
        return {"pixel_values": pixels}
    if spec.inputs == "text_image_tokens":
        ids[:, 5:9] = IMAGE_TOKEN
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    return {"input_ids": ids, "pixel_values": pixels}  # text_image, unpadded: CLIP pools at the last token


def _build(spec: Spec, attn_implementation: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    config = AutoConfig.for_model(spec.model_type, **spec.config)
    torch.manual_seed(0)
    auto = getattr(transformers, spec.auto)
    model = auto.from_config(config, attn_implementation=attn_implementation).eval()
    return model, _inputs(spec, config)


def _implementations(spec: Spec) -> list[str]:
    """``sdpa`` (where the model class supports it) and ``eager``."""
    config = AutoConfig.for_model(spec.model_type, **spec.config)
    auto = getattr(transformers, spec.auto)
    model_class = auto._model_mapping[type(config)]
    return (["sdpa"] if model_class._supports_sdpa else []) + ["eager"]


def _max_rel_error(spec: Spec, output: Any, reference: Any, attention_mask: torch.Tensor | None) -> float:
    """Largest ||out - ref|| / ||ref|| over the compared fields (unpadded positions only); NaN: inf."""
    errors = []
    for name in spec.outputs:
        out, ref = output[name].float(), reference[name].float()
        if spec.padded and attention_mask is not None:
            keep = attention_mask.bool()
            out, ref = out[keep], ref[keep]
        if torch.isnan(out).any() or torch.isnan(ref).any():
            errors.append(float("inf"))
        else:
            errors.append(((out - ref).norm() / ref.norm().clamp_min(1e-12)).item())
    return max(errors)


def run_case(spec: Spec, attn_implementation: str) -> dict[str, Any]:
    """One row: sites found / rewritten, error against the uncompiled model, untouched reasons."""
    row: dict[str, Any] = {"model": spec.name, "attn": attn_implementation, "attention": spec.sites}
    start = time.perf_counter()
    try:
        model, kwargs = _build(spec, attn_implementation)
    except Exception as error:  # a model this transformers version cannot build: a row, not a crash
        return {**row, "status": f"build failed: {type(error).__name__}: {_first_line(error)}"}
    try:
        torch._dynamo.reset()
        with torch.no_grad():
            report = explain(model, config=DENSE, measure=False, **kwargs)
            reference = model(**kwargs)
            torch._dynamo.reset()
            sparse = explain(model, config=SPARSE, measure=False, **kwargs)
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        return {**row, "status": f"run failed: {type(error).__name__}: {_first_line(error)}"}
    untouched = Counter(site.reason for site in report.sites if site.decision == "untouched")
    found = len(report.sites)
    rewritten = found - untouched.total()
    error = _max_rel_error(spec, report.output, reference, kwargs.get("attention_mask"))
    sparse_error = _max_rel_error(spec, sparse.output, reference, kwargs.get("attention_mask"))
    worst = max(error, sparse_error)
    ok = rewritten == spec.sites and worst <= REL_TOL
    row.update(
        sites_found=found,
        rewritten=rewritten,
        max_rel_error=error,
        sparse_sites=sum(site.decision == "sparse" for site in sparse.sites),
        sparse_rel_error=sparse_error,
        status="ok" if ok else ("WRONG" if worst > REL_TOL else "partial"),
        untouched="; ".join(f"{n}x {reason}" for reason, n in untouched.items()),
        seconds=round(time.perf_counter() - start, 1),
    )
    return row


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:160]


FIELDS = [
    "model", "attn", "attention", "sites_found", "rewritten", "max_rel_error", "sparse_sites",
    "sparse_rel_error", "status", "untouched",
]  # fmt: skip


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*FIELDS, "seconds"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| model | attn | attention | found | rewritten | max rel. error | sparse sites | sparse rel. error"
        " | status | untouched: reason |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        error, sparse_error = (
            f"{r[key]:.1e}" if key in r else "-" for key in ("max_rel_error", "sparse_rel_error")
        )
        cells = [r["model"], r["attn"], str(r["attention"]), str(r.get("sites_found", "-")),
                 str(r.get("rewritten", "-")), error, str(r.get("sparse_sites", "-")), sparse_error,
                 r["status"], r.get("untouched", "")]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def write_docs(rows: list[dict[str, Any]], csv_path: Path, command: str, path: Path) -> None:
    counts = Counter(r["status"].split(":")[0] for r in rows)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    text = f"""# Model zoo: attention sites on tiny transformers models

Generated by `benchmarks/model_zoo.py` (issue 19); do not edit by hand. Each row is one architecture
and attention implementation (`sdpa` where the model class supports it, and `eager`), built from
a tiny config (random weights, fp32, {LAYERS} layers, hidden 64, 4 heads; GQA with 2 KV heads where the
config has it), run on a batch of {BATCH} sequences of {SEQ} tokens (the first left-padded by {PAD}; seq2seq
decoders {DECODER_SEQ} tokens) compiled with `backend="omnisparse"` in `mode="dense"` (`omnicompile.explain`)
and uncompiled.

- **attention**: the attention computations of the tiny model (layers x attention blocks per layer);
  **found**: the sites the passes recognised; **rewritten**: those that became the op.
- **max rel. error**: the largest ||compiled - uncompiled|| / ||uncompiled|| over the compared
  outputs (logits, last hidden state, or the embeddings), at unpadded positions; the tests'
  tolerance is {REL_TOL:g} (`tests/helpers.py` `REL_TOL[torch.float32]`).
- **sparse sites** / **sparse rel. error**: the same inputs compiled with
  `OmniSparseConfig(block_size=16, min_seq_len=16, dense_fallback_density=1.0)`: the sites whose
  last call ran the sparse path (a site whose query is shorter than a block, e.g. a 7-token decoder
  or a 5-patch image, runs dense with its reason), and the error of that run against the uncompiled
  model (on 16 tokens a site has one block, so the sparse path computes it all: the column shows
  that the sparse pipeline takes every site's shapes, masks and GQA, not its sparsity).
- **status**: `ok` (every computation rewritten, both errors within tolerance), `partial` (some left
  untouched, with the reason), `WRONG` (error above tolerance), or why it did not build or run.

Command: `{command}`
Date: {datetime.date.today().isoformat()}; torch {torch.__version__}, transformers {transformers.__version__},
Python {platform.python_version()}, {platform.machine()} CPU ({platform.system()});
data: `{csv_path.relative_to(ROOT)}`.
Summary: {summary}.

{markdown_table(rows)}
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names to run (default: all)")
    parser.add_argument("--csv", type=Path, default=ROOT / "docs/results/model_zoo.csv")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/MODELS.md")
    parser.add_argument("--no-docs", action="store_true", help="write the CSV only")
    args = parser.parse_args(argv)
    specs = [s for s in SPECS if not args.only or s.name in args.only]
    rows = []
    for spec in specs:
        try:
            implementations = _implementations(spec)
        except Exception as error:
            status = f"build failed: {type(error).__name__}: {_first_line(error)}"
            rows.append({"model": spec.name, "attn": "-", "attention": spec.sites, "status": status})
            print(rows[-1], flush=True)
            continue
        for attn_implementation in implementations:
            rows.append(run_case(spec, attn_implementation))
            print({k: rows[-1].get(k) for k in [*FIELDS, "seconds"]}, flush=True)
    write_csv(rows, args.csv)
    if not args.no_docs:
        command = "python benchmarks/model_zoo.py" + (f" --only {' '.join(args.only)}" if args.only else "")
        write_docs(rows, args.csv, command, args.docs)


if __name__ == "__main__":
    main()
