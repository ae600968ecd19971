"""OpenAI requests → engine requests → OpenAI responses, plain JSON or server-sent events.

Each of a call's choices (prompts x n) is one engine request. The engine's outputs are cumulative, so a
stream sends the text that is new since its last chunk, holding back a tail that could still become a stop
string (the engine cuts a stop string out of the text once it is complete).
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from lmstack.engine.async_engine import AsyncEngine, EngineClosedError
from lmstack.engine.outputs import RequestOutput, TokenLogprob
from lmstack.engine.sampling_params import SamplingParams
from lmstack.models.tokenizer import Tokenizer
from lmstack.server.errors import engine_errors, to_api_error
from lmstack.server.metrics import ServerMetrics
from lmstack.server.protocol import (
    ApiError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)
from lmstack.server.sse import ClientDisconnected, SSEResponse, TextChunks, held_back, sse, until_disconnected

Events = AsyncGenerator[tuple[int, RequestOutput], None]


@dataclass
class _Prompt:
    token_ids: list[int]
    text: str | None


@dataclass
class _ChoiceState:
    """How much of one choice's cumulative output the stream has already sent."""

    text_sent: int = 0
    logprobs_sent: int = 0
    token_offset: int = 0  # characters of the token strings sent, for completions' text_offset
    started: bool = False


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.token_str: Callable[[int], str] = functools.lru_cache(maxsize=1 << 16)(self._decode_token)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ----- endpoints -----
    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(req.model)
        messages = [m.as_template_message() for m in req.messages]
        with engine_errors():
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt = _Prompt(self.tokenizer.encode(text, add_special_tokens=False), text)
        events, num_choices = self._submit(req, [prompt], req.max_new_tokens, req.num_logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return await self._stream(request, self._chat_chunks(req, rid, events, [prompt], num_choices))
        finals = await self._collect(request, events, num_choices)
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content=out.outputs[0].text),
                              logprobs=self._chat_logprobs(out.outputs[0].logprobs) if req.logprobs else None,
                              finish_reason=out.outputs[0].finish_reason) for i, out in enumerate(finals)]
        body = ChatCompletionResponse(id=rid, model=self.model_name, choices=choices, usage=_usage([prompt], finals))
        return Response(body.model_dump_json(), media_type="application/json")

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self._check_model(req.model)
        prompts = [_Prompt(self.tokenizer.encode(p, add_special_tokens=True), p) if isinstance(p, str)
                   else _Prompt(list(p), None) for p in req.prompts]
        events, num_choices = self._submit(req, prompts, req.max_tokens, req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return await self._stream(request, self._completion_chunks(req, rid, events, prompts, num_choices))
        finals = await self._collect(request, events, num_choices)
        choices = [CompletionChoice(index=i, text=out.outputs[0].text, finish_reason=out.outputs[0].finish_reason,
                                    logprobs=self._completion_logprobs(out.outputs[0].logprobs, 0)
                                    if req.logprobs is not None else None) for i, out in enumerate(finals)]
        body = CompletionResponse(id=rid, model=self.model_name, choices=choices, usage=_usage(prompts, finals))
        return Response(body.model_dump_json(), media_type="application/json")

    # ----- shared plumbing -----
    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def _submit(self, req: SamplingFields, prompts: list[_Prompt], max_tokens: int | None,
                logprobs: int | None) -> tuple[Events, int]:
        """Check lengths, build each choice's SamplingParams and start its engine request (lazily)."""
        limit = self.engine.max_model_len
        gens: list[AsyncGenerator[RequestOutput, None]] = []
        for p_index, p in enumerate(prompts):
            n_prompt = len(p.token_ids)
            want = max_tokens if max_tokens is not None else max(1, limit - n_prompt)
            if n_prompt + want > limit:
                raise ApiError(
                    400, f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{n_prompt + want} tokens ({n_prompt} in the prompt, {want} for the completion). "
                    "Please reduce the prompt or the completion length.",
                    param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                    code="context_length_exceeded")
            for j in range(req.n):
                index = p_index * req.n + j
                with engine_errors():
                    params = SamplingParams(
                        max_tokens=want, temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                        min_p=req.min_p or 0.0, seed=None if req.seed is None else req.seed + index,
                        stop=req.stop_list, ignore_eos=req.ignore_eos, logprobs=logprobs)
                gens.append(self.engine.generate(p.token_ids, params, prompt=p.text))
        return self._merge(gens), len(gens)

    async def _merge(self, gens: list[AsyncGenerator[RequestOutput, None]]) -> Events:
        """Outputs of all choices as (index, output), in arrival order; closing it aborts the unfinished ones."""
        finished: set[int] = set()
        queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

        async def pump(i: int, gen: AsyncGenerator[RequestOutput, None]) -> None:
            try:
                async for out in gen:
                    queue.put_nowait((i, out))
            except Exception as e:
                queue.put_nowait((i, e))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)] if len(gens) > 1 else []
        try:
            if not tasks:
                async for out in gens[0]:
                    if out.finished:
                        finished.add(0)
                        self.metrics.observe_finished(out)
                    yield 0, out
                return
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                if item.finished:
                    finished.add(i)
                    self.metrics.observe_finished(item)
                yield i, item
        except (GeneratorExit, asyncio.CancelledError):  # the client went away
            self.metrics.aborted.inc(len(gens) - len(finished))
            raise
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for g in gens:
                await g.aclose()

    async def _collect(self, request: Request, events: Events, num_choices: int) -> list[RequestOutput]:
        async def last_outputs() -> list[RequestOutput]:
            finals: dict[int, RequestOutput] = {}
            try:
                async for i, out in events:
                    if out.finished:
                        finals[i] = out
            finally:
                await events.aclose()
            if len(finals) < num_choices:
                raise EngineClosedError("the request was aborted before it finished")
            return [finals[i] for i in range(num_choices)]

        try:
            with engine_errors():
                return await until_disconnected(request, last_outputs())
        except ClientDisconnected:
            raise ApiError(499, "client closed the request") from None

    async def _stream(self, request: Request, chunks: AsyncGenerator[bytes, None]) -> Response:
        """Wait for the first chunk (so that refusals are real HTTP errors), then stream the rest as SSE."""
        try:
            with engine_errors():
                first = await until_disconnected(request, chunks.__anext__())
        except ClientDisconnected:
            await chunks.aclose()
            raise ApiError(499, "client closed the request") from None
        except BaseException:
            await chunks.aclose()
            raise

        async def body() -> AsyncGenerator[bytes, None]:
            try:
                yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()

        return SSEResponse(body())

    async def _sse_events(self, events: Events, num_choices: int, stops: list[str],
                          render: Callable[[int, _ChoiceState, str, list[TokenLogprob] | None, str | None], str],
                          usage: Callable[[list[RequestOutput]], str] | None) -> AsyncGenerator[bytes, None]:
        """SSE chunks of new text per choice, then the usage chunk if asked, then [DONE].

        An error before the first chunk propagates (it becomes an HTTP error); after it, it is sent as an
        error event, since the status line has gone.
        """
        states = [_ChoiceState() for _ in range(num_choices)]
        finals: dict[int, RequestOutput] = {}
        sent = False
        try:
            async for i, out in events:
                c, st = out.outputs[0], states[i]
                end = len(c.text) if out.finished else len(c.text) - held_back(c.text, stops)
                text = c.text[st.text_sent:end]
                lps = c.logprobs[st.logprobs_sent:] if c.logprobs is not None else None
                if not text and not lps and not out.finished:
                    continue
                payload = render(i, st, text, lps, c.finish_reason if out.finished else None)
                st.text_sent = max(st.text_sent, end)
                st.logprobs_sent = len(c.logprobs or [])
                st.started = True
                if out.finished:
                    finals[i] = out
                sent = True
                yield sse(payload)
            if usage is not None:
                yield sse(usage([finals[i] for i in sorted(finals)]))
        except Exception as e:
            if not sent:
                raise
            yield sse(to_api_error(e).body().model_dump_json())
        finally:
            await events.aclose()
        yield sse("[DONE]")

    def _chat_chunks(self, req: ChatCompletionRequest, rid: str, events: Events, prompts: list[_Prompt],
                     num_choices: int) -> AsyncGenerator[bytes, None]:
        created = int(time.time())
        plain = TextChunks(lambda i, text: ChatCompletionChunk(
            id=rid, created=created, model=self.model_name,
            choices=[ChatChunkChoice(index=i, delta=ChatDelta(content=text))]))

        def render(i: int, st: _ChoiceState, text: str, lps: list[TokenLogprob] | None, finish: str | None) -> str:
            if st.started and finish is None and not req.logprobs:
                return plain(i, text)
            delta = ChatDelta(role=None if st.started else "assistant", content=text)
            choice = ChatChunkChoice(index=i, delta=delta, finish_reason=finish,
                                     logprobs=self._chat_logprobs(lps) if req.logprobs else None)
            return ChatCompletionChunk(id=rid, created=created, model=self.model_name,
                                       choices=[choice]).model_dump_json()

        def usage(finals: list[RequestOutput]) -> str:
            return ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=[],
                                       usage=_usage(prompts, finals)).model_dump_json()

        return self._sse_events(events, num_choices, req.stop_list, render, usage if req.include_usage else None)

    def _completion_chunks(self, req: CompletionRequest, rid: str, events: Events, prompts: list[_Prompt],
                           num_choices: int) -> AsyncGenerator[bytes, None]:
        created = int(time.time())
        plain = TextChunks(lambda i, text: CompletionResponse(id=rid, created=created, model=self.model_name,
                                                               choices=[CompletionChoice(index=i, text=text)]))

        def render(i: int, st: _ChoiceState, text: str, lps: list[TokenLogprob] | None, finish: str | None) -> str:
            if finish is None and req.logprobs is None:
                return plain(i, text)
            logprobs = None
            if req.logprobs is not None:
                logprobs = self._completion_logprobs(lps or [], st.token_offset)
                st.token_offset += sum(len(t) for t in logprobs.tokens)
            choice = CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=finish)
            return CompletionResponse(id=rid, created=created, model=self.model_name,
                                      choices=[choice]).model_dump_json()

        def usage(finals: list[RequestOutput]) -> str:
            return CompletionResponse(id=rid, created=created, model=self.model_name, choices=[],
                                      usage=_usage(prompts, finals)).model_dump_json()

        return self._sse_events(events, num_choices, req.stop_list, render, usage if req.include_usage else None)

    # ----- logprobs -----
    def _top(self, lp: TokenLogprob) -> list[tuple[str, float]]:
        return [(self.token_str(t), v) for t, v in sorted(lp.top.items(), key=lambda kv: -kv[1])]

    def _chat_logprobs(self, lps: list[TokenLogprob] | None) -> ChatLogprobs:
        entries = []
        for lp in lps or []:
            s = self.token_str(lp.token_id)
            top = [TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in self._top(lp)]
            entries.append(TokenLogprobEntry(token=s, logprob=lp.logprob, bytes=list(s.encode()), top_logprobs=top))
        return ChatLogprobs(content=entries)

    def _completion_logprobs(self, lps: list[TokenLogprob] | None, offset: int) -> CompletionLogprobs:
        """Legacy completions logprobs; `text_offset` counts characters from the start of the completion."""
        out = CompletionLogprobs()
        for lp in lps or []:
            s = self.token_str(lp.token_id)
            out.tokens.append(s)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append(dict(self._top(lp)))
            out.text_offset.append(offset)
            offset += len(s)
        return out


def _usage(prompts: list[_Prompt], finals: list[RequestOutput]) -> Usage:
    """OpenAI counts each prompt once, however many choices it has."""
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(out.outputs[0].token_ids) for out in finals)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)
