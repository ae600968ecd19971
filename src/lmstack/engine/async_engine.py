"""An asyncio front for `LLMEngine`: one background thread steps the engine, coroutines await their outputs.

The engine is not thread-safe, so only the engine thread touches it. Coroutines hand it commands (add,
abort) through a lock-protected queue that the thread applies between steps; the thread hands outputs back
with one `call_soon_threadsafe` per event loop per step. A step's outputs are handed over once the next
step's forward is queued on the device, so the event loops' work on them (a server writing one chunk per
stream) overlaps the device rather than competing with the engine thread for the GIL while it prepares the
next step; when no step follows, they are handed over at once. Each request has a one-slot mailbox rather than a
queue: outputs are cumulative, so a slow consumer only ever needs the latest, and memory stays bounded. When
there is no work the thread sleeps on a condition variable, so an idle server costs no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from lmstack.engine.llm_engine import LLMEngine
from lmstack.engine.outputs import RequestOutput
from lmstack.engine.sampling_params import SamplingParams
from lmstack.errors import LmstackError, RequestError

log = logging.getLogger(__name__)


class QueueFullError(LmstackError):
    """Too many requests are already waiting; the client should retry later."""


class EngineClosedError(LmstackError):
    """The engine is shutting down (or has shut down) and takes no new requests."""


class EngineStepError(RuntimeError):
    """The engine failed while running a request; the request cannot finish."""


@dataclass(frozen=True)
class EngineStats:
    running: int = 0
    waiting: int = 0  # queued in the scheduler, plus submitted but not yet handed to it
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0


@dataclass
class _Stream:
    """One request's mailbox, touched only on its event loop: the latest output, then how it ended."""

    loop: asyncio.AbstractEventLoop
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    latest: RequestOutput | None = None
    ended: bool = False  # aborted (error None) or failed (error set)
    error: BaseException | None = None

    def put(self, item: RequestOutput | BaseException | None) -> None:
        if isinstance(item, RequestOutput):
            self.latest = item
        else:
            self.ended, self.error = True, item
        self.wakeup.set()


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    priority: int
    stream: _Stream


@dataclass
class _Abort:
    request_id: str


_Item = RequestOutput | BaseException | None


