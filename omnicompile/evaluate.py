"""`omnicompile eval`: accuracy of OmniSparse attention on a pretrained model, dense vs sparse.

Documents are natural-language text that ships with Python itself (the help topics of
``pydoc_data.topics``, present on every CPython 3), tokenised to N tokens. Dense is the model with
eager SDPA; sparse is the same model whose attention calls ``torch.ops.omnisparse.attention`` (the
backend's op, with its dense fallbacks and recorders) for one config, through a transformers
attention function. Metrics per (length, budget scope, tau):

- perplexity ratio (sparse / dense), top-1 agreement and mean KL(dense || sparse) of the next-token
  distributions over the document's positions (logits in chunks of positions: no [S, vocab] beyond a chunk);
- a passkey grid: for each depth, a needle "The pass key is NNNNN. Remember it." in document text,
  the question at the end; found = greedy decoding reproduces the key (checked teacher-forced: the
  argmax at every key token is that token, equivalent for greedy decoding), and the key's log-prob;
- per layer: what ran (sparse/dense), density, exact recall (mean and worst query block), lazy
  fraction, output error (`omnicompile.recording`, `omnicompile.metrics`: chunked exact passes).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import platform
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import ops  # noqa: F401  (registers torch.ops.omnisparse.attention)
from .config import OmniSparseConfig
from .kernels.triton_utils import MAX_HEAD_DIM
from .recording import recording

_ATTN_NAME = "omnisparse_eval"
NEEDLE = " The pass key is {key}. Remember it. "
QUESTION = " What is the pass key? The pass key is"
LAYER_STATS = ("density", "recall_mean", "recall_min", "lazy_fraction", "rel_error")
# The base of every sparse config: the method on every attention the eval reaches, also where the
# backend's defaults run dense for speed (keys under 32768, head dims above 128: METHOD.md).
STUDY_BASE: dict[str, Any] = {"min_seq_len": 1024, "max_head_dim": MAX_HEAD_DIM}


@dataclass
class EvalSettings:
    """What `evaluate` measures.

    Attributes:
        lengths: document lengths in tokens.
        scopes, taus: the sparse configs, every (scope, tau) pair over ``base_config``.
        depths: passkey depths per length (evenly spaced in [0.05, 0.95]; 0 = no passkeys).
        base_config: OmniSparseConfig fields shared by every sparse config.
        logit_chunk: positions whose logits are held at once.
        seed: seed of the passkeys.
    """

    lengths: tuple[int, ...] = (2048,)
    scopes: tuple[str, ...] = ("heads",)
    taus: tuple[float, ...] = (0.95,)
    depths: int = 10
    base_config: dict[str, Any] = field(default_factory=lambda: dict(STUDY_BASE))
    logit_chunk: int = 1024
    seed: int = 0

    def configs(self) -> list[OmniSparseConfig]:
        """The sparse configs, scope-major."""
        return [
            OmniSparseConfig.from_dict({**self.base_config, "budget_scope": scope, "tau": tau})
            for scope in self.scopes
            for tau in self.taus
        ]


def document_text() -> str:
    """About 465K characters of English prose: the help topics of ``pydoc_data.topics``, by topic name."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for Gemma, none for SmolLM2)."""
    return list(tokenizer.encode("", add_special_tokens=True))


@functools.lru_cache(maxsize=4)
def _document_ids(tokenizer: Any) -> tuple[int, ...]:
    return tuple(_encode(tokenizer, document_text()))


def document_ids(tokenizer: Any, length: int) -> torch.Tensor:
    """int64 [1, length]: the tokenizer's prefix tokens and the first tokens of `document_text`."""
    prefix, body = _prefix(tokenizer), _document_ids(tokenizer)
    if length > len(prefix) + len(body):
        raise ValueError(f"length {length} exceeds the {len(prefix) + len(body)} tokens of the document")
    return torch.tensor([prefix + list(body[: length - len(prefix)])])


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [1, length], answer int64 [A]): prompt + answer tokens, the needle at ``depth`` of the text.

    ``ids`` is prefix, document text with the needle inserted, the question, then the answer (the key's
    tokens, teacher-forced): its last A tokens are ``answer``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    prefix, body = _prefix(tokenizer), _document_ids(tokenizer)
    needle, question = _encode(tokenizer, NEEDLE.format(key=key)), _encode(tokenizer, QUESTION)
    answer = _encode(tokenizer, f" {key}")
    filler = length - len(prefix) - len(needle) - len(question) - len(answer)
    if filler < 1 or filler > len(body):
        raise ValueError(f"length {length} cannot hold a passkey prompt (filler {filler} tokens)")
    at = round(depth * filler)
    ids = prefix + list(body[:at]) + needle + list(body[at:filler]) + question + answer
    return torch.tensor([ids]), torch.tensor(answer)


