"""Prompts of the pipeline and the parsers of their answers: the seven quality criteria and the judge's verdict.

The judge design follows Arena-Hard v0.1: the judge first writes its own answer (so it can spot mistakes
instead of trusting whichever answer sounds surer), then compares both assistants' answers and ends with one
verdict label on a five-level scale. Game 1 puts the baseline in position A, game 2 swaps the two.
"""

from __future__ import annotations

import json
import re
from typing import Any

# The seven BenchBuilder criteria: key → the question a prompt must answer with yes to meet it.
CRITERIA: dict[str, str] = {
    "specificity": "Does it ask for a specific, well-defined output?",
    "domain_knowledge": "Does answering it need knowledge of a specific domain?",
    "complexity": "Does it have several parts, variables or steps?",
    "problem_solving": "Does it need reasoning to work out a solution, not just recall?",
    "creativity": "Does it call for novel ideas or original content?",
    "technical_accuracy": "Can the correctness of an answer be checked?",
    "real_world": "Does it relate to a practical, real-world use?",
}

_ANNOTATE_FORMAT = "{{" + ", ".join(f'"{k}": <true or false>' for k in CRITERIA) + "}}"
# The prompt comes before the questions, which are asked one by one: with the criteria listed first and the
# prompt last, a 1.5B annotator answered all seven alike (all false for 42% of 2,000 ShareGPT prompts).
ANNOTATE_SYSTEM = ("You annotate user prompts for an LLM benchmark. Judge the prompt itself, not how hard it "
                   "would be for you.")
ANNOTATE_USER = ("Here is a user prompt:\n<prompt>\n{prompt}\n</prompt>\n\nAnswer each question about this "
                 "prompt with true or false, independently:\n"
                 + "\n".join(f"- {k}: {q}" for k, q in CRITERIA.items())
                 + "\n\nReply with only the JSON object " + _ANNOTATE_FORMAT)
ANNOTATE_REASK = ("That was not one JSON object with exactly the seven keys and true/false values. Reply again "
                  "with only the JSON object: " + _ANNOTATE_FORMAT.format())

CLUSTER_NAME_SYSTEM = ("You name topic clusters of user prompts. Reply with a short topic name of 2 to 6 words "
                       "and nothing else.")
CLUSTER_NAME_USER = "Keywords: {keywords}\n\nExample prompts:\n{examples}\n\nTopic name:"

JUDGE_SYSTEM = (
    "You are an impartial judge of two AI assistants' answers to the same user prompt.\n\n"
    "Work in this order. First write your own answer to the prompt, before reading the assistants' answers "
    "closely. Then check both answers against yours: point out mistakes and inaccurate information and correct "
    "them. Judge whether each answer is helpful (it does what the prompt asks; where the prompt is ambiguous, "
    "asking for clarification beats guessing), relevant (every part relates to the prompt) and concise (clear, "
    "not verbose). Where creativity matters, weigh it too. Name any important information an answer is missing.\n\n"
    "Length alone is no merit. Do not let the order in which the answers appear sway you.\n\n"
    "End with exactly one final verdict label, on its own line:\n"
    "[[A>>B]] Assistant A is significantly better\n"
    "[[A>B]] Assistant A is slightly better\n"
    "[[A=B]] the two are about equal\n"
    "[[B>A]] Assistant B is slightly better\n"
    "[[B>>A]] Assistant B is significantly better\n\n"
    'For example: "My final verdict is [[A>B]]."'
)
JUDGE_USER = ("<|User Prompt|>\n{question}\n\n<|The Start of Assistant A's Answer|>\n{answer_a}\n"
              "<|The End of Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\n{answer_b}\n"
              "<|The End of Assistant B's Answer|>")
# For small judges: the same scale, the instructions after the answers (where a 1.5B model still attends to
# them) and a short comparison instead of the judge's own full answer first.
JUDGE_USER_COMPACT = JUDGE_USER + (
    "\n\nCompare the two answers. Check each for mistakes, then judge whether it is helpful, relevant and "
    "concise; length alone is no merit, and the order of the answers must not sway you. Write a short "
    "comparison, then end with exactly one final verdict label on its own line: [[A>>B]] (A is significantly "
    "better), [[A>B]] (A is slightly better), [[A=B]] (about equal), [[B>A]] (B is slightly better) or [[B>>A]] "
    "(B is significantly better)."
)
# Template name → (system prompt, user prompt with {question}, {answer_a}, {answer_b}).
JUDGE_TEMPLATES: dict[str, tuple[str, str]] = {
    "arena-hard": (JUDGE_SYSTEM, JUDGE_USER),
    "compact": ("You are an impartial judge of two AI assistants' answers to the same user prompt.",
                JUDGE_USER_COMPACT),
}
JUDGE_REASK = ("Your reply did not end with a verdict label. Finish your judgment now with exactly one final "
               "verdict label: [[A>>B]], [[A>B]], [[A=B]], [[B>A]] or [[B>>A]].")

# Canonical labels and the spellings judges produce for them.
VERDICT_ALIASES: dict[str, str] = {
    "A>>B": "A>>B", "B<<A": "A>>B",
    "A>B": "A>B", "B<A": "A>B",
    "A=B": "A=B", "B=A": "A=B", "A==B": "A=B",
    "B>A": "B>A", "A<B": "B>A",
    "B>>A": "B>>A", "A<<B": "B>>A",
}
_VERDICT_RE = re.compile(r"\[\[\s*([AB]\s*(?:>>|<<|==|>|<|=)\s*[AB])\s*\]\]")


def parse_verdict(text: str) -> str | None:
    """The canonical label, or None when there is none or the judge gave conflicting labels.

    Conflicting labels (e.g. a quoted example followed by a different final verdict) are not guessed at:
    the game is re-asked, then recorded as unparsable.
    """
    found = {VERDICT_ALIASES.get(re.sub(r"\s+", "", m)) for m in _VERDICT_RE.findall(text)}
    found.discard(None)
    return found.pop() if len(found) == 1 else None


def flip_verdict(label: str) -> str:
    """The same verdict seen with the positions swapped (A>>B ↔ B>>A)."""
    return {"A>>B": "B>>A", "A>B": "B>A", "A=B": "A=B", "B>A": "A>B", "B>>A": "A>>B"}[label]


def parse_annotation(text: str) -> dict[str, bool] | None:
    """The seven criteria as booleans from the first JSON object in `text`, or None when it does not parse.

    Small annotators wrap JSON in code fences or prose, so the first `{...}` span is decoded; every criterion
    key must be present with a boolean (or "true"/"false", "yes"/"no") value, and no other key.
    """
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return _criteria_from(obj)
    return None


def _criteria_from(obj: Any) -> dict[str, bool] | None:
    if not isinstance(obj, dict) or set(obj) != set(CRITERIA):
        return None
    out: dict[str, bool] = {}
    for key, value in obj.items():
        if isinstance(value, bool):
            out[key] = value
        elif isinstance(value, str) and value.strip().lower() in ("true", "yes", "false", "no"):
            out[key] = value.strip().lower() in ("true", "yes")
        else:
            return None
    return out
