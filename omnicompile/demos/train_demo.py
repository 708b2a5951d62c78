"""Training demonstration (METHOD.md section 5): a sparse fine-tune against training-free sparsity.

Task: multi-query associative recall over a long context, generated on the fly. The first three
quarters of a sequence hold ``pairs`` pair tokens, each standing for one (key, value) binding,
scattered among filler tokens; the last quarter asks for ``queries`` of the keys (fewer than the
pairs, so that picking a stored value not yet asked for is no shortcut), each query key token
followed by its value token, again among filler. The loss and the accuracy count only the value
after each query key: to get it the model must attend from the query key to one far token (the
pair token with that key), a needle in thousands of filler tokens. Attention is genuinely sparse,
and the block estimate, which averages each query key with the filler around it, can miss the
needle. (Binding key and value in one token makes recall one attention hop. The two-token layout,
key then value, needs an induction circuit over two layers; in trials here it did not form within
this demo's budget: 16000 steps on an H200 left the loss at the chance plateau.)

Steps: train a small Llama-architecture model (transformers ``LlamaConfig``) densely (eager SDPA;
a curriculum from short packed sequences to the full length); evaluate it dense and,
training-free, through ``torch.compile(model, backend="omnisparse")``; fine-tune briefly through
the backend in train mode (the sparse backward over exactly the selected blocks); evaluate again.
Each evaluation reports answer accuracy and, for sparse runs, per-layer density and exact recall
(`recording`). The op's CUDA density fallback is off here: every layer runs the sparse method, on
any device. Weights are saved with ``save_pretrained`` (safetensors) under ``--out``, with
``report.json``.

``--tiny`` is a CPU smoke setting (about a minute); the default setting targets one Hopper GPU
(on an H200: 23 s of dense training, about 3 minutes in all with compilation).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..config import OmniSparseConfig
from ..recording import recording


@dataclass(frozen=True)
class RecallTask:
    """The associative-recall data: vocabulary layout and sequence shape.

    Vocabulary: 0 = BOS, then ``fillers`` filler tokens, ``keys`` key tokens, ``values`` value
    tokens and ``keys * values`` pair tokens (pair (k, v) binds key k to value v).
    """

    seq_len: int
    pairs: int
    queries: int
    keys: int
    values: int
    fillers: int = 64

    @property
    def vocab_size(self) -> int:
        return 1 + self.fillers + self.keys + self.values + self.keys * self.values

    def __post_init__(self) -> None:
        if self.pairs > self.keys:
            raise ValueError(f"RecallTask: {self.pairs} pairs need distinct keys, only {self.keys}")
        if self.queries > self.pairs:
            raise ValueError(f"RecallTask: {self.queries} queries ask for more than the {self.pairs} pairs")
        if self.pairs > self._context_end - 1 or self.queries > (self.seq_len - self._context_end) // 2:
            raise ValueError(
                f"RecallTask: {self.pairs} pairs and {self.queries} queries do not fit in "
                f"{self.seq_len} tokens"
            )

    @property
    def _context_end(self) -> int:
        return (3 * self.seq_len) // 4

    def batch(
        self, size: int, gen: torch.Generator, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids int64 [size, seq_len] and labels int64 [size, seq_len] (-100 except query answers).

        Labels are unshifted (HF convention): labels[t] is the token at t, predicted from t - 1.
        """
        n, length, ctx_end = self.pairs, self.seq_len, self._context_end
        first_key = 1 + self.fillers
        first_value = first_key + self.keys
        first_pair = first_value + self.values
        ids = 1 + torch.randint(0, self.fillers, (size, length), generator=gen)
        ids[:, 0] = 0
        keys = self._distinct(size, self.keys, n, gen)
        values = torch.randint(0, self.values, (size, n), generator=gen)
        pair_pos = 1 + self._distinct(size, ctx_end - 1, n, gen)
        # Query slot s covers tokens ctx_end + 2s (the key) and ctx_end + 2s + 1 (its value).
        query_pos = ctx_end + 2 * self._distinct(size, (length - ctx_end) // 2, self.queries, gen)
        asked = self._distinct(size, n, self.queries, gen)  # which pairs are asked for
        answers = first_value + values.gather(1, asked)
        ids.scatter_(1, pair_pos, first_pair + keys * self.values + values)
        ids.scatter_(1, query_pos, first_key + keys.gather(1, asked))
        ids.scatter_(1, query_pos + 1, answers)
        labels = torch.full_like(ids, -100)
        labels.scatter_(1, query_pos + 1, answers)
        return ids.to(device), labels.to(device)

    @staticmethod
    def _distinct(size: int, available: int, count: int, gen: torch.Generator) -> torch.Tensor:
        """int64 [size, count]: distinct random numbers below ``available`` per row."""
        return torch.rand(size, available, generator=gen).argsort(-1)[:, :count]


SOLVED_ACCURACY = 0.99  # a dense phase ends early once its held-out accuracy reaches this


@dataclass(frozen=True)
class Phase:
    """A training phase: ``steps`` batches of ``batch_size`` sequences of one recall layout."""

    seq_len: int
    pairs: int
    queries: int
    steps: int
    batch_size: int

    def task(self, vocab_items: int) -> RecallTask:
        return RecallTask(self.seq_len, self.pairs, self.queries, vocab_items, vocab_items)


@dataclass(frozen=True)
class DemoSetting:
    """Model, curriculum and sparse settings of one run of the demonstration.

    Dense training runs ``dense_phases`` in order: first short sequences packed with pairs (recall
    is learnt there in a few hundred steps), then longer ones with filler; every phase but the
    last ends early once solved (``SOLVED_ACCURACY``). ``finetune`` is the sparse fine-tune, and its
    layout and batch size are also those of every evaluation. ``min_seq_len`` <= its length, so the
    backend runs sparse there. The defaults are the full run (`FULL`).
    """

    dense_phases: tuple[Phase, ...] = (
        Phase(32, 8, 4, 3000, 256),
        Phase(512, 16, 8, 1000, 64),
        Phase(4096, 32, 16, 600, 16),
    )
    finetune: Phase = Phase(4096, 32, 16, 300, 16)
    vocab_items: int = 32
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    eval_batches: int = 8
    lr: float = 1e-3
    finetune_lr: float = 3e-4
    block_size: int = 64
    granularity: int = 16
    min_seq_len: int = 4096


FULL = DemoSetting()
TINY = DemoSetting(
    dense_phases=(Phase(32, 8, 4, 30, 8), Phase(256, 8, 4, 10, 8)),
    finetune=Phase(256, 8, 4, 6, 8),
    hidden=64,
    heads=2,
    kv_heads=1,
    eval_batches=2,
    lr=3e-3,
    finetune_lr=1e-3,
    block_size=16,
    granularity=4,
    min_seq_len=256,
)


def build_model(setting: DemoSetting, vocab_size: int, seed: int) -> torch.nn.Module:
    """A small LlamaForCausalLM with SDPA attention (random weights, seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=setting.hidden,
        intermediate_size=2 * setting.hidden,
        num_hidden_layers=setting.layers,
        num_attention_heads=setting.heads,
        num_key_value_heads=setting.kv_heads,
        max_position_embeddings=max(setting.finetune.seq_len, 4096),
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype=torch.float32)


def load_model(
    path: Path | str, seq_len: int | None = None, trained_len: int = FULL.finetune.seq_len
) -> torch.nn.Module:
    """The demo's LlamaForCausalLM from ``path`` (float32, CPU), ready for prompts of ``seq_len`` tokens.

    The model is trained at ``trained_len`` tokens and does not generalise past that with its RoPE as
    trained (accuracy 0.33 at 16K, 0.13 at 32K). For longer ``seq_len`` its RoPE is scaled linearly by
    seq_len / trained_len (position interpolation, transformers' ``"linear"`` rope type): relative
    positions then stay within the trained range, and recall holds (1.000 at 16K and 32K on the CPU).
    """
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(path)
    if seq_len is not None and seq_len > trained_len:
        config.rope_parameters = {
            **config.rope_parameters,
            "rope_type": "linear",
            "factor": seq_len / trained_len,
        }
    return LlamaForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)


def sparse_config(setting: DemoSetting, tau: float) -> OmniSparseConfig:
    """The backend's config for this setting (default method fields, setting's block sizes)."""
    return OmniSparseConfig(
        tau=tau,
        block_size=setting.block_size,
        granularity=setting.granularity,
        min_seq_len=setting.min_seq_len,
    )


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train(
    model,
    task: RecallTask,
    steps: int,
    lr: float,
    batch_size: int,
    gen: torch.Generator,
    device: torch.device,
    log=print,
    solved: Callable[[], bool] | None = None,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay on fresh batches of ``task``; returns the losses.

    ``model`` may be the module or its ``torch.compile`` wrapper (parameters are shared). With
    ``solved``, it is asked at every logged step after the warm-up and training stops once it
    returns True.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    model.train()
    losses = []
    for step in range(steps):
        ids, labels = task.batch(batch_size, gen, device)
        with _autocast(device):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            log(f"  step {step:5d}/{steps}  loss {loss.item():.4f}")
            if solved is not None and step >= warmup:
                if solved():
                    log(f"  solved at step {step}")
                    break
                model.train()  # solved() evaluates in eval mode
    return losses


@torch.no_grad()
def evaluate(
    model, task: RecallTask, batches: int, batch_size: int, seed: int, device: torch.device, measure: bool
) -> dict:
    """Answer accuracy on fixed eval batches (seeded); with ``measure``, per-layer sparse statistics.

    Returns {"accuracy", "layers": [{"site", "decision", "density", "recall_mean", "recall_min"}]}:
    layers in the order the attention sites ran (one per layer), statistics averaged over batches.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    correct = total = 0
    per_site: dict[str, list] = {}
    for _ in range(batches):
        ids, labels = task.batch(batch_size, gen, device)
        with recording(measure=measure) as recorder, _autocast(device):
            logits = model(input_ids=ids).logits
        answer = labels[:, 1:] != -100
        predicted = logits[:, :-1].argmax(-1)
        correct += (predicted[answer] == labels[:, 1:][answer]).sum().item()
        total += answer.sum().item()
        for run in recorder.runs:
            per_site.setdefault(run.site, []).append(run)
    layers = []
    for site, runs in per_site.items():
        layer = {"site": site, "decision": runs[-1].decision}
        for key in ("density", "recall_mean", "recall_min"):
            values = [r.stats[key] for r in runs if key in r.stats]
            layer[key] = sum(values) / len(values) if values else float("nan")
        layers.append(layer)
    return {"accuracy": correct / max(total, 1), "layers": layers}


def _tail_mean(values: list[float]) -> float:
    """Mean of the last tenth (at least one) of ``values``; NaN when there are none."""
    tail = values[-max(1, len(values) // 10) :]
    return sum(tail) / len(tail) if tail else float("nan")


def _print_report(results: dict, log=print) -> None:
    log("\nevaluation                      accuracy  per-layer density / exact recall (mean, worst)")
    for name, result in results.items():
        layers = "  ".join(
            f"L{i}: {layer['density']:.3f} / {layer['recall_mean']:.3f}, {layer['recall_min']:.3f}"
            if layer["decision"] == "sparse"
            else f"L{i}: dense"
            for i, layer in enumerate(result["layers"])
        )
        log(f"{name:<31} {result['accuracy']:8.3f}  {layers}")


def run_demo(
    setting: DemoSetting,
    out: Path,
    device: torch.device,
    tau: float,
    seed: int,
    log=print,
    init: Path | None = None,
) -> dict:
    """Train dense, evaluate dense / training-free sparse, fine-tune sparse, evaluate; save and report.

    ``init``: start from these weights (a ``dense/`` folder of an earlier run) instead of random ones.
    """
    out.mkdir(parents=True, exist_ok=True)
    task = setting.finetune.task(setting.vocab_items)
    if init is None:
        model = build_model(setting, task.vocab_size, seed).to(device)
    else:
        model = load_model(init).to(device)
    gen = torch.Generator().manual_seed(seed)
    timings, losses, phase_accuracy = {}, {}, {}
    started = time.perf_counter()
    for i, phase in enumerate(setting.dense_phases):
        log(
            f"dense training: {phase.steps} steps of {phase.batch_size} x {phase.seq_len} tokens, "
            f"{phase.pairs} pairs, {phase.queries} queries"
        )
        name = f"dense_{i}_{phase.seq_len}"
        phase_task = phase.task(setting.vocab_items)

        def solved(task: RecallTask = phase_task, batch_size: int = phase.batch_size) -> bool:
            accuracy = evaluate(model, task, 2, batch_size, seed + 2, device, measure=False)["accuracy"]
            return accuracy >= SOLVED_ACCURACY

        last = i == len(setting.dense_phases) - 1
        losses[name] = train(
            model,
            phase_task,
            phase.steps,
            setting.lr,
            phase.batch_size,
            gen,
            device,
            log,
            None if last else solved,
        )
        phase_accuracy[name] = evaluate(
            model, phase_task, setting.eval_batches, phase.batch_size, seed + 1, device, measure=False
        )["accuracy"]
        log(f"  dense accuracy on this layout: {phase_accuracy[name]:.3f}")
    timings["dense_training_s"] = time.perf_counter() - started
    model.save_pretrained(out / "dense")

    batch_size = setting.finetune.batch_size
    evals = {
        "task": task,
        "batches": setting.eval_batches,
        "batch_size": batch_size,
        "seed": seed + 1,
        "device": device,
    }
    results = {"dense": evaluate(model, measure=False, **evals)}
    # The CUDA density fallback (a speed heuristic) would run dense layers that the CPU runs sparse:
    # off, so that every device evaluates and fine-tunes the method itself.
    options = sparse_config(setting, tau).replace(dense_fallback_density=1.0).to_dict()
    compiled = torch.compile(model, backend="omnisparse", options=options)
    started = time.perf_counter()
    results["sparse, training-free"] = evaluate(compiled, measure=True, **evals)
    timings["sparse_eval_s"] = time.perf_counter() - started

    log(f"sparse fine-tuning: {setting.finetune.steps} steps at {task.seq_len} tokens through the backend")
    started = time.perf_counter()
    losses["sparse_finetune"] = train(
        compiled, task, setting.finetune.steps, setting.finetune_lr, batch_size, gen, device, log
    )
    timings["sparse_finetune_s"] = time.perf_counter() - started
    model.save_pretrained(out / "sparse_finetuned")
    results["sparse, after sparse fine-tune"] = evaluate(compiled, measure=True, **evals)
    results["dense, after sparse fine-tune"] = evaluate(model, measure=False, **evals)

    _print_report(results, log)
    report = {
        "setting": asdict(setting),
        "task": asdict(task),
        "tau": tau,
        "config": options,
        "device": str(device),
        "timings_s": timings,
        "final_loss": {name: _tail_mean(v) for name, v in losses.items()},
        "phase_accuracy": phase_accuracy,
        "results": results,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log(f"\nwrote {out / 'report.json'} and weights under {out}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``omnicompile train-demo`` options."""
    parser.add_argument("--tiny", action="store_true", help="CPU smoke setting (about a minute)")
    parser.add_argument("--out", type=Path, default=Path("out/train_demo"), help="weights and report.json")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--tau", type=float, default=OmniSparseConfig.tau, help="recall target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every dense phase's steps")
    parser.add_argument("--finetune-steps", type=int, default=None, help="sparse fine-tune steps")
    parser.add_argument("--lr", type=float, default=None, help="dense learning rate")
    parser.add_argument("--finetune-lr", type=float, default=None, help="sparse fine-tune learning rate")
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="skip dense training: start from this folder (an earlier run's dense/)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="fine-tune and evaluation batch size")
    parser.add_argument("--eval-batches", type=int, default=None, help="batches per evaluation")


def run(args: argparse.Namespace) -> int:
    """Run the demonstration from parsed `add_arguments` options; 0 on completion."""
    setting = TINY if args.tiny else FULL
    phases = tuple(replace(p, steps=max(1, round(p.steps * args.steps_scale))) for p in setting.dense_phases)
    finetune = replace(
        setting.finetune,
        steps=args.finetune_steps or setting.finetune.steps,
        batch_size=args.batch_size or setting.finetune.batch_size,
    )
    setting = replace(
        setting,
        dense_phases=() if args.init else phases,
        finetune=finetune,
        lr=args.lr or setting.lr,
        finetune_lr=args.finetune_lr or setting.finetune_lr,
        eval_batches=args.eval_batches or setting.eval_batches,
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    run_demo(setting, args.out, device, args.tau, args.seed, init=args.init)
    return 0
