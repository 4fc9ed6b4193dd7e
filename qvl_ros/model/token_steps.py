"""Static-shape decoding: one step of fixed shapes, captured in a CUDA graph and replayed per token.

The decode state is a set of preallocated tensors: the current token (B,), its M-RoPE position
(B,), the cache column it is written to (1,), a key mask (B, 1, 1, K) and the KV cache, one
(B, kv_heads, K, head_dim) pair per layer. `TextModel.step` reads and advances them in place, so no
Python int enters a step and every step of a caption has the same shapes.

On CUDA the state is sized by bucket (batch rounded up to a power of two, cache length to a
multiple of `CACHE_QUANTUM`), kept between calls, and one step per bucket is captured with
`torch.cuda.CUDAGraph`: a token then costs one graph replay plus a few tiny kernels for token
selection. Rows beyond the batch are dummies that attend to their first key and are ignored.
Elsewhere the state is sized exactly per call and the same step runs eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CACHE_QUANTUM = 256
MAX_GRAPHS = 8  # states (and their KV caches) kept on the device; the oldest is dropped first


def batch_bucket(B: int) -> int:
    return next((b for b in BATCH_BUCKETS if b >= B), B)


def warmup_batch_sizes(max_size: int) -> list[int]:
    """One batch size per decode bucket a batch of 1..max_size sets runs in: [1, 2, 4, 5] for 5."""
    return [b for b in BATCH_BUCKETS if b < max_size] + [max_size]


def cache_bucket(K: int) -> int:
    return -(-K // CACHE_QUANTUM) * CACHE_QUANTUM


@dataclass
class DecodeState:
    tok: torch.Tensor        # (B,) long: token fed to the next step
    position: torch.Tensor   # (B,) long: its M-RoPE position (all three streams are equal for text)
    cache_pos: torch.Tensor  # (1,) long: cache column its keys/values are written to
    key_mask: torch.Tensor   # (B, 1, 1, K) bool: columns a query may attend to
    caches: list             # [(k, v)] per layer, each (B, kv_heads, K, head_dim)

    @classmethod
    def allocate(cls, cfg, B: int, K: int, device, dtype) -> "DecodeState":
        shape = (B, cfg.kv_heads, K, cfg.head_dim)
        # zero-filled: masked keys still enter the score matmul, and garbage could be NaN
        caches = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                  for _ in range(cfg.layers)]
        long = dict(device=device, dtype=torch.long)
        return cls(torch.zeros(B, **long), torch.zeros(B, **long), torch.zeros(1, **long),
                   torch.zeros(B, 1, 1, K, device=device, dtype=torch.bool), caches)

    @property
    def capacity(self) -> tuple[int, int]:
        return self.key_mask.shape[0], self.key_mask.shape[-1]

    def prefill_caches(self, B: int) -> list:
        """Views of the first B rows, for the prefill to write columns [0, L)."""
        return [(k[:B], v[:B]) for k, v in self.caches]

    def begin(self, attention_mask: torch.Tensor, next_position: torch.Tensor) -> None:
        """Start decoding after a prefill of B rows x L columns (left padded)."""
        B, L = attention_mask.shape
        self.key_mask.zero_()
        self.key_mask[:B, 0, 0, :L] = attention_mask.bool()
        self.key_mask[B:, 0, 0, 0] = True  # dummy rows: one finite key, no NaN
        self.position.zero_()
        self.position[:B] = next_position
        self.cache_pos.fill_(L)


class StepRunner:
    """Decode states and their step functions.

    `buckets` (default: on CUDA) keeps one state per (batch, cache length) bucket between calls;
    `graphs` (default: on CUDA; CUDA only) captures each bucket's step in a CUDA graph. Without
    buckets a state of the exact size is allocated per call and the step runs eagerly."""

    def __init__(self, decoder, buckets: bool | None = None, graphs: bool | None = None):
        self.decoder = decoder
        self.buckets, self.graphs = buckets, graphs
        self._entries: dict[tuple, tuple] = {}  # (B, K, device, dtype) -> (state, step function)
        self._pool = None
        self.captures = 0        # graphs captured
        self.late_captures = 0   # of which outside a warm-up (`warming` False): expected 0 in a node
        self.warming = False

    def _on(self, flag: bool | None, device: torch.device) -> bool:
        return device.type == "cuda" if flag is None else bool(flag)

    def get(self, B: int, K: int, private: bool = False) -> tuple[DecodeState, callable]:
        """A state holding at least B rows and K columns, and a function running one step on it.
        `private`: a state of the exact size for this call only, stepped eagerly (never one that
        another generation of this runner may be using)."""
        w = self.decoder.embed.weight
        dev, dt = w.device, w.dtype
        graphs = self._on(self.graphs, dev) and dev.type == "cuda"
        if private or not (graphs or self._on(self.buckets, dev)):
            state = DecodeState.allocate(self.decoder.cfg, B, K, dev, dt)
            return state, lambda: self.decoder.step(state)
        key = (batch_bucket(B), cache_bucket(K), dev, dt, graphs)
        entry = self._entries.pop(key, None)
        if entry is None:
            if len(self._entries) >= MAX_GRAPHS:
                self._entries.pop(next(iter(self._entries)))
            state = DecodeState.allocate(self.decoder.cfg, key[0], key[1], dev, dt)
            entry = self._capture(state) if graphs else (state, lambda: self.decoder.step(state))
        self._entries[key] = entry  # most recently used last
        return entry

    def _capture(self, state: DecodeState) -> tuple[DecodeState, callable]:
        """Capture one step on the state's own device (streams and graph made under it, and the
        capture stream given: torch.cuda.graph's default one is made once, on whichever device is
        current then; so a model on cuda:1 while cuda:0 is current is captured, not left empty), in
        "thread_local" mode: the node's executor thread may use the device (frame conversion)
        during a capture."""
        dev = state.tok.device
        with torch.cuda.device(dev):
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            state.key_mask[:, 0, 0, 0] = True
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up outside the graph (allocator, kernel selection)
                for _ in range(2):
                    self.decoder.step(state)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                logits = self.decoder.step(state)
        self.captures += 1
        if not self.warming:
            self.late_captures += 1

        def replay():
            graph.replay()
            return logits

        return state, replay

    def clear(self) -> None:
        """Drop every kept state and graph (and the device memory they hold)."""
        self._entries.clear()
        self._pool = None
