"""Small prompt sets for speculative-decoding benchmarks: coding requests, and "quote your context" edits.

Code answers are predictable enough for a small draft model to guess many tokens; an answer that repeats or
edits a paragraph of its prompt is what n-gram prompt lookup finds. Wikitext-2 paragraphs come from the
shared data folder (`../shared/data/wikitext2/`, CC BY-SA 3.0).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmstack.errors import LmstackError

WIKITEXT = Path(__file__).resolve().parents[4] / "shared" / "data" / "wikitext2" / "wikitext-2-raw-v1_test.jsonl"

CODE_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation.",
    "Write a Python function `fizzbuzz(n)` that returns the FizzBuzz sequence from 1 to n as a list of strings.",
    "Implement binary search in Python over a sorted list; return the index or -1.",
    "Write a Python class `Stack` with push, pop, peek and is_empty methods.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that counts the frequency of each word in a text and returns a dict.",
    "Write a Python function that flattens an arbitrarily nested list.",
    "Implement quicksort in Python.",
    "Write a Python function that reads a CSV file and returns the rows as a list of dicts.",
    "Write a JavaScript function that debounces another function.",
    "Write a JavaScript function that deep-clones a plain object.",
    "Write a SQL query that returns the ten customers with the highest total order amount, given tables "
    "customers(id, name) and orders(id, customer_id, amount).",
    "Write a C function that reverses a null-terminated string in place.",
    "Write a Python function that validates an email address with a regular expression.",
    "Write a Python function that converts a Roman numeral to an integer.",
    "Write a Python decorator that measures and prints how long a function takes.",
    "Write a Python function that returns all prime numbers below n using the sieve of Eratosthenes.",
    "Write a Python class for a singly linked list with append, prepend and delete methods.",
    "Write a Python function that computes the Levenshtein distance between two strings.",
    "Write a bash script that counts the lines of every .py file in a directory tree.",
    "Write a Python function that transposes a matrix given as a list of lists.",
    "Write a Python function that groups a list of dicts by the value of a given key.",
    "Write a Go function that returns the maximum value in a slice of ints.",
    "Write a Python function that checks whether a binary tree is balanced.",
    "Write a Python function that parses a query string like 'a=1&b=2' into a dict.",
    "Write a Rust function that sums the even numbers of a vector of i64.",
    "Write a Python function that finds the longest common prefix of a list of strings.",
    "Write a Python context manager that changes the working directory and restores it on exit.",
    "Write a Python function that computes a moving average of a list with a given window size.",
    "Write a TypeScript interface for a user with id, name, optional email and a list of roles, and a function "
    "that returns the admins of a list of users.",
    "Write a Python function that rotates a list by k positions to the right.",
)

QUOTE_INSTRUCTIONS = (
    "Repeat the following paragraph exactly, word for word:",
    "Rewrite the following paragraph with ' @-@ ' replaced by '-' and the spaces before punctuation removed; "
    "change nothing else:",
    "Copy the following text, then add one sentence at the end that summarizes it:",
    "Fix the spacing in the following paragraph (no space before commas or periods) and output the corrected "
    "paragraph:",
)


def code_prompts() -> list[str]:
    return list(CODE_PROMPTS)


def wikitext_paragraphs(path: str | Path = WIKITEXT, min_words: int = 40, max_words: int = 120) -> list[str]:
    """Body paragraphs (not headings) of wikitext-2 raw test with a word count in [min_words, max_words]."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")  # JSON strings may hold U+2028
    except OSError as e:
        raise LmstackError(f"cannot read the wikitext-2 file {path}: {e}") from None
    out = []
    for line in lines:
        if not line.strip():
            continue
        text = json.loads(line).get("text", "").strip()
        if text and not text.startswith("=") and min_words <= len(text.split()) <= max_words:
            out.append(text)
    return out


def quote_prompts(n: int, seed: int = 0, path: str | Path = WIKITEXT, max_words: int = 120) -> list[str]:
    """`n` requests that ask to repeat or edit a wikitext paragraph (their answers quote the prompt)."""
    paragraphs = wikitext_paragraphs(path, max_words=max_words)
    if len(paragraphs) < n:
        raise LmstackError(f"only {len(paragraphs)} wikitext paragraphs fit, {n} asked for")
    rng = random.Random(seed)
    chosen = rng.sample(paragraphs, n)
    return [f"{QUOTE_INSTRUCTIONS[i % len(QUOTE_INSTRUCTIONS)]}\n\n{p}" for i, p in enumerate(chosen)]
