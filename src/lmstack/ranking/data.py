"""Training data for the length ranker: prompts paired with the length of the answer they get.

Sources are ShareGPT (the first human turn and the answer right after it) or any JSONL of prompts. Lengths come
either from the data's own answers or from generations of a served model through an `LLMClient` (as the paper
does, labelling with the serving model's own outputs). Prompts are deduplicated and split once, with a seed,
into train / val / test, so every later run sees the same held-out set. The output is an append-only JSONL
(one finished record a line), so labelling by generation resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmstack.client.base import GenParams, LLMClient
from lmstack.errors import LmstackError

SPLITS = ("train", "val", "test")
_ANSWER_FIELDS = ("answer", "output", "completion", "response")


@dataclass
class SourceItem:
    """A prompt as read from a source, with its answer when the source has one."""

    id: str
    prompt: str
    answer: str | None


@dataclass
class LengthExample:
    """One labelled prompt. `truncated`: generation hit max_tokens, so the true length is at least output_len."""

    id: str
    prompt: str
    prompt_len: int
    output_len: int
    split: str
    truncated: bool = False

    @classmethod
    def from_dict(cls, d: Any, where: str) -> LengthExample:
        if not isinstance(d, dict):
            raise LmstackError(f"{where}: expected a JSON object with id, prompt, prompt_len, output_len, split")
        try:
            ex = cls(id=str(d["id"]), prompt=d["prompt"], prompt_len=int(d["prompt_len"]),
                     output_len=int(d["output_len"]), split=d["split"], truncated=bool(d.get("truncated", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise LmstackError(f"{where}: bad or missing field ({e!r}); records need id, prompt, prompt_len, "
                               "output_len, split — build them with `lmstack ltr build-data`") from None
        if not isinstance(ex.prompt, str) or ex.split not in SPLITS or ex.output_len < 0 or ex.prompt_len < 0:
            raise LmstackError(f"{where}: prompt must be a string, split one of {', '.join(SPLITS)} and lengths >= 0")
        return ex


@dataclass
class SplitSpec:
    """How the deduplicated prompts are divided: the first `test_size` of a seeded shuffle are held out."""

    test_size: int = 2500
    val_size: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if self.test_size < 1 or self.val_size < 0:
            raise LmstackError(f"test size must be >= 1 and val size >= 0 (got {self.test_size}, {self.val_size})")


def sharegpt_items(path: str | Path | None = None, limit: int | None = None) -> list[SourceItem]:
    """First human turn + the answer after it, from the installed ShareGPT package (or a ShareGPT JSON file)."""
    from lmstack.data.sharegpt import _first_exchange, load_sharegpt

    items = []
    for i, conv in enumerate(load_sharegpt(path, limit=limit)):
        exchange = _first_exchange(conv)
        if exchange is not None:
            items.append(SourceItem(id=str(conv.get("id") or f"sharegpt-{i}"), prompt=exchange[0], answer=exchange[1]))
    return items


def jsonl_items(path: str | Path) -> list[SourceItem]:
    """A JSONL (plain or .gz) of {"prompt": str, optional "id", optional answer under one of
    answer/output/completion/response}."""
    import gzip

    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    items = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LmstackError(f"{path}:{n} is not valid JSON ({e.msg}); one JSON object per line") from None
                if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
                    raise LmstackError(f"{path}:{n} needs a string field \"prompt\"")
                answer = next((d[k] for k in _ANSWER_FIELDS if isinstance(d.get(k), str)), None)
                items.append(SourceItem(id=str(d.get("id", f"line-{n}")), prompt=d["prompt"], answer=answer))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LmstackError(f"cannot read prompts file {path}: {e}") from None
    return items


def dedupe_and_split(items: list[SourceItem], spec: SplitSpec, need_answers: bool) -> list[tuple[SourceItem, str]]:
    """Drop empty and repeated prompts (first occurrence wins), shuffle with the seed, assign splits in order."""
    seen: set[str] = set()
    kept = []
    for item in items:
        key = item.prompt.strip()
        if not key or key in seen or (need_answers and not (item.answer or "").strip()):
            continue
        seen.add(key)
        kept.append(item)
    if len(kept) <= spec.test_size + spec.val_size:
        raise LmstackError(f"only {len(kept)} usable prompts, not enough for a test split of {spec.test_size} and a "
                           f"val split of {spec.val_size} plus training data; lower --test-size / --val-size")
    random.Random(spec.seed).shuffle(kept)
    splits = ["test"] * spec.test_size + ["val"] * spec.val_size
    return [(item, splits[i] if i < len(splits) else "train") for i, item in enumerate(kept)]


def read_examples(path: str | Path, split: str | None = None) -> list[LengthExample]:
    """Read a built data file (plain or .gz), optionally only one split."""
    import gzip

    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"data file {path} does not exist; build it with `lmstack ltr build-data --output {path}`")
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")  # not splitlines(): prompts may hold U+2028 and other breaks
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LmstackError(f"cannot read data file {path}: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # only the last piece lacks its newline
                break  # a torn last line from an interrupted run: that record was never finished
            raise LmstackError(f"{path}:{n} is not valid JSON; the file is damaged, rebuild it") from None
        ex = LengthExample.from_dict(d, f"{path}:{n}")
        if split is None or ex.split == split:
            out.append(ex)
    return out


class _TokenCounter:
    """Token counts with a label tokenizer (an embedded model name or a folder with tokenizer.json)."""

    def __init__(self, name_or_path: str) -> None:
        from tokenizers import Tokenizer

        folder = Path(name_or_path).expanduser()
        if not (folder / "tokenizer.json").is_file():
            from lmstack.models.loader import resolve_model_path

            folder = resolve_model_path(name_or_path)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    def __call__(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


class _AppendLog:
    """The output JSONL, append-only: each finished batch of records is flushed and fsynced at once."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.meta = path.with_name(path.name + ".meta.json")
        if path.exists() and self.meta.exists():
            previous = json.loads(self.meta.read_text(encoding="utf-8"))
            if previous != settings:
                changed = sorted(k for k in settings if previous.get(k) != settings[k])
                raise LmstackError(f"{path} was built with other settings ({', '.join(changed)} differ); pass the "
                                   "same options to resume it, or choose a new --output")
        elif path.exists() and path.stat().st_size > 0:
            raise LmstackError(f"{path} exists but was not written by `lmstack ltr build-data`; choose a new --output")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.meta.with_name(self.meta.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=1), encoding="utf-8")
        os.replace(tmp, self.meta)
        self.done = {ex.id for ex in read_examples(path)} if path.exists() else set()
        self._truncate_torn_tail()
        self._f = path.open("a", encoding="utf-8")

    def _truncate_torn_tail(self) -> None:
        """A crash mid-write leaves a last line without a newline: drop it so the next record starts clean."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def write(self, examples: list[LengthExample]) -> None:
        """Append finished records and make them durable before more work starts."""
        self._f.write("".join(json.dumps(asdict(ex), ensure_ascii=False) + "\n" for ex in examples))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.update(ex.id for ex in examples)

    def close(self) -> None:
        self._f.close()


def _batches(todo: list[tuple[SourceItem, str]], size: int) -> Iterator[list[tuple[SourceItem, str]]]:
    for start in range(0, len(todo), size):
        yield todo[start : start + size]


def build_dataset(
    items: list[SourceItem],
    output: str | Path,
    spec: SplitSpec,
    label_tokenizer: str = "smollm2-135m-instruct",
    client: LLMClient | None = None,
    params: GenParams | None = None,
    batch_size: int = 64,
    max_prompt_len: int | None = None,
    settings: dict[str, Any] | None = None,
) -> list[LengthExample]:
    """Label `items` into `output` (resuming a partial file) and return every record in it.

    Without `client`, the length is the token count of each item's own answer. With `client`, each prompt is
    sent as one user turn with `params` and the length is that of the generated answer (as counted by the
    client's usage, else by `label_tokenizer`). `settings` are recorded beside the file; resuming with other
    settings is refused, so one file never mixes two labellings.
    """
    count = _TokenCounter(label_tokenizer)
    pairs = dedupe_and_split(items, spec, need_answers=client is None)
    if max_prompt_len is not None:
        lens = count([item.prompt for item, _ in pairs])
        pairs = [p for p, n in zip(pairs, lens, strict=True) if n <= max_prompt_len]
    record = {"split": asdict(spec), "label_tokenizer": label_tokenizer, "max_prompt_len": max_prompt_len,
              "labels": "answers" if client is None else f"generated by {client.model}",
              "params": None if params is None else params.to_dict(), **(settings or {})}
    log = _AppendLog(Path(output), record)
    todo = [p for p in pairs if p[0].id not in log.done]
    try:
        with tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="labelling", unit="prompt") as bar:
            for batch in _batches(todo, batch_size):
                log.write(_label_batch(batch, count, client, params))
                bar.update(len(batch))
    finally:
        log.close()
    return read_examples(output)


def _label_batch(
    batch: list[tuple[SourceItem, str]], count: _TokenCounter, client: LLMClient | None, params: GenParams | None,
) -> list[LengthExample]:
    prompts = [item.prompt for item, _ in batch]
    prompt_lens = count(prompts)
    truncated = [False] * len(batch)
    if client is None:
        output_lens = count([item.answer or "" for item, _ in batch])
    else:
        completions = client.chat([[{"role": "user", "content": p}] for p in prompts], params or GenParams())
        output_lens = [c.usage.completion_tokens if c.usage is not None else count([c.text])[0] for c in completions]
        truncated = [c.finish_reason == "length" for c in completions]
    return [LengthExample(id=item.id, prompt=item.prompt, prompt_len=p, output_len=o, split=split, truncated=t)
            for (item, split), p, o, t in zip(batch, prompt_lens, output_lens, truncated, strict=True)]