class AsyncEngine:
    """Serves many concurrent `generate()` calls from any number of event loops over one `LLMEngine`."""

    def __init__(self, engine: LLMEngine, max_queue: int | None = None) -> None:
        if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 1):
            raise LmstackError(f"max_queue must be a positive integer (or unset), got {max_queue!r}")
        self.engine = engine
        engine.config.stream_text = True  # streamed responses need each step's text
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._commands: deque[_Add | _Abort] = deque()
        self._pending_adds = 0
        self._live: set[str] = set()  # ids of generate() calls not yet returned, for duplicate checks
        self._accepting = True
        self._stopping = False
        self._idle = threading.Event()
        self._streams: dict[str, _Stream] = {}  # owned by the engine thread
        self._stats = EngineStats(kv_blocks_total=engine.blocks.num_blocks - 1)
        self._thread = threading.Thread(target=self._run, name="lmstack-engine", daemon=True)
        self._thread.start()

    # ----- the coroutine side -----
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        """False once the engine thread has stopped (shut down, or died)."""
        return self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stats(self) -> EngineStats:
        """Load as of the last step; safe to call from any thread."""
        s = self._stats
        return EngineStats(s.running, s.waiting + self._pending_adds, s.kv_blocks_used, s.kv_blocks_total)

    def step_stats(self) -> dict[str, float]:
        """Cumulative step counts and seconds per phase (schedule, forward, sample, postprocess)."""
        return dict(self.engine.stats)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       prompt: str | None = None, priority: int = 0) -> AsyncGenerator[RequestOutput, None]:
        """Cumulative outputs of one request, the last one `finished`.

        Raises `QueueFullError`/`EngineClosedError` when the request is refused and `RequestError` when the
        engine rejects it, both at the first iteration. When the consumer stops early (breaks, is cancelled,
        closes the iterator) the request is aborted and its KV blocks are freed. A consumer that falls behind
        gets only the latest output: outputs are cumulative, so nothing is lost.
        """
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop())
        with self._cond:
            if not self._accepting:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            if request_id in self._live:
                raise RequestError(f"request id {request_id!r} is already in use")
            if self.max_queue is not None and self.stats().waiting >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._live.add(request_id)
            self._pending_adds += 1
            self._submit(_Add(request_id, list(prompt_token_ids), params, prompt, priority, stream))
        done = False
        try:
            while True:
                if stream.latest is None and not stream.ended:
                    stream.wakeup.clear()
                    await stream.wakeup.wait()
                out, stream.latest = stream.latest, None
                if out is None:  # ended: aborted, or failed
                    done = True
                    if stream.error is not None:
                        raise stream.error
                    return
                done = out.finished
                yield out
                if done:
                    return
        finally:
            with self._cond:
                self._live.discard(request_id)
                if not done:
                    self._submit(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        """Stop a request; its `generate()` ends without a finished output. Unknown ids are ignored."""
        with self._cond:
            self._submit(_Abort(request_id))

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to `drain_timeout` s, then stop the thread.

        Requests still unfinished after the timeout fail with `EngineClosedError`.
        """
        with self._cond:
            self._accepting = False
        await asyncio.to_thread(self._idle.wait, max(0.0, drain_timeout))
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    def _submit(self, command: _Add | _Abort) -> None:
        """Queue a command for the engine thread; the caller holds `_cond`."""
        self._commands.append(command)
        self._idle.clear()
        self._cond.notify()

    # ----- the engine thread -----
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a bug in the loop itself: fail everyone rather than hang them
            log.exception("the engine thread crashed")
            with self._cond:
                self._accepting = False
                pending = [c.stream for c in self._commands if isinstance(c, _Add)]
                self._commands.clear()
            streams = [*self._streams.values(), *pending]
            self._send([(s, EngineStepError(f"the engine thread crashed: {e!r}")) for s in streams])
            self._streams.clear()
        finally:
            self._accepting = False
            self._idle.set()

    def _loop(self) -> None:
        held: list[tuple[_Stream, _Item]] = []  # the last step's outputs, handed over during the next forward
        while True:
            with self._cond:
                while not self._commands and not self.engine.has_unfinished and not self._stopping:
                    self._idle.set()
                    self._cond.wait()
                outbox = self._apply(self._commands)
                self._commands = deque()
                self._pending_adds = 0
                self._publish_stats()
                stop = self._stopping
            self._send(outbox)
            if stop:
                self._send(held)
                break
            if self.engine.has_unfinished:
                outbox = self._step(held)
                with self._cond:
                    self._publish_stats()
                held = outbox
            if not self.engine.has_unfinished:
                self._send(held)
                held = []
        for rid in self._streams:
            self.engine.abort_request(rid)
        self._send([(s, EngineClosedError("the server shut down before this request finished"))
                    for s in self._streams.values()])
        self._streams.clear()
        with self._cond:
            self._publish_stats()

    def _apply(self, commands: deque[_Add | _Abort]) -> list[tuple[_Stream, _Item]]:
        outbox: list[tuple[_Stream, _Item]] = []
        for c in commands:
            if isinstance(c, _Abort):
                stream = self._streams.pop(c.request_id, None)
                if stream is not None:
                    self.engine.abort_request(c.request_id)
                    outbox.append((stream, None))
                continue
            try:
                self.engine.add_request(c.prompt_token_ids, c.params, request_id=c.request_id, prompt=c.prompt,
                                        priority=c.priority)
            except LmstackError as e:
                outbox.append((c.stream, e))
            except Exception as e:
                log.exception("add_request failed for %s", c.request_id)
                outbox.append((c.stream, EngineStepError(f"the engine could not take the request: {e!r}")))
            else:
                self._streams[c.request_id] = c.stream
        return outbox

    def _step(self, held: list[tuple[_Stream, _Item]]) -> list[tuple[_Stream, _Item]]:
        """One engine step that hands `held` over once its forward is queued (or when it ends, if it queued
        none). If the step fails, every request in the engine fails with the error and is dropped."""
        pending = [held]

        def hand_over() -> None:
            if pending:
                self._send(pending.pop())

        try:
            outputs = self.engine.step(on_launch=hand_over)
        except Exception as e:
            hand_over()
            log.exception("engine step failed; failing %d requests", len(self._streams))
            outbox: list[tuple[_Stream, _Item]] = []
            for rid, stream in list(self._streams.items()):
                outbox.append((stream, EngineStepError(f"the engine failed while generating: {e!r}")))
                try:
                    self.engine.abort_request(rid)
                except Exception:
                    log.exception("could not abort %s after the failure", rid)
            self._streams.clear()
            return outbox
        hand_over()
        outbox = []
        for out in outputs:
            stream = self._streams.pop(out.request_id) if out.finished else self._streams.get(out.request_id)
            if stream is not None:
                outbox.append((stream, out))
        return outbox

    def _publish_stats(self) -> None:
        sched = self.engine.scheduler
        self._stats = EngineStats(len(sched.running), len(sched.waiting), self.engine.blocks.num_used,
                                  self.engine.blocks.num_blocks - 1)

    def _send(self, outbox: list[tuple[_Stream, _Item]]) -> None:
        """Deliver items with one thread-safe callback per event loop; a closed loop's requests are aborted."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, _Item]]] = defaultdict(list)
        for stream, item in outbox:
            by_loop[stream.loop].append((stream, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for rid, stream in list(self._streams.items()):
                    if stream.loop is loop:
                        del self._streams[rid]
                        self.engine.abort_request(rid)


def _deliver(items: list[tuple[_Stream, _Item]]) -> None:
    for stream, item in items:
        stream.put(item)
