"""The one interface every app uses to reach a model, whether it runs in-process or behind a URL.

Apps take an `LLMClient` and never import the engine, so the same code runs on the embedded model, a local
server, a remote vLLM or a hosted API. Calls are batched: a list in, a list of `Completion`s out, in order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from lmstack.errors import LmstackError

Message = dict[str, Any]  # {"role": "user" | "assistant" | "system", "content": str}
Conversation = list[Message]


@dataclass
class GenParams:
    """How to generate, with OpenAI meanings; `extra` carries server-specific fields (e.g. ignore_eos, top_k).

    `logprobs=None` asks for no logprobs; `logprobs=k` returns the sampled token's logprob plus the top k
    alternatives at every position (k=0: the sampled token only).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A bare string is one stop sequence, not a tuple of characters.
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise LmstackError(f"GenParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise LmstackError(f"GenParams.logprobs must be None or an integer 0..20, got {self.logprobs!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form: the request hash of the disk cache is taken over it."""
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass
class TokenLogprob:
    """One generated token: its text, id when known, logprob, and the top alternatives (text → logprob)."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)
    token_id: int | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Completion:
    """One answer. `token_ids` is None when the server does not return ids (OpenAI's API does not)."""

    text: str
    finish_reason: str | None
    token_ids: list[int] | None = None
    logprobs: list[TokenLogprob] | None = None
    usage: Usage | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Completion:
        logprobs = d.get("logprobs")
        usage = d.get("usage")
        return cls(
            text=d["text"],
            finish_reason=d.get("finish_reason"),
            token_ids=d.get("token_ids"),
            logprobs=None if logprobs is None else [TokenLogprob(**lp) for lp in logprobs],
            usage=None if usage is None else Usage(**usage),
        )


@runtime_checkable
class LLMClient(Protocol):
    """Batched access to one model. Results come back in the order of the inputs."""

    model: str

    def chat(self, conversations: list[Conversation], params: GenParams | None = None) -> list[Completion]:
        """Answer each conversation (the chat template is applied by whoever runs the model)."""
        ...

    def complete(self, prompts: list[str], params: GenParams | None = None) -> list[Completion]:
        """Continue each raw text prompt."""
        ...

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One embedding vector per text."""
        ...


def check_batch(items: Any, what: str) -> None:
    """A single conversation or prompt passed where a batch is expected is the commonest slip: name it."""
    if not isinstance(items, list):
        raise LmstackError(f"{what} must be a list (a batch); got {type(items).__name__}")
    if what == "conversations":
        for i, conv in enumerate(items):
            if not isinstance(conv, list) or not all(isinstance(m, dict) for m in conv):
                raise LmstackError(f"conversations[{i}] must be a list of {{'role', 'content'}} messages; "
                                   "to send one conversation, wrap it: chat([messages])")
    elif not all(isinstance(p, str) for p in items):
        raise LmstackError(f"{what} must be a list of strings")
