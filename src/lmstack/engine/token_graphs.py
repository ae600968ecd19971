"""CUDA graphs of prefill and mixed steps ("token graphs"), keyed by (token bucket, sequence bucket).

An eager step launches about ten kernels per layer from Python. On an H200 host that took 14-25 ms for a
30-layer model whatever the prompt length, while the GPU needed ~1 ms for a 160-token prefill of SmolLM2-135M
(torch.profiler), so every step with a prefill cost as much as ten replayed decode steps. A token graph
replays the whole forward of up to T tokens from B sequences:

- the step's tokens are packed as in an eager step, at rows 0..n-1, one sequence per chunk;
- the rows n..T-1 are one padding sequence at positions 0..T-n-1 whose block table is all zeros: its K/V go
  to slot 0 and it reads only the reserved block 0 (finite values), so no real row ever sees it;
- the sequences after it have no tokens and length 0, and the attention kernel's programs for them return at
  once (its grid covers T query rows for every one of the B sequences; `paged` reads every length from the
  device, which is what a backend's `supports_chunk_graphs` promises).

A graph stops at the last hidden states; the logits of the rows that sample are computed after it, so no graph
holds a logits buffer. Above 64 tokens the buckets grow by 1.25-1.33x, so padding adds at most a third to a
step's tokens (up to 2x below 64), which only matters where compute outweighs the launches saved: big models at
the largest buckets (with 1.5x buckets, a 640-token prefill of Llama-3-8B shapes took 19.0 ms replayed in a
768-token graph against 17.8 ms eager).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from lmstack.engine.attention import AttentionMetadata
from lmstack.engine.scheduler import SchedulerOutput
from lmstack.engine.step_arrays import StepArrays

if TYPE_CHECKING:
    from lmstack.engine.runner import ModelRunner

TOKEN_GRAPH_SIZES = (16, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048)
TOKEN_GRAPH_SEQS = (4, 16, 64, 256)  # sequence buckets, the padding sequence included


class TokenGraphs:
    """The token graphs of one runner, captured up front (largest first, into the runner's graph pool)."""

    def __init__(self, runner: ModelRunner, max_tokens: int) -> None:
        # A weak reference: the runner holds this object, and a strong cycle between them would outlive `del
        # engine` once the engine has frozen the collector (`EngineConfig.freeze_gc`), keeping its KV cache.
        self.runner = cast("ModelRunner", weakref.proxy(runner))
        # The padding sequence may be longer than the context window (a short max_model_len): its positions
        # only need the rotary table, its block table only zeros.
        limit = min(max_tokens, runner.cfg.max_num_batched_tokens, runner.model_cfg.max_position_embeddings)
        self.sizes = [t for t in TOKEN_GRAPH_SIZES if t <= limit]
        need = min(runner.cfg.max_num_seqs + 1, TOKEN_GRAPH_SEQS[-1])  # chunks of a step, plus the padding
        self.seqs = [s for s in TOKEN_GRAPH_SEQS if s < need] + [next(s for s in TOKEN_GRAPH_SEQS if s >= need)]
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if not self.sizes:
            return
        t, b, dev = self.sizes[-1], self.seqs[-1], runner.device
        self.ids = torch.zeros(t, dtype=torch.long, device=dev)
        self.pos = torch.zeros(t, dtype=torch.long, device=dev)
        self.slots = torch.zeros(t, dtype=torch.long, device=dev)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=dev)
        self.qsl = torch.zeros(b + 1, dtype=torch.int32, device=dev)
        width = max(runner.max_blocks_per_seq, -(-t // runner.block_size))
        self.tables = torch.zeros((b, width), dtype=torch.int32, device=dev)
        # Staging of ids, positions, slots, sampled rows (t each), query starts (b + 1) and seq_lens (b).
        self.host = torch.zeros(4 * t + 2 * b + 1, dtype=torch.long, pin_memory=dev.type == "cuda")

    def capture_all(self) -> None:
        for t in reversed(self.sizes):
            for b in reversed(self._seq_buckets(t)):
                self.graphs[t, b] = self._capture(t, b)
        torch.cuda.synchronize()

    def _seq_buckets(self, t: int) -> list[int]:
        """The sequence buckets a step of at most t tokens can need: a bucket is kept while the one below it
        cannot hold t chunks plus the padding sequence."""
        most = min(t, self.runner.cfg.max_num_seqs) + 1
        return [b for i, b in enumerate(self.seqs) if i == 0 or self.seqs[i - 1] < most]

    def key(self, sched: SchedulerOutput) -> tuple[int, int] | None:
        """(token bucket, sequence bucket) of the graph that can replay this step, or None (run it eagerly)."""
        rows = sched.num_tokens + sum(len(c.spec_tokens) for c in sched.chunks)
        t = next((s for s in self.sizes if s >= rows), None)
        b = next((s for s in self.seqs if s >= len(sched.chunks) + 1), None)
        if t is None or b is None or (t, b) not in self.graphs:
            return None
        return t, b

    def run(self, sched: SchedulerOutput, t: int, b: int) -> torch.Tensor | None:
        """Replay the (t, b) graph on this step; logits of the rows that sample, in chunk order (None: none)."""
        picks = self.stage(sched, t, b)
        graph, hidden = self.graphs[t, b]
        graph.replay()
        return self.runner.model.compute_logits(hidden.index_select(0, picks)) if len(picks) else None

    def stage(self, sched: SchedulerOutput, t: int, b: int) -> torch.Tensor:
        """Copy the step, padded to t tokens of b sequences (module docstring), into the static buffers; return
        the rows whose logits the step samples (device, in chunk order)."""
        blk = self.runner.block_size
        host = self.host[: 4 * t + 2 * b + 1]
        h = host.numpy()
        ids, pos, slots, picks = (h[i * t: (i + 1) * t] for i in range(4))
        qsl, seq_lens = h[4 * t: 4 * t + b + 1], h[4 * t + b + 1:]
        h[:] = 0
        a = StepArrays.of(sched.chunks)
        n, row = len(sched.chunks), a.num_rows
        row_starts = np.cumsum(a.lengths) - a.lengths
        ids[:row] = a.tokens
        pos[:row] = a.positions()
        slots[:row] = a.slots(blk)
        qsl[:n] = row_starts
        seq_lens[:n] = a.starts + a.lengths
        sampled = a.picks(row_starts)
        picks[: len(sampled)] = sampled
        pad = t - row  # the padding sequence: positions 0..pad-1, slots 0, an all-zero block table
        qsl[n] = row
        pos[row:] = np.arange(pad)
        seq_lens[n] = pad
        qsl[n + 1:] = t  # the sequences after it are empty
        host_tables = np.zeros((n + 1, max(a.tables.shape[1], -(-pad // blk))), dtype=np.int32)
        host_tables[:n, : a.tables.shape[1]] = a.tables
        # Columns past a row's width hold stale ids; the kernel never reads past seq_len.
        self.tables[: n + 1, : host_tables.shape[1]].copy_(torch.from_numpy(host_tables))
        dev_h = host.to(self.runner.device, non_blocking=True)
        self.ids[:t].copy_(dev_h[:t])
        self.pos[:t].copy_(dev_h[t: 2 * t])
        self.slots[:t].copy_(dev_h[2 * t: 3 * t])
        self.qsl[: b + 1].copy_(dev_h[4 * t: 4 * t + b + 1])
        self.seq_lens[:b].copy_(dev_h[4 * t + b + 1:])
        return dev_h[3 * t: 3 * t + len(sampled)]

    def meta(self, t: int, b: int) -> AttentionMetadata:
        """The metadata a (t, b) graph is captured with (and `stage`d inputs run with): lengths on the device."""
        return AttentionMetadata(
            slot_mapping=self.slots[:t], query_start_loc=self.qsl[: b + 1], seq_lens=self.seq_lens[:b],
            block_tables=self.tables[:b], query_start_loc_cpu=[0] + [t] * b, seq_lens_cpu=[t] + [0] * (b - 1),
            max_query_len=t, max_seq_len=max(t, self.runner.max_model_len), graph_bound=True,
        )

    def _capture(self, t: int, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the forward (to the last hidden states) of a (t, b) step from the static buffers."""
        self.stage(SchedulerOutput([]), t, b)  # warm-up inputs: the padding sequence only
        return self.runner.capture_hidden(self.ids[:t], self.pos[:t], self.meta(t, b))
