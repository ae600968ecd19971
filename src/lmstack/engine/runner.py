"""Runs one scheduled step on the device: builds the flat batch, calls the model, samples.

Owns the KV cache (sized from a memory budget) and, on CUDA, the captured graphs of decode steps:
a decode step's kernels are replayed from the graph of the next larger captured batch size and context
bound (a short bound lets the attention kernel split short contexts finely). All graphs share one full-width
block table; each step copies in only the columns its sequences use. A backend that captures lazily (one
graph per context bucket met) keeps at most `max_lazy_graphs`, dropping the least recently replayed: each
graph holds its own logits buffer (batch x vocabulary), so a long-running server must not keep them all.

Speculative decoding turns on *chunk graphs* (`enable_chunk_graphs`): a step whose chunks all sample and are
at most a few tokens long (a verify step: each request's token plus its proposals; a draft's catch-up) replays
the graph of its (batch size, chunk length) bucket, all captured up front. Such a graph stops at the hidden
states: the logits of the rows that sample are computed after it, so no graph holds a logits buffer. Every
row of it has the bucket's length q: a shorter chunk is padded at its end with tokens whose K/V go to the
reserved slot 0 (causal attention keeps them out of the real tokens' rows), and padding rows are q-token
sequences at positions 0..q-1, so every value the graph computes stays finite.

Every other step of up to `token_graph_tokens` tokens (prefills, mixed steps) replays a *token graph*
(engine/token_graphs.py): eagerly, such a step cost the H200's host 14-25 ms of launches whatever its length.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

import numpy as np
import torch

from lmstack.engine.attention import ATTENTION_BACKENDS, AttentionBackend, AttentionMetadata
from lmstack.engine.config import EngineConfig
from lmstack.engine.outputs import TokenLogprob
from lmstack.engine.sampler import Sampler
from lmstack.engine.scheduler import ScheduledChunk, SchedulerOutput
from lmstack.engine.step_arrays import StepArrays
from lmstack.engine.token_graphs import TokenGraphs
from lmstack.errors import LmstackError
from lmstack.models.config import ModelConfig
from lmstack.models.llama import LlamaModel

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

GRAPH_BATCH_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]
CHUNK_GRAPH_MAX_ROWS = 512  # tokens (batch bucket x chunk length) of a chunk graph


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def lru_get(cache: OrderedDict[K, V], key: K, make: Callable[[], V], max_size: int | None) -> V:
    """cache[key], marked most recently used; on a miss `make()`s it, first dropping the least recently used
    entries beyond `max_size - 1` (None: no limit)."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    while max_size is not None and cache and len(cache) >= max_size:
        cache.popitem(last=False)
    value = cache[key] = make()
    return value


