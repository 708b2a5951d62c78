"""Built-in small model configs (no downloads) and a loader for local transformers checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

BUILTIN_CONFIGS: dict[str, dict] = {
    "llama-tiny": dict(
        model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
    ),
    "llama-small": dict(
        model_type="llama", vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=131072,
    ),
    "qwen2-tiny": dict(
        model_type="qwen2", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
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
    """A causal LM in eval mode: a built-in config (random weights, seeded) or a local checkpoint.

    ``name`` is a key of `BUILTIN_CONFIGS` or a path to a folder holding a transformers checkpoint
    (config.json and weights); nothing is downloaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

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
        raise ValueError(
            f"unknown model {name!r}: use a built-in config ({', '.join(BUILTIN_CONFIGS)}) or a local checkpoint folder"
        )
    return model.to(device).eval()
