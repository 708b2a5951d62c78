"""Load test of `omnicompile serve` (transformers' server), dense (sdpa) vs omnisparse, over loopback.

Starts the server twice on the same model, ``--attn-implementation sdpa`` then ``omnisparse`` with
``--config``; each time sends one untimed warm-up request, then ``--requests`` passkey prompts
(`omnicompile.evaluate`'s needle and question in Python's help text, each its own key and depth, lengths
cycling through ``--lengths``; the server's count of prompt tokens is reported) with ``--concurrency``
in flight, greedy, ``--max-tokens`` new tokens, streamed. Per request: time to first token (from sending
to the first chunk of the answer, queueing in the server included: it generates one request at a time,
docs/SERVING.md), latency, the answer. Per server: failed requests, TTFT median / mean / max, wall time,
prompt and generated tokens per second.

Each omnisparse answer is checked against the dense answer to the same prompt: it matches when their
first ``--match-tokens`` tokens (re-tokenised, default all) are equal; the passkey found in each is
reported too. Exit status 1 when a request failed, an answer did not match or the time ran out.

Hard bound: everything stops after ``--time-limit`` seconds (servers stopped with their model
processes; unfinished requests count as failed). Writes ``serve_load.csv`` (a row per request and
server) and ``serve_load.json`` (command, date, device, settings, summary, rows) to ``--out``, and prints
a markdown table. Run it with ``python -P`` (the repository root must not shadow installed packages).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import json
import os
import platform
import random
import signal
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from omnicompile.demos.models import served_model
from omnicompile.evaluate import NEEDLE, QUESTION, document_text
from omnicompile.server_process import Completion, Server, complete


def load_tokenizer(model: str):
    """The tokenizer the server uses for ``model`` (anything `omnicompile serve` takes)."""
    from transformers import AutoTokenizer

    served = served_model(model)
    if served.endswith(".gguf"):
        folder, _, gguf_file = served.rpartition(":")
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(served)


def passkey_prompts(tokenizer, lengths: list[int], count: int, seed: int) -> list[dict]:
    """``count`` prompts of about ``lengths[i % len(lengths)]`` tokens: Python's help text with the needle
    at an even spread of depths, then the question; each with its own 5-digit key."""
    body = tokenizer.encode(document_text(), add_special_tokens=False)
    extra = len(tokenizer.encode(NEEDLE.format(key=10000) + QUESTION, add_special_tokens=True))
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        length = lengths[index % len(lengths)]
        filler = length - extra
        if not 0 < filler <= len(body):
            raise ValueError(f"length {length}: the document holds {len(body) + extra} tokens")
        depth = 0.05 + 0.9 * (index / max(count - 1, 1))
        key, at = rng.randrange(10000, 100000), round(depth * filler)
        text = (
            tokenizer.decode(body[:at])
            + NEEDLE.format(key=key)
            + tokenizer.decode(body[at:filler])
            + QUESTION
        )
        prompts.append(
            {"index": index, "length": length, "depth": round(depth, 3), "key": key, "prompt": text}
        )
    return prompts


def run_server(
    name: str, server_args: list[str], args: argparse.Namespace, prompts: list[dict], deadline: float
) -> tuple[list[Completion], float, str]:
    """Start one server, warm it up, send every prompt; (completions, wall seconds, log path)."""
    log = args.out / f"server_{name}.log"
    with Server(args.model, server_args, log, start_timeout=max(1.0, deadline - time.monotonic())) as server:
        warm = complete(server.port, prompts[0]["prompt"], args.max_tokens, deadline - time.monotonic())
        if warm.error:
            raise RuntimeError(f"{name}: the warm-up request failed: {warm.error}\n{server.log_tail()}")
        pool = concurrent.futures.ThreadPoolExecutor(args.concurrency)
        start = time.perf_counter()
        futures = [
            pool.submit(complete, server.port, p["prompt"], args.max_tokens, deadline - time.monotonic())
            for p in prompts
        ]
        concurrent.futures.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        wall = time.perf_counter() - start
    # the server has stopped: requests still open ended with a connection error
    pool.shutdown(wait=True)
    results = [f.result() for f in futures]
    for result in results:
        if result.error is None and result.latency is None:
            result.error = "unfinished at the time limit"
    return results, wall, str(log)


def _tokens(tokenizer, text: str, count: int | None) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids if count is None else ids[:count]


def summarize(results: list[Completion], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "wall_s": wall,
        "ttft_median_s": statistics.median(ttft) if ttft else None,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "ttft_max_s": max(ttft) if ttft else None,
        "latency_median_s": statistics.median([r.latency for r in ok]) if ok else None,
        "prompt_tokens_per_s": sum(r.prompt_tokens for r in ok) / wall,
        "generated_tokens_per_s": sum(r.completion_tokens for r in ok) / wall,
    }


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    dense, sparse = report["summary"]["dense"], report["summary"]["omnisparse"]
    lines = [
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; device: {report['device']}; model: {report['settings']['model']}",
        "",
        "| server | requests | failed | TTFT median s | TTFT mean s | TTFT max s | wall s | prompt tok/s "
        "| gen tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in (("dense (sdpa)", dense), ("omnisparse", sparse)):
        cells = [name, str(s["requests"]), str(s["failed"])]
        cells += [_fmt(s[key]) for key in ("ttft_median_s", "ttft_mean_s", "ttft_max_s")]
        cells += [
            _fmt(s["wall_s"], 1),
            _fmt(s["prompt_tokens_per_s"], 1),
            _fmt(s["generated_tokens_per_s"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    c = report["summary"]["comparison"]
    lines += [
        "",
        f"Answers matching dense (first {c['match_tokens'] or 'all'} tokens): "
        f"{c['matching']} / {c['compared']}; "
        f"exactly equal: {c['equal']}; passkey found dense / omnisparse: {c['passkey_dense']} / "
        f"{c['passkey_omnisparse']}; TTFT median speedup: {_fmt(c['ttft_median_speedup'], 2)}x",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="what `omnicompile serve` takes (folder, name, ...)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32000], help="prompt lengths in tokens")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--match-tokens", type=int, default=None, help="tokens that must equal dense's")
    parser.add_argument("--config", default="{}", help="OmniSparseConfig fields as JSON")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--time-limit", type=float, default=1200.0, help="seconds for everything")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("serve_load"))
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(args.model)
    prompts = passkey_prompts(tokenizer, args.lengths, args.requests, args.seed)
    common = ["--device", args.device, "--dtype", args.dtype, "--log-level", "warning"]
    servers = {
        "dense": ["--attn-implementation", "sdpa", *common],
        "omnisparse": ["--attn-implementation", "omnisparse", "--config", args.config, *common],
    }
    runs = {
        name: run_server(name, server_args, args, prompts, deadline) for name, server_args in servers.items()
    }

    rows, matching, equal, found = [], 0, 0, {"dense": 0, "omnisparse": 0}
    for p, dense, sparse in zip(prompts, runs["dense"][0], runs["omnisparse"][0]):
        same = dense.error is None and sparse.error is None
        match = same and _tokens(tokenizer, dense.text, args.match_tokens) == _tokens(
            tokenizer, sparse.text, args.match_tokens
        )
        matching += match
        equal += same and dense.text == sparse.text
        for name, result in (("dense", dense), ("omnisparse", sparse)):
            hit = str(p["key"]) in result.text
            found[name] += hit
            row = {k: v for k, v in p.items() if k != "prompt"}
            rows.append(
                {**row, "server": name, **asdict(result), "passkey_found": hit, "matches_dense": match}
            )
    summary = {name: summarize(results, wall) for name, (results, wall, _) in runs.items()}
    dense_ttft, sparse_ttft = summary["dense"]["ttft_median_s"], summary["omnisparse"]["ttft_median_s"]
    summary["comparison"] = {
        "match_tokens": args.match_tokens,
        "compared": len(prompts),
        "matching": matching,
        "equal": equal,
        "passkey_dense": found["dense"],
        "passkey_omnisparse": found["omnisparse"],
        "ttft_median_speedup": dense_ttft / sparse_ttft if dense_ttft and sparse_ttft else None,
    }
    report = {
        "command": " ".join(["python -P", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "server_logs": {name: log for name, (_, _, log) in runs.items()},
        "summary": summary,
        "rows": rows,
    }
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=1))
    with (args.out / "serve_load.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(report))
    print(f"wrote {args.out / 'serve_load.csv'} and {args.out / 'serve_load.json'}")
    failed = summary["dense"]["failed"] + summary["omnisparse"]["failed"]
    return 0 if failed == 0 and matching == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