class ModelRunner:
    def __init__(self, model: LlamaModel, cfg: EngineConfig, max_model_len: int) -> None:
        self.model = model
        self.cfg = cfg
        self.model_cfg = model.config
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.block_size = cfg.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // cfg.block_size)
        backend = cfg.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend not in ATTENTION_BACKENDS:
            raise LmstackError(f"unknown attention backend {backend!r}; choose from {', '.join(ATTENTION_BACKENDS)}")
        backend_cls = ATTENTION_BACKENDS[backend]
        # Side caches of the backend (Double Sparsity's labels) share the KV memory budget.
        self.extra_bytes_per_token = backend_cls.cache_bytes_per_token(self.model_cfg, self.dtype,
                                                                       cfg.attention_options)
        self.num_blocks = self._num_blocks()
        shape = (self.num_blocks, cfg.block_size, self.model_cfg.num_key_value_heads, self.model_cfg.head_dim)
        # Zeroed, not empty: batched paths gather padding slots and weight them by exactly 0, which is only
        # harmless while every slot holds a finite value (0 × NaN from never-written memory is NaN).
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(self.model_cfg.num_hidden_layers)
        ]
        self.backend: AttentionBackend = backend_cls.create(self.kv_caches, self.model_cfg, cfg.attention_options)
        self.sampler = Sampler(self.device, cfg.seed)
        self.use_graphs = self.device.type == "cuda" and not cfg.enforce_eager and self.backend.supports_cuda_graphs
        self.sync_timing = False  # profiling: wait for the device after the forward, so timings split truly
        self.graphs: OrderedDict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = OrderedDict()
        self.graph_pool: tuple[int, int] | None = None
        self.graph_contexts = self.backend.graph_contexts(max_model_len)
        self.chunk_graph_len = 0  # longest chunk a chunk graph replays; 0: chunk graphs off
        self.last_chunk_graph: tuple[int, int] | None = None  # (batch bucket, chunk length) the last forward replayed
        self.last_graphed = False  # whether the last forward replayed a graph (decode, chunk or token)
        self.chunk_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # The bucket that holds a full batch: rounding down would leave batches between the largest bucket below
        # max_num_seqs and max_num_seqs (9-12 of 12) to run eagerly.
        self.max_graph_bs = (next((b for b in GRAPH_BATCH_SIZES if b >= cfg.max_num_seqs), GRAPH_BATCH_SIZES[-1])
                             if self.use_graphs else 0)
        self.token_graphs: TokenGraphs | None = None
        if self.use_graphs:
            self._capture_all()
            if self.backend.supports_chunk_graphs and cfg.token_graph_tokens:
                self.token_graphs = TokenGraphs(self, cfg.token_graph_tokens)
                self.token_graphs.capture_all()

    # ----- memory -----
    def _num_blocks(self) -> int:
        per_block = (kv_bytes_per_block(self.model_cfg, self.block_size, self.dtype)
                     + self.block_size * self.extra_bytes_per_token)
        if self.cfg.num_kv_blocks is not None:
            return self.cfg.num_kv_blocks
        if self.cfg.kv_cache_memory is not None:
            budget = self.cfg.kv_cache_memory
        elif self.device.type == "cuda":
            budget = self._cuda_budget()
        else:
            budget = 2 * 1024**3
        n = int(budget // per_block)
        min_blocks = self.max_blocks_per_seq + 1
        if n < min_blocks:
            raise LmstackError(
                f"the KV cache budget ({budget / 2**30:.2f} GiB) holds {n} blocks, fewer than one full-length "
                f"sequence needs ({min_blocks}); lower max_model_len or raise the memory budget"
            )
        return n

    def _cuda_budget(self) -> float:
        """What is left of gpu_memory_utilization × total after the weights and a peak-sized forward."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        n = min(self.cfg.max_num_batched_tokens, self.max_model_len)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)
        probe = AttentionBackend(None)
        probe.meta = AttentionMetadata(
            slot_mapping=ids, query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            block_tables=torch.zeros(1, 1, dtype=torch.int32, device=self.device),
            query_start_loc_cpu=[0, n], seq_lens_cpu=[n], max_query_len=n, max_seq_len=n)
        with torch.inference_mode():
            hidden = self.model(ids, pos, probe)
            self.model.compute_logits(hidden[-min(n, self.cfg.max_num_seqs):])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        total = torch.cuda.get_device_properties(self.device).total_memory
        del hidden
        torch.cuda.empty_cache()
        return total * self.cfg.gpu_memory_utilization - peak

    # ----- inputs -----
    def _prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        a = StepArrays.of(sched.chunks)
        bs, dev = self.block_size, self.device
        qsl = np.concatenate([[0], np.cumsum(a.lengths)])
        seq_lens = a.starts + a.lengths
        width = int(-(-seq_lens.max() // bs))  # the blocks the step reads
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(a.slots(bs)).to(dev, non_blocking=True),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev, non_blocking=True),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(np.ascontiguousarray(a.tables[:, :width])).to(dev, non_blocking=True),
            query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens.tolist(),
            max_query_len=int(a.lengths.max()), max_seq_len=int(seq_lens.max()),
        )
        input_ids = torch.from_numpy(a.tokens).to(dev, non_blocking=True)
        positions = torch.from_numpy(a.positions()).to(dev, non_blocking=True)
        return input_ids, positions, meta, a.picks(qsl[:-1]).tolist()

    # ----- execution -----
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, timings: dict[str, float] | None = None,
                on_launch: Callable[[], None] | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
        """Run the step; return the next token (and logprobs) of each chunk that samples, in order.

        `on_launch` runs once the forward is queued on the device and before waiting for it: CPU work done there
        (e.g. a server streaming the previous step's tokens) overlaps the device instead of delaying it.
        """
        t0 = time.perf_counter()
        sampling = [c.seq for c in sched.chunks if c.samples]
        logits = self.forward_logits(sched, timings)
        if on_launch is not None:
            on_launch()
        if self.sync_timing and self.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        if not sampling:
            return [], []
        tokens, logprobs = self.sampler(logits, sampling)
        if timings is not None:
            t2 = time.perf_counter()
            timings["forward_s"] = timings.get("forward_s", 0.0) + (t1 - t0)
            timings["sample_s"] = timings.get("sample_s", 0.0) + (t2 - t1)
        return tokens, logprobs

    @torch.inference_mode()
    def forward_logits(self, sched: SchedulerOutput, timings: dict[str, float] | None = None) -> torch.Tensor | None:
        """The step's forward; logits [R, V] of the rows that sample, in chunk order (1 + len(spec_tokens) per
        sampling chunk), or None when no chunk samples. Decode steps replay a CUDA graph when one is captured."""
        decode_graph = self.use_graphs and sched.is_decode and len(sched.chunks) <= self.max_graph_bs
        chunk_shape = None if decode_graph or not self.use_graphs else self._chunk_graph_shape(sched)
        token_key = None
        if self.use_graphs and not decode_graph and chunk_shape is None and self.token_graphs is not None:
            token_key = self.token_graphs.key(sched)
        self.last_chunk_graph = chunk_shape
        self.last_graphed = decode_graph or chunk_shape is not None or token_key is not None
        if self.last_graphed:
            if timings is not None:
                for name, counted in (("graph_steps", True), ("chunk_graph_steps", chunk_shape is not None),
                                      ("token_graph_steps", token_key is not None)):
                    if counted:
                        timings[name] = timings.get(name, 0) + 1
            if token_key is not None:
                return self.token_graphs.run(sched, *token_key)
            return self._run_graph(sched) if chunk_shape is None else self._run_chunk_graph(sched, *chunk_shape)
        input_ids, positions, meta, rows = self._prepare(sched)
        self.backend.meta = meta
        hidden = self.model(input_ids, positions, self.backend)
        return self.model.compute_logits(hidden[rows]) if rows else None

    # ----- CUDA graphs -----
    def _capture_all(self) -> None:
        """Static input buffers, then every graph up front, largest first, so all share one memory pool
        (a backend with `lazy_graphs` captures each on first use instead, into the same pool)."""
        b, dev = self.max_graph_bs, self.device
        self.s_ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.s_pos = torch.zeros(b, dtype=torch.long, device=dev)
        self.s_slots = torch.zeros(b, dtype=torch.long, device=dev)  # slot 0 lies in the reserved block
        self.s_seq_lens = torch.zeros(b, dtype=torch.int32, device=dev)
        self.s_qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self.s_tables = torch.zeros((b, self.max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.h_buf = torch.zeros(4 * b, dtype=torch.long).pin_memory()
        if self.backend.lazy_graphs:
            return
        sizes = sorted((x for x in GRAPH_BATCH_SIZES if x <= b), reverse=True)
        for bs, context in ((bs, c) for bs in sizes for c in reversed(self.graph_contexts)):
            self.graphs[bs, context] = self._capture(bs, context)
        torch.cuda.synchronize()

    def _capture(self, bs: int, context: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the decode forward of `bs` rows attending to at most `context` tokens, from the static buffers.

        The warm-up passes run on whatever the buffers hold: placeholders up front (slot 0 is reserved), or
        the current step's inputs when captured lazily, whose K/V they write exactly as the replay will."""
        meta = AttentionMetadata(
            slot_mapping=self.s_slots[:bs], query_start_loc=self.s_qsl[: bs + 1], seq_lens=self.s_seq_lens[:bs],
            block_tables=self.s_tables[:bs], query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[1] * bs,
            max_query_len=1, max_seq_len=context, graph_bound=True,
        )
        self.backend.meta = meta
        with torch.inference_mode():
            for _ in range(2):  # compile kernels and settle allocations outside the capture
                self.model.compute_logits(self.model(self.s_ids[:bs], self.s_pos[:bs], self.backend))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                logits = self.model.compute_logits(self.model(self.s_ids[:bs], self.s_pos[:bs], self.backend))
        self.graph_pool = graph.pool()
        return graph, logits

    def _run_graph(self, sched: SchedulerOutput) -> torch.Tensor:
        n = len(sched.chunks)
        bs = next(b for b in GRAPH_BATCH_SIZES if b >= n)
        blk = self.block_size
        pad = [0] * (bs - n)
        rows = [
            [c.seq.token_at(c.start) for c in sched.chunks] + pad,
            [c.start for c in sched.chunks] + pad,
            [c.seq.block_table[c.start // blk] * blk + c.start % blk for c in sched.chunks] + pad,
            [c.start + 1 for c in sched.chunks] + pad,  # seq_len 0 on padded rows: the kernel skips them
        ]
        h = self.h_buf[: 4 * bs].view(4, bs)  # contiguous pinned staging: one async host-to-device copy
        h.copy_(torch.tensor(rows, dtype=torch.long))
        width = max(len(c.seq.block_table) for c in sched.chunks)
        host_tables = np.zeros((n, width), dtype=np.int32)
        for i, c in enumerate(sched.chunks):
            t = c.seq.block_table
            host_tables[i, : len(t)] = t
        # Columns past a row's length hold stale ids; the kernel never reads past seq_len.
        self.s_tables[:n, :width].copy_(torch.from_numpy(host_tables))
        dev_h = h.to(self.device, non_blocking=True)
        self.s_ids[:bs].copy_(dev_h[0])
        self.s_pos[:bs].copy_(dev_h[1])
        self.s_slots[:bs].copy_(dev_h[2])
        self.s_seq_lens[:bs].copy_(dev_h[3])
        longest = max(rows[3])
        key = (bs, next(c for c in self.graph_contexts if c >= longest))
        limit = self.cfg.max_lazy_graphs if self.backend.lazy_graphs else None
        graph, logits = lru_get(self.graphs, key, lambda: self._capture(*key), limit)
        graph.replay()
        return logits[:n]

    # ----- chunk graphs (speculative steps) -----
    def enable_chunk_graphs(self, max_len: int) -> None:
        """Capture chunk graphs for every batch bucket and chunk length 2..`max_len` (CUDA only; a no-op where
        decode steps run eagerly too, or for a backend without chunk-graph support)."""
        if not self.use_graphs or not self.backend.supports_chunk_graphs or max_len <= self.chunk_graph_len:
            return
        if not self.chunk_graph_len:
            rows, b, dev = CHUNK_GRAPH_MAX_ROWS, self.max_graph_bs, self.device
            self.c_ids = torch.zeros(rows, dtype=torch.long, device=dev)
            self.c_pos = torch.zeros(rows, dtype=torch.long, device=dev)
            self.c_slots = torch.zeros(rows, dtype=torch.long, device=dev)
            self.c_seq_lens = torch.zeros(b, dtype=torch.int32, device=dev)
            self.c_qsl = torch.zeros(b + 1, dtype=torch.int32, device=dev)
            # Staging of ids, positions, slots, sampled rows (rows each), seq_lens (b) and query starts (b + 1).
            self.c_host = torch.zeros(4 * rows + 2 * b + 1, dtype=torch.long).pin_memory()
        for q in range(max(2, self.chunk_graph_len + 1), max_len + 1):
            for bs in (b for b in GRAPH_BATCH_SIZES if b <= self.max_graph_bs and b * q <= CHUNK_GRAPH_MAX_ROWS):
                self._stage_chunks([], bs, q)  # warm-up inputs: padding rows only
                self.chunk_graphs[bs, q] = self._capture_chunk(bs, q)
        torch.cuda.synchronize()
        self.chunk_graph_len = max_len

    def chunk_graph_bound(self, num_chunks: int) -> tuple[int, int]:
        """(batch bucket, longest chunk) of the chunk graphs that can replay a step of `num_chunks` chunks that
        all sample: one of longest chunk up to the bound runs padded to it; (0, 0) when none can."""
        if not self.chunk_graph_len or not 0 < num_chunks <= self.max_graph_bs:
            return 0, 0
        bs = next(b for b in GRAPH_BATCH_SIZES if b >= num_chunks)
        return bs, max((q for q in range(2, self.chunk_graph_len + 1) if (bs, q) in self.chunk_graphs), default=0)

    def _chunk_graph_shape(self, sched: SchedulerOutput) -> tuple[int, int] | None:
        """(batch bucket, chunk length) of the chunk graph that can replay this step, or None (run it eagerly)."""
        n = len(sched.chunks)
        if not self.chunk_graph_len or not 0 < n <= self.max_graph_bs:
            return None
        key = next(b for b in GRAPH_BATCH_SIZES if b >= n), max(c.num_tokens + len(c.spec_tokens) for c in sched.chunks)
        if (key not in self.chunk_graphs or not all(c.samples for c in sched.chunks)
                or any(c.start + key[1] > self.max_model_len for c in sched.chunks)):  # padding stays in the table
            return None
        return key

    def _stage_chunks(self, chunks: list[ScheduledChunk], bs: int, q: int) -> torch.Tensor:
        """Copy the step's inputs, padded to `bs` rows of `q` tokens, into the static buffers; return the rows
        whose logits the step samples (device, in chunk order)."""
        rows, blk = bs * q, self.block_size
        host = self.c_host[: 4 * rows + 2 * bs + 1]
        h = host.numpy()
        ids, pos, slots, picks = (h[i * rows: (i + 1) * rows] for i in range(4))
        seq_lens, qsl = h[4 * rows: 4 * rows + bs], h[4 * rows + bs:]
        h[:] = 0  # padding tokens: id 0 into slot 0 (the reserved block)
        pos[:] = np.tile(np.arange(q), bs)  # padding rows: q-token sequences at positions 0..q-1
        seq_lens[:] = q
        qsl[:] = np.arange(bs + 1) * q
        num_picks = 0
        if chunks:
            a, n = StepArrays.of(chunks), len(chunks)
            row_starts = np.arange(n) * q
            dest = np.repeat(row_starts, a.lengths) + a.offsets()
            ids[dest] = a.tokens
            slots[dest] = a.slots(blk)
            pos[: n * q] = (a.starts[:, None] + np.arange(q)[None, :]).ravel()
            seq_lens[:n] = a.starts + q
            sampled = a.picks(row_starts)  # every chunk samples: its last own token and each proposal
            num_picks = len(sampled)
            picks[:num_picks] = sampled
            self.s_tables[:n, : a.tables.shape[1]].copy_(torch.from_numpy(a.tables))
        dev_h = host.to(self.device, non_blocking=True)
        self.c_ids[:rows].copy_(dev_h[:rows])
        self.c_pos[:rows].copy_(dev_h[rows: 2 * rows])
        self.c_slots[:rows].copy_(dev_h[2 * rows: 3 * rows])
        self.c_seq_lens[:bs].copy_(dev_h[4 * rows: 4 * rows + bs])
        self.c_qsl[: bs + 1].copy_(dev_h[4 * rows + bs:])
        return dev_h[3 * rows: 3 * rows + num_picks]

    def _run_chunk_graph(self, sched: SchedulerOutput, bs: int, q: int) -> torch.Tensor:
        picks = self._stage_chunks(sched.chunks, bs, q)
        graph, hidden = self.chunk_graphs[bs, q]
        graph.replay()
        return self.model.compute_logits(hidden.index_select(0, picks))  # only the sampled rows: no logits buffer

    def _capture_chunk(self, bs: int, q: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the forward (to the last hidden states) of `bs` chunks of `q` tokens from the static buffers."""
        rows = bs * q
        meta = AttentionMetadata(
            slot_mapping=self.c_slots[:rows], query_start_loc=self.c_qsl[: bs + 1], seq_lens=self.c_seq_lens[:bs],
            block_tables=self.s_tables[:bs], query_start_loc_cpu=list(range(0, rows + 1, q)), seq_lens_cpu=[q] * bs,
            max_query_len=q, max_seq_len=self.max_model_len, graph_bound=True,
        )
        return self.capture_hidden(self.c_ids[:rows], self.c_pos[:rows], meta)

    def capture_hidden(self, ids: torch.Tensor, pos: torch.Tensor,
                       meta: AttentionMetadata) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the forward of static buffers `ids`/`pos` [T] to the last hidden states [T, D], into the
        shared graph pool (chunk and token graphs)."""
        self.backend.meta = meta
        with torch.inference_mode():
            for _ in range(2):  # compile kernels and settle allocations outside the capture
                self.model(ids, pos, self.backend)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                hidden = self.model(ids, pos, self.backend)
        self.graph_pool = graph.pool()
        return graph, hidden
