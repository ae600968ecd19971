"""Text ↔ token ids and chat templates, from a Hugging Face folder, without transformers.

Wraps the `tokenizers` library for tokenizer.json and renders tokenizer_config.json's jinja chat template in a
sandbox, as transformers does, so that prompts match what the model was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from lmstack.errors import LmstackError, ModelLoadError
from lmstack.models.config import read_json_object


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens either as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _pick_template(value: Any) -> str | None:
    """A template string, or the "default" one of a list of named templates."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) and value else None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Like transformers' tojson: no HTML escaping (jinja's own tojson would turn '<' into '\\u003c')."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Tokenizer:
    """A tokenizer.json tokenizer plus the special tokens and chat template the engine needs."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self._compiled: tuple[str, Template] | None = None
        self.special_tokens = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token),
                                                 ("pad_token", pad_token), ("unk_token", unk_token)) if v}
        eos_id = self.token_to_id(eos_token) if eos_token else None
        ids = ([] if eos_id is None else [eos_id]) + [int(i) for i in eos_token_ids]
        self._eos_ids = list(dict.fromkeys(ids))

    @classmethod
    def from_folder(cls, path: str | Path, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json (or chat_template.jinja) and the configs' eos ids."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"{folder} has no tokenizer.json; lmstack needs a 'fast' tokenizer file")
        try:
            tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise ModelLoadError(f"cannot load {tok_file}: {e}") from None
        cfg = read_json_object(folder / "tokenizer_config.json", missing_ok=True)
        template = _pick_template(cfg.get("chat_template"))
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        extra = _ids(read_json_object(folder / "config.json", missing_ok=True).get("eos_token_id"))
        extra += _ids(read_json_object(folder / "generation_config.json", missing_ok=True).get("eos_token_id"))
        return cls(
            tok,
            chat_template=template,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
            unk_token=_token_str(cfg.get("unk_token")),
            eos_token_ids=[*extra, *eos_token_ids],
        )

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a generation (eos, and e.g. <|endoftext|> beside <|im_end|> for Qwen)."""
        return list(self._eos_ids)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.special_tokens.get("bos_token")
        return self.token_to_id(bos) if bos else None

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can emit (added tokens included); the model's embedding may be larger."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; special tokens written in the text (e.g. from a chat template) become their ids."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _compiled_template(self) -> Template:
        """Compile once, and again only if `chat_template` was replaced (e.g. by a user override)."""
        if not self.chat_template:
            raise LmstackError(
                "this model has no chat template (tokenizer_config.json has no 'chat_template'); "
                "send a plain completion prompt instead of chat messages"
            )
        if self._compiled is None or self._compiled[0] != self.chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            try:
                self._compiled = (self.chat_template, env.from_string(self.chat_template))
            except TemplateError as e:
                raise LmstackError(f"the model's chat template is invalid: {e}") from None
        return self._compiled[1]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_vars: Any
    ) -> str:
        """The prompt text for a conversation; `template_vars` (e.g. tools) are passed to the template."""
        template = self._compiled_template()
        context = {**self.special_tokens, **template_vars}
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except (TemplateError, TypeError, ValueError) as e:
            raise LmstackError(f"the chat template rejected the conversation: {e}") from None


class IncrementalDetokenizer:
    """Turns generated ids, one at a time, into the text they newly complete, for streaming and stop strings.

    Each step decodes only a short window: the ids of the last emitted piece (as context, so that decoders
    that depend on neighbours stay right) plus the ids not yet emitted. Text is held back while the window
    ends in an incomplete UTF-8 sequence (decoded as U+FFFD), so no broken character is ever emitted.
    """

    _PROMPT_CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._window = list(prompt_ids or [])[-self._PROMPT_CONTEXT:]
        self._read = len(self._window)  # window[:_read] is context already emitted; the rest is pending

    def _pending_text(self) -> str:
        prefix_text = self._tok.decode(self._window[:self._read], self._skip)
        text = self._tok.decode(self._window, self._skip)
        return text[len(prefix_text):] if len(text) > len(prefix_text) else ""

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the text it completes (often '', e.g. mid-character)."""
        self._window.append(int(token_id))
        piece = self._pending_text()
        if not piece or piece.endswith("\ufffd"):
            return ""
        del self._window[:self._read]
        self._read = len(self._window)
        return piece

    def flush(self) -> str:
        """Whatever is still held back at the end of generation (an incomplete character shows as U+FFFD)."""
        piece = self._pending_text()
        del self._window[:self._read]
        self._read = len(self._window)
        return piece
