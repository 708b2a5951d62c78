"""`omnicompile serve`: transformers' server (``transformers serve``) with attn_implementation="omnisparse".

``transformers serve`` cannot be told about a custom attention from its command line: its loader accepts
only ``eager``, ``sdpa``, ``flash_attention_2/3``, ``flex_attention`` or a hub kernel
(``ModelLoader._validate_args``), and it loads the model in a process of its own (``spawn``), where nothing
the parent imported is registered. `serve` runs the same server (`OmniSparseServe`: transformers' `Serve`)
with `OmniSparseModelLoader`, which also takes ``"omnisparse"``. The loader is pickled into the model's
process, so unpickling it imports this module there, which imports `omnicompile.hf_attention` (registering
``"omnisparse"``) before the model loads; it then sets the `OmniSparseConfig` on the loaded model.

The server generates with ``model.generate`` one request at a time (transformers' ``GenerateRunner``), not
with continuous batching, whose ``ContinuousBatchingManager.switch_to_cb_friendly_attn`` takes only
``paged|eager``, ``sdpa`` or a flash implementation (docs/SERVING.md says why that is more than a name).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers.cli.serve import Serve
from transformers.cli.serving.model_manager import ModelLoader
from transformers.utils import logging

from . import hf_attention
from .config import OmniSparseConfig

IMPLEMENTATIONS = (hf_attention.ATTN_IMPLEMENTATION, "sdpa", "eager")
logger = logging.get_logger("transformers.cli.serving.omnisparse")  # at serve's own log level


class OmniSparseModelLoader(ModelLoader):
    """transformers' server loader that also takes ``attn_implementation="omnisparse"`` with ``config``."""

    def __init__(self, *, config: OmniSparseConfig, attn_implementation: str, **kwargs) -> None:
        if attn_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation {attn_implementation!r}: one of {IMPLEMENTATIONS}")
        self.omnisparse_config = config
        # transformers' check knows only its own names: it validates the other settings with sdpa
        super().__init__(attn_implementation="sdpa", **kwargs)
        self.attn_implementation = attn_implementation

    def load_model_and_processor(self, model_id: str, on_progress: Callable | None = None):
        """transformers' loading (in the model's process), then the op's config on an omnisparse model."""
        model, processor = super().load_model_and_processor(model_id, on_progress)
        attention = model.config._attn_implementation
        if attention == hf_attention.ATTN_IMPLEMENTATION:
            hf_attention.set_config(model, self.omnisparse_config)
            attention += f" {self.omnisparse_config.to_json()}"
        logger.info(f"{model_id} loaded with attention {attention}")
        return model, processor


class OmniSparseServe(Serve):
    """transformers' `Serve` (which runs the server from its constructor) with `OmniSparseModelLoader`.

    ``serve_options`` are `Serve`'s own (host, port, dtype, max_model_len, log_level, ...), except
    continuous batching, which cannot take the op (module docstring).
    """

    def __init__(
        self, model: str, *, attn_implementation: str, config: OmniSparseConfig, **serve_options
    ) -> None:
        if serve_options.get("continuous_batching"):
            raise ValueError("continuous batching takes only paged|eager, sdpa or flash attention")
        self._loader_options = dict(
            config=config,
            attn_implementation=attn_implementation,
            device=serve_options.get("device", "auto"),
            dtype=serve_options.get("dtype", "auto"),
            trust_remote_code=serve_options.get("trust_remote_code", False),
            quantization=serve_options.get("quantization"),
        )
        super().__init__(model, **serve_options)

    def run(self, *args, **kwargs) -> None:
        """`Serve.run` with the loader replaced (``Serve.__init__`` built its own, then calls this)."""
        self.loader = OmniSparseModelLoader(**self._loader_options)
        super().run(*args, **kwargs)


def model_id(model: str) -> str:
    """``model`` as the server takes it: a local checkpoint folder or ``folder:file.gguf``."""
    folder = model.rpartition(":")[0] if model.endswith(".gguf") else model
    if not Path(folder).is_dir():
        raise ValueError(f"model {model!r}: not a local folder or folder:file.gguf")
    return model


def serve(model: str, attn_implementation: str, config: OmniSparseConfig, **serve_options) -> None:
    """Serve ``model`` (`model_id`) on transformers' OpenAI-compatible API until stopped (Ctrl+C, SIGTERM)."""
    OmniSparseServe(model_id(model), attn_implementation=attn_implementation, config=config, **serve_options)