def _eval_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    config_json: str,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function that runs the backend's op: q [B, H, S, D] -> out [B, S, H, D].

    A sliding-window layer's prefill (``sliding_window`` set, as Gemma 3 passes it) runs as the op's
    ``window`` with no mask: the evaluation's inputs are single unpadded sequences, so its mask is
    exactly the causal window."""
    if kwargs.get("softcap") is not None:
        raise ValueError("omnicompile eval: attention logit softcapping is not supported by the op")
    window = kwargs.get("sliding_window")
    if window is not None and query.shape[2] == key.shape[2] > 1:
        attention_mask = None
    else:
        window = None
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[2]]
    is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out, _ = torch.ops.omnisparse.attention(
        query,
        key,
        value,
        attention_mask,
        0.0,
        is_causal,
        scaling,
        key.shape[1] != query.shape[1],
        config_json,
        f"layer{getattr(module, 'layer_idx', '?')}",
        window,
        need_lse=False,
    )
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def sparse_attention(model: torch.nn.Module, config: OmniSparseConfig) -> Iterator[None]:
    """Inside, every attention of ``model`` (a transformers model) runs the op with ``config``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_ATTN_NAME, functools.partial(_eval_attention, config_json=config.to_json()))
    AttentionMaskInterface.register(_ATTN_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The final hidden states [S, hidden] of ids [1, S] (the logits are formed in chunks from them)."""
    return model.model(input_ids=ids, use_cache=False).last_hidden_state[0]


def _log_probs(model: torch.nn.Module, hidden: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    """Next-token log-probabilities, float32 [n, vocab] chunks over the positions of hidden [S, hidden]."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    for start in range(0, hidden.shape[0], chunk):
        logits = model.lm_head(hidden[start : start + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        yield torch.log_softmax(logits, dim=-1)


def _targets_log_probs(
    model: torch.nn.Module, ids: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each next token float32 [S-1], argmax int64 [S-1]) for ids [1, S]."""
    lp, top = [], []
    for start, chunk_lp in zip(range(0, ids.shape[1], chunk), _log_probs(model, _hidden(model, ids), chunk)):
        targets = ids[0, start + 1 : start + 1 + chunk_lp.shape[0]]
        chunk_lp = chunk_lp[: targets.shape[0]]
        lp.append(chunk_lp.gather(-1, targets[:, None])[:, 0])
        top.append(chunk_lp.argmax(-1))
    return torch.cat(lp), torch.cat(top)


def compare_logits(
    model: torch.nn.Module, ids: torch.Tensor, config: OmniSparseConfig, chunk: int
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Dense vs sparse on ids [1, S]: (metrics, per-layer records of the sparse run).

    Metrics: ``ppl_dense``, ``ppl_sparse``, ``ppl_ratio``, ``top1`` (argmax agreement), ``kl``
    (mean over positions of KL(dense || sparse), nats). Holds two [S, hidden] states and two
    [chunk, vocab] log-prob chunks at a time.
    """
    nll = {"dense": 0.0, "sparse": 0.0}
    agree, kl, count = 0, 0.0, ids.shape[1] - 1
    dense_hidden = _hidden(model, ids)
    with sparse_attention(model, config), recording(measure=True) as recorder:
        sparse_hidden = _hidden(model, ids)
    chunks = zip(_log_probs(model, dense_hidden, chunk), _log_probs(model, sparse_hidden, chunk))
    for index, (d, s) in enumerate(chunks):
        first = index * chunk
        targets = ids[0, first + 1 : first + 1 + d.shape[0]]
        d, s = d[: targets.shape[0]], s[: targets.shape[0]]
        nll["dense"] -= d.gather(-1, targets[:, None]).sum().item()
        nll["sparse"] -= s.gather(-1, targets[:, None]).sum().item()
        agree += (d.argmax(-1) == s.argmax(-1)).sum().item()
        kl += (d.exp() * (d - s)).sum().item()
    ppl_dense, ppl_sparse = math.exp(nll["dense"] / count), math.exp(nll["sparse"] / count)
    metrics = {
        "ppl_dense": ppl_dense,
        "ppl_sparse": ppl_sparse,
        "ppl_ratio": ppl_sparse / ppl_dense,
        "top1": agree / count,
        "kl": kl / count,
    }
    layers = [
        {
            "site": run.site,
            "decision": run.decision,
            "reason": run.reason,
            **{key: run.stats[key] for key in LAYER_STATS if key in run.stats},
        }
        for run in recorder.runs
    ]
    return metrics, layers


def passkey(model: torch.nn.Module, ids: torch.Tensor, answer: torch.Tensor, chunk: int) -> dict[str, Any]:
    """``found`` (greedy decoding reproduces the answer) and ``logprob`` (of the answer tokens)."""
    lp, top = _targets_log_probs(model, ids, chunk)
    n = answer.shape[0]
    return {"found": bool((top[-n:] == answer).all()), "logprob": lp[-n:].sum().item()}


def passkey_depths(count: int) -> list[float]:
    """``count`` depths evenly spaced in [0.05, 0.95] (one: 0.5)."""
    if count <= 1:
        return [0.5] * count
    return [round(0.05 + 0.9 * i / (count - 1), 3) for i in range(count)]


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="omnicompile eval", unit="run")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, tokenizer: Any, settings: EvalSettings, progress: bool = True
) -> dict[str, Any]:
    """Run every measurement of ``settings`` on ``model`` (a transformers causal LM); JSON-ready dict.

    ``runs``: one entry per length with ``passkeys_dense`` and ``configs`` (per sparse config: its
    fields, the `compare_logits` metrics, ``layers``, layer means and ``passkeys``).
    """
    device = next(model.parameters()).device
    configs = settings.configs()
    depths = passkey_depths(settings.depths)
    keys = torch.randint(
        10000,
        100000,
        (len(settings.lengths), len(depths)),
        generator=torch.Generator().manual_seed(settings.seed),
    )
    runs = []
    with _progress(len(settings.lengths) * (len(configs) * (1 + len(depths)) + len(depths)), progress) as bar:
        for li, length in enumerate(settings.lengths):
            prompts = [passkey_prompt(tokenizer, length, d, int(keys[li, di])) for di, d in enumerate(depths)]
            prompts = [(ids.to(device), answer.to(device)) for ids, answer in prompts]
            dense_keys = []
            for depth, (ids, answer) in zip(depths, prompts):
                dense_keys.append({"depth": depth, **passkey(model, ids, answer, settings.logit_chunk)})
                bar.update()
            doc = document_ids(tokenizer, length).to(device)
            entries = []
            for config in configs:
                metrics, layers = compare_logits(model, doc, config, settings.logit_chunk)
                bar.update()
                sparse_keys = []
                with sparse_attention(model, config):
                    for depth, (ids, answer) in zip(depths, prompts):
                        sparse_keys.append(
                            {"depth": depth, **passkey(model, ids, answer, settings.logit_chunk)}
                        )
                        bar.update()
                means = {f"{key}_layers": _mean(layers, key) for key in LAYER_STATS}
                entries.append(
                    {
                        "budget_scope": config.budget_scope,
                        "tau": config.tau,
                        "config": config.to_dict(),
                        **metrics,
                        **means,
                        "layers": layers,
                        "passkeys": sparse_keys,
                    }
                )
            runs.append({"length": length, "passkeys_dense": dense_keys, "configs": entries})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "dtype": str(next(model.parameters()).dtype),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _tf_version(),
        },
        "settings": asdict(settings),
        "runs": runs,
    }


