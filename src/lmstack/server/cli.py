"""`lmstack serve`: load a model, wrap it in an AsyncEngine and serve it over HTTP with uvicorn.

Imports of torch, FastAPI and uvicorn happen in `run`, so that building the `lmstack` parser stays fast.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

from lmstack.errors import LmstackError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="embedded name, HF folder, .gguf file or dummy:<preset>")
    parser.add_argument("--tokenizer", default=None, help="take the tokenizer from this folder or model")
    parser.add_argument("--served-model-name", help="the name clients send as `model` (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
    parser.add_argument("--api-key", default=os.environ.get("LMSTACK_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $LMSTACK_API_KEY)")
    parser.add_argument("--max-queue", type=int, help="waiting requests before new ones get a 429 (default: no limit)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-num-seqs", type=int, help="requests running at once")
    parser.add_argument("--max-model-len", type=int, help="context window (default: the model's, capped)")
    parser.add_argument("--num-kv-blocks", type=int, help="KV cache blocks (default: from the memory budget)")
    parser.add_argument("--token-graph-tokens", type=int,
                        help="GPU: prefill and mixed steps of up to this many tokens replay CUDA graphs "
                             "(default 2048; 0 runs them eagerly and saves the graphs' memory and start-up time)")
    parser.add_argument("--policy", default="fcfs", help="scheduling policy: fcfs, priority, ltr, mlfq")
    parser.add_argument("--ranker", help="ltr: trained LengthRanker folder (from `lmstack ltr train`)")
    parser.add_argument("--ranker-device", help="ltr: device of the ranker (default: cuda if present, else cpu)")
    parser.add_argument("--starvation-steps", type=int,
                        help="ltr: steps a request may be passed over (a later arrival admitted while it "
                             "waits) before it is given priority; mlfq: steps it may wait (default 256)")
    parser.add_argument("--quantum", type=int, help="ltr: steps of priority a starved request gets (default 64)")
    parser.add_argument("--rank-preemption", action="store_true", default=None,
                        help="ltr: a better-ranked waiting request evicts the worst-ranked running one from a full "
                             "batch (it is recomputed later); off by default")
    parser.add_argument("--speculative", choices=["draft", "ngram"],
                        help="speculative decoding: a draft model (--spec-model) or n-gram prompt lookup")
    parser.add_argument("--spec-model", help="draft: the smaller model, with the target's tokenizer")
    parser.add_argument("--spec-k", default="smart", type=spec_k,
                        help="tokens proposed per step: 'smart' (SmartSpec picks 0..--spec-max-k each step) or N")
    parser.add_argument("--spec-max-k", type=int, help="longest proposal SmartSpec considers (default 5)")
    parser.add_argument("--spec-profile",
                        help="SmartSpec warm start: a profile JSON (written by `lmstack bench smartspec`)")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="request body limit (413 over it)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds in-flight requests may take to finish after SIGTERM")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def spec_k(text: str) -> int | str:
    """--spec-k: 'smart' or a non-negative integer."""
    if text == "smart":
        return text
    try:
        k = int(text)
    except ValueError:
        k = -1
    if k < 0:
        raise argparse.ArgumentTypeError(f"must be 'smart' or an integer >= 0, got {text!r}")
    return k


def speculative_options(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig settings of the --spec-* flags (EngineConfig rejects them without --speculative)."""
    if args.speculative is None:
        given = [f for f in ("spec_model", "spec_max_k", "spec_profile") if getattr(args, f) is not None]
        if given or args.spec_k != "smart":
            raise LmstackError("--spec-* flags need --speculative draft|ngram")
        return {}
    options = {"speculative": args.speculative, "spec_k": args.spec_k}
    for name in ("spec_model", "spec_max_k", "spec_profile"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise LmstackError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_bytes < 1:
        raise LmstackError(f"--max-body-bytes must be positive, got {args.max_body_bytes}")
    if args.drain_timeout < 0:
        raise LmstackError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise LmstackError("--api-key must not be empty")


def policy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The policy flags that were given; the policy rejects the ones it does not take (e.g. --ranker for fcfs)."""
    names = {"ranker": "ranker", "ranker_device": "device", "starvation_steps": "starvation_steps",
             "quantum": "quantum", "rank_preemption": "preempt"}
    return {option: getattr(args, flag) for flag, option in names.items() if getattr(args, flag) is not None}


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; on SIGTERM in-flight requests finish first, then exit 0."""
    _check(args)
    import uvicorn

    from lmstack.engine.async_engine import AsyncEngine
    from lmstack.engine.llm import LLM
    from lmstack.server.app import create_app

    engine_config: dict[str, Any] = {"policy": args.policy, "policy_options": policy_options(args),
                                     **speculative_options(args)}
    for key in ("max_num_seqs", "max_model_len", "num_kv_blocks", "token_graph_tokens"):
        if getattr(args, key) is not None:
            engine_config[key] = getattr(args, key)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer, **engine_config)
    engine = AsyncEngine(llm.engine, max_queue=args.max_queue)
    name = args.served_model_name or args.model
    app = create_app(engine, llm.tokenizer, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     drain_timeout=args.drain_timeout)

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"serving {name} on http://{f'[{host}]' if ':' in host else host}:{port}", flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.lmstack.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=max(1, round(args.drain_timeout)))
    # uvicorn re-raises the signal it caught once it has shut down; after a graceful drain SIGTERM means
    # "done", so the re-raised one must not kill the process with a signal status.
    signal.signal(signal.SIGTERM, lambda *_: None)
    Server(config).run()
    return 0
