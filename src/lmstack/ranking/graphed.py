"""`BucketedScorer`: the serving-time front end of a `LengthRanker`, cheap enough to run on the engine's thread.

The `ltr` policy scores every arriving request once. Run eagerly on a GPU, a MiniLM forward is ~100 small kernel
launches, and run on a second Python thread it fights the engine loop for the GIL (measured on an H200: 16 ms of
wall time per request, while the requests waited for their scores). Here each batch is padded to a (batch,
length) bucket, powers of two, and on CUDA the forward of each bucket is captured once in a CUDA graph: scoring a
batch is a host-to-device copy, one graph replay and a device-to-host copy, all queued on the engine's stream
without waiting. `launch` returns `PendingScores` at once; the policy collects them at a later step, when
`done()`.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lmstack.errors import LmstackError
from lmstack.ranking.predictor import LengthRanker

log = logging.getLogger(__name__)

MIN_LENGTH_BUCKET = 16


def buckets(lo: int, hi: int) -> list[int]:
    """Powers of two from `lo`, the last one clipped to `hi`: [16, 32, ..., hi]."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return [*out, hi]


def bucket_of(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


@dataclass
class PendingScores:
    """Scores of one launched batch; `index` = positions of its prompts in the `launch` call."""

    index: list[int]
    out: torch.Tensor  # [B, K] float32 on the host (pinned when copied from the GPU); rows past len(index): padding
    ranker: LengthRanker
    done_event: torch.cuda.Event | None = None
    start_event: torch.cuda.Event | None = None
    gpu_s: float = field(default=0.0, init=False)

    def done(self) -> bool:
        return self.done_event is None or self.done_event.query()

    def result(self) -> list[float]:
        """One float per prompt of `index` (waits for the GPU if it is not done); sets `gpu_s`."""
        if self.done_event is not None:
            self.done_event.synchronize()
            if self.start_event is not None:
                self.gpu_s = self.start_event.elapsed_time(self.done_event) / 1e3
        return self.ranker.objective.score(self.out[: len(self.index)]).tolist()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # [B, T] long, on the GPU: what the graph reads
    attention_mask: torch.Tensor  # [B, T] long
    out: torch.Tensor  # [B, K] float32: what the graph writes


class BucketedScorer:
    """Scores prompts in (batch, length) buckets; on CUDA by replaying one CUDA graph per bucket.

    `score` is the synchronous call (same numbers as `LengthRanker.score`, up to padding round-off); `launch`
    queues the work and returns at once. Graphs are captured on first use, or all up front by `capture`.
    """

    def __init__(self, ranker: LengthRanker, max_batch: int = 32, use_graphs: bool | None = None) -> None:
        if max_batch < 1:
            raise LmstackError(f"max_batch must be >= 1, got {max_batch}")
        self.ranker = ranker.eval()
        self.device = ranker.device
        cuda = self.device.type == "cuda"
        self.use_graphs = cuda if use_graphs is None else use_graphs
        if self.use_graphs and not cuda:
            raise LmstackError("CUDA graphs need the ranker on a CUDA device")
        self.batch_sizes = buckets(1, max_batch)
        self.lengths = buckets(min(MIN_LENGTH_BUCKET, ranker.max_length), ranker.max_length)
        self._pad_id = ranker.encoder._pad_id
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_s = 0.0

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def score(self, prompts: list[str]) -> list[float]:
        out = [0.0] * len(prompts)
        for pending in self.launch(prompts):
            for i, s in zip(pending.index, pending.result(), strict=True):
                out[i] = s
        return out

    def launch(self, prompts: list[str]) -> list[PendingScores]:
        """Queue the scoring of `prompts` (shortest first, at most `max_batch` a batch); returns without waiting."""
        if not prompts:
            return []
        ids = self.ranker.encoder.token_ids(prompts, self.ranker.max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        return [self._launch_batch(order[s : s + self.max_batch], ids) for s in range(0, len(order), self.max_batch)]

    def capture(self) -> None:
        """Capture every bucket's graph now (about a second for MiniLM), so that serving never pauses to."""
        for b in self.batch_sizes:
            for t in self.lengths:
                if self.use_graphs:
                    self._graph(b, t)

    def _launch_batch(self, index: list[int], ids: list[list[int]]) -> PendingScores:
        b = bucket_of(len(index), self.batch_sizes)
        t = bucket_of(max(len(ids[i]) for i in index), self.lengths)
        rows = [ids[i] for i in index] + [ids[index[0]]] * (b - len(index))  # no all-padding row: no NaN
        lens = np.array([len(x) for x in rows])
        mask_np = np.arange(t) < lens[:, None]  # [b, t]
        ids_np = np.full((b, t), self._pad_id, dtype=np.int64)
        ids_np[mask_np] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lens.sum()))
        input_ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np.astype(np.int64))  # [b, t] each
        g = self._graph(b, t) if self.use_graphs else None
        if g is None:
            with torch.no_grad():
                out = self.ranker(input_ids.to(self.device), mask.to(self.device)).float().cpu()
            return PendingScores(index, out, self.ranker)
        g.input_ids.copy_(input_ids.pin_memory(), non_blocking=True)
        g.attention_mask.copy_(mask.pin_memory(), non_blocking=True)
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.graph.replay()
        out = torch.empty(g.out.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(g.out, non_blocking=True)
        done.record()
        return PendingScores(index, out, self.ranker, done, start)

    def _graph(self, b: int, t: int) -> _Graph | None:
        """The bucket's graph, captured on first use; None (and eager from then on) if capture fails."""
        g = self._graphs.get((b, t))
        if g is not None:
            return g
        try:
            return self._capture(b, t)
        except RuntimeError as e:  # e.g. an encoder op that cannot be captured: serve eagerly rather than fail
            log.warning("CUDA graph capture of the ranker failed (%s); it runs eagerly from now on", e)
            self.use_graphs = False
            return None

    def _capture(self, b: int, t: int) -> _Graph:
        started = time.perf_counter()
        input_ids = torch.full((b, t), self._pad_id, dtype=torch.long, device=self.device)
        mask = torch.ones((b, t), dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad():
            with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS handles, kernel choice)
                for _ in range(2):
                    self.ranker(input_ids, mask)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.ranker(input_ids, mask).float()  # [b, K]
        g = self._graphs[b, t] = _Graph(graph, input_ids, mask, out)
        self.capture_s += time.perf_counter() - started
        return g