def _mean(layers: Sequence[dict[str, Any]], key: str) -> float | None:
    """Mean of a layer statistic over the layers that measured it (sparse runs); None when none did."""
    values = [layer[key] for layer in layers if key in layer]
    return sum(values) / len(values) if values else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def markdown_table(results: dict[str, Any]) -> str:
    """A markdown table of ``evaluate``'s results: one row per (length, scope, tau)."""
    header = (
        "| length | scope | tau | ppl dense | ppl ratio | top-1 | KL | density | recall mean | recall min "
        "| passkeys dense / sparse | lost |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for run in results["runs"]:
        dense_found = [p["found"] for p in run["passkeys_dense"]]
        for entry in run["configs"]:
            sparse_found = [p["found"] for p in entry["passkeys"]]
            lost = sum(d and not s for d, s in zip(dense_found, sparse_found))
            recall_min = min(
                (layer["recall_min"] for layer in entry["layers"] if "recall_min" in layer), default=None
            )
            cells = [
                str(run["length"]),
                entry["budget_scope"],
                f"{entry['tau']:g}",
                f"{entry['ppl_dense']:.3f}",
                f"x{entry['ppl_ratio']:.4f}",
                f"{entry['top1']:.3f}",
                f"{entry['kl']:.4f}",
                _fmt(entry["density_layers"]),
                _fmt(entry["recall_mean_layers"]),
                _fmt(recall_min),
                f"{sum(dense_found)}/{len(dense_found)} / {sum(sparse_found)}/{len(sparse_found)}",
                str(lost),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def plot_layers(results: dict[str, Any], path: str | Path) -> Path:
    """PNG of density and mean exact recall per layer, one line per (length, scope, tau)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_density, ax_recall) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for run in results["runs"]:
        for entry in run["configs"]:
            label = f"{run['length']} {entry['budget_scope']} tau {entry['tau']:g}"
            layers = entry["layers"]
            xs = [i for i, layer in enumerate(layers) if "density" in layer]
            ax_density.plot(xs, [layers[i]["density"] for i in xs], marker="o", label=label)
            ax_recall.plot(xs, [layers[i]["recall_mean"] for i in xs], marker="o", label=label)
    ax_density.set_ylabel("density (computed / allowed blocks)")
    ax_recall.set_ylabel("exact recall (mean over query blocks)")
    ax_recall.set_xlabel("attention layer")
    ax_density.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
