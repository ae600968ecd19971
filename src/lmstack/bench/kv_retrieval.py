"""A generated key-value retrieval task: a long list of `key: value` lines, then a question about one key.

Answering needs the model to find one line anywhere in a long context and copy its value, which is what
a sparse attention must not lose. Keys are random word pairs, values random 6-digit numbers (several
tokens each, so most of the answer is produced by decode steps); the queried line sits at a random depth.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

_WORDS = ("amber", "apple", "arrow", "aspen", "basil", "birch", "bison", "cedar", "cobalt", "comet", "coral",
          "crane", "delta", "dune", "ember", "falcon", "fern", "flint", "frost", "garnet", "ginger", "glacier",
          "granite", "harbor", "hazel", "heron", "indigo", "iris", "ivory", "jasper", "juniper", "kestrel", "lagoon",
          "lantern", "lemon", "lilac", "linen", "lotus", "maple", "marble", "meadow", "mint", "nectar", "nova",
          "oak", "olive", "onyx", "opal", "orchid", "otter", "pebble", "pepper", "pine", "plum", "quartz", "quill",
          "raven", "reed", "river", "ruby", "saffron", "sage", "sparrow", "spruce", "storm", "thistle", "thunder",
          "tulip", "umber", "valley", "velvet", "violet", "walnut", "willow", "zephyr")
_HEAD = "Below is a list of keys, each with its value. Remember them all.\n\n"
_NUMBER = re.compile(r"\d+")


@dataclass
class RetrievalSample:
    prompt: str
    key: str
    value: str
    num_lines: int
    depth: float  # where the asked line sits in the list, 0 = first, 1 = last


def make_sample(tokenizer: Any, length: int, seed: int) -> RetrievalSample:
    """A prompt of about `length` tokens (never more), reproducible from (length, seed)."""
    rng = random.Random(f"{length}:{seed}")
    tail_budget = 40  # the question and answer cue
    lines: list[str] = []
    keys: set[str] = set()
    used = len(tokenizer.encode(_HEAD, add_special_tokens=False))
    while True:
        key = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}-{rng.randrange(10, 100)}"
        if key in keys:
            continue
        line = f"{key}: {rng.randrange(100000, 1000000)}\n"
        cost = len(tokenizer.encode(line, add_special_tokens=False))
        if used + cost > length - tail_budget:
            break
        keys.add(key)
        lines.append(line)
        used += cost
    if not lines:
        raise ValueError(f"a retrieval prompt of {length} tokens is too short for even one line")
    pick = rng.randrange(len(lines))
    key, value = lines[pick].strip().split(": ")
    prompt = (_HEAD + "".join(lines) + f"\nQuestion: what is the value of {key}?\n"
              f"Answer: the value of {key} is")
    return RetrievalSample(prompt=prompt, key=key, value=value, num_lines=len(lines),
                           depth=pick / max(1, len(lines) - 1))


def is_correct(generated: str, value: str) -> bool:
    """Exact match of the first number in the generated text (a longer or shorter number is wrong)."""
    found = _NUMBER.search(generated)
    return found is not None and found.group(0) == value
