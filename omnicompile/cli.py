"""The ``omnicompile`` command line: a thin layer over the public API."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from .config import OmniSparseConfig


def _config_from_args(args: argparse.Namespace) -> OmniSparseConfig:
    values = json.loads(args.config) if args.config else {}
    if not isinstance(values, dict):
        raise SystemExit("--config must be a JSON object of OmniSparseConfig fields")
    return OmniSparseConfig.from_dict(values)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demos.demo import DemoSettings, run_demo

    settings = DemoSettings(
        model=args.model, seq_len=args.seq_len, structured_len=args.structured_len, tau=args.tau
    )
    if args.device:
        settings.device = args.device
    run_demo(settings)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .demos.models import build_model
    from .explain import explain
    from .recording import recording

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.model, attn_implementation=args.attn_implementation, device=device)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), device=device)
    config = _config_from_args(args)
    with torch.no_grad(), recording(measure=False, keep_run=args.layer if args.plot else None) as recorder:
        report = explain(model, ids, config=config)
    print(report)
    if args.plot:
        from .demos.plotting import plot_selection

        if args.layer >= len(recorder.runs):
            raise SystemExit(f"--layer {args.layer}: the model ran {len(recorder.runs)} attention sites")
        print(f"wrote {plot_selection(recorder.runs[args.layer], config, args.heads, args.plot)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .demos.models import build_model
    from .export import export

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(args.model, dtype=dtype, device=device)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), device=device)
    dynamic = None if args.static else {"input_ids": {1: "seq"}}
    with torch.no_grad():
        path = export(
            model,
            {"input_ids": ids, "use_cache": False},
            args.out,
            _config_from_args(args),
            dynamic,
            args.target,
            inline=not args.python_op,
        )
    print(f"wrote {path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demos.models import load_pretrained
    from .evaluate import STUDY_BASE, EvalSettings, evaluate, markdown_table, plot_layers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = {**STUDY_BASE, **(json.loads(args.config) if args.config else {})}
    settings = EvalSettings(
        lengths=tuple(args.lengths),
        scopes=tuple(args.scopes),
        taus=tuple(args.taus),
        depths=args.depths,
        base_config=base,
        logit_chunk=args.logit_chunk,
    )
    settings.configs()  # validate the configs before loading the model
    model, tokenizer = load_pretrained(
        args.model,
        dtype=getattr(torch, args.dtype),
        device=device,
        max_position_embeddings=args.max_position_embeddings,
        rope_scaling=json.loads(args.rope_scaling) if args.rope_scaling else None,
    )
    results = evaluate(model, tokenizer, settings)
    results["model"] = args.model
    results["command"] = "omnicompile " + " ".join(sys.argv[1:])
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(markdown_table(results))
    print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {plot_layers(results, args.plot)}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .demos.models import served_model
    from .serving import serve

    serve(
        served_model(args.model),
        args.attn_implementation,
        _config_from_args(args),
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        log_level=args.log_level,
    )
    return 0


def _cmd_train_demo(args: argparse.Namespace) -> int:
    from .demos.train_demo import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``omnicompile`` command."""
    parser = argparse.ArgumentParser(prog="omnicompile", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log the backend's decisions")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compile a built-in small Llama and show what the backend did")
    demo.add_argument("--model", default="llama-tiny")
    demo.add_argument("--seq-len", type=int, default=2048)
    demo.add_argument("--structured-len", type=int, default=4096)
    demo.add_argument("--tau", type=float, default=0.95)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.set_defaults(func=_cmd_demo)

    inspect = sub.add_parser("inspect", help="explain a transformers model (local folder or built-in config)")
    inspect.add_argument("model", help="a built-in config name or a local checkpoint folder")
    inspect.add_argument("--seq-len", type=int, default=2048)
    inspect.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    inspect.add_argument(
        "--config", default=None, help="OmniSparseConfig fields as JSON, e.g. '{\"min_seq_len\": 1024}'"
    )
    inspect.add_argument("--device", default=None)
    inspect.add_argument(
        "--plot", default=None, metavar="FILE.png", help="draw the selected blocks of one layer"
    )
    inspect.add_argument("--layer", type=int, default=0)
    inspect.add_argument("--heads", type=int, nargs="+", default=[0, 1])
    inspect.set_defaults(func=_cmd_inspect)

    export = sub.add_parser("export", help="export a model with OmniSparse attention (AOTInductor package)")
    export.add_argument("model", help="a built-in config name or a local checkpoint folder")
    export.add_argument("out", help="the package path (.pt2)")
    export.add_argument("--seq-len", type=int, default=256, help="example sequence length")
    export.add_argument("--static", action="store_true", help="fix the sequence length (default: dynamic)")
    export.add_argument("--target", default="aoti", choices=["aoti", "tensorrt"])
    export.add_argument(
        "--python-op",
        action="store_true",
        help="keep every attention call the Python op (default: inline the ones known at export)",
    )
    export.add_argument("--config", default=None, help="OmniSparseConfig fields as JSON")
    export.add_argument("--device", default=None)
    export.set_defaults(func=_cmd_export)

    ev = sub.add_parser(
        "eval", help="accuracy of a pretrained model, dense vs sparse (perplexity, passkeys, recall)"
    )
    ev.add_argument("--model", default="smollm2-135m", help="a pretrained name of omnicompile.demos.models")
    ev.add_argument("--lengths", type=int, nargs="+", default=[4096])
    default = OmniSparseConfig()  # the grid's default: the default config's scope and tau
    ev.add_argument(
        "--scopes", nargs="+", default=[default.budget_scope], choices=["heads", "kv_group", "head"]
    )
    ev.add_argument("--taus", type=float, nargs="+", default=[default.tau])
    ev.add_argument("--depths", type=int, default=10, help="passkey depths per length (0: none)")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--rope-scaling", default=None, help='e.g. \'{"rope_type": "yarn", "factor": 4.0}\'')
    ev.add_argument("--max-position-embeddings", type=int, default=None)
    ev.add_argument(
        "--config",
        default=None,
        help="base OmniSparseConfig fields (JSON; min_seq_len 1024 and max_head_dim 256 unless given)",
    )
    ev.add_argument("--logit-chunk", type=int, default=1024, help="positions whose logits are held at once")
    ev.add_argument("--out", default="accuracy.json", help="results JSON path")
    ev.add_argument("--plot", default=None, metavar="FILE.png", help="density and recall per layer")
    ev.set_defaults(func=_cmd_eval)

    srv = sub.add_parser(
        "serve", help="transformers' OpenAI-compatible server with omnisparse attention (docs/SERVING.md)"
    )
    srv.add_argument("model", help="a local checkpoint folder, FOLDER:FILE.gguf, smollm2-135m or gemma3-270m")
    srv.add_argument("--attn-implementation", default="omnisparse", choices=["omnisparse", "sdpa", "eager"])
    srv.add_argument("--config", default=None, help="OmniSparseConfig fields as JSON (omnisparse only)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0, ...")
    srv.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    srv.add_argument("--max-model-len", type=int, default=None, help="longest prompt + answer, in tokens")
    srv.add_argument("--log-level", default="info")
    srv.set_defaults(func=_cmd_serve)

    from .demos.train_demo import add_arguments

    train = sub.add_parser("train-demo", help="train a small Llama dense, then sparse; report accuracy")
    add_arguments(train)
    train.set_defaults(func=_cmd_train_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``omnicompile`` script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
