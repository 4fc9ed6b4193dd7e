"""DecodeControl: stop a running generation between two decode steps, and follow its tokens.

    control = DecodeControl(on_tokens=lambda ids: print(ids.shape), chunk=8)
    texts = model.generate(frames, prompts, max_new_tokens=4096, control=control)
    # from any other thread, at any time:
    control.stop("deactivated")

The decode loop (``BatchedQwenVL._generate_tokens``) reads the stop flag before every decode
step (a Python attribute: no host sync) and, every ``chunk`` tokens, at the host sync it already
makes there (are all rows done?), hands the tokens so far to ``on_tokens`` and then calls
``on_chunk``. A stopped generation is *returned*, not raised: its rows hold the tokens generated
before the stop (pad ids after), ``stopped`` is True and ``steps`` says how many columns were
generated. Vision encoding and the prefill are not interrupted; a control stopped before the
first token yields no tokens.

``private_state=True`` gives the generation a decode state (KV cache) of its own, allocated for
this call and stepped eagerly, instead of the step runner's kept per-bucket state: a caller that
runs another generation of the same model from ``on_chunk`` (the node runs waiting batches
between the chunks of an answer) must set it, so the two never write the same cache.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

import torch

__all__ = ["DecodeControl"]


class DecodeControl:
    """Stop flag and progress callbacks of one generation (one ``generate`` / ``_run`` call).

    Args:
        on_tokens: called every ``chunk`` tokens on the generating thread with a CPU copy of the
            tokens so far, ``(B, steps)`` long (a finished row holds pad ids after its end token).
            Not called for the final tokens: the call's result has them.
        on_chunk: called every ``chunk`` tokens (after ``on_tokens``) without arguments; may run
            other work of the same thread (with ``private_state``).
        chunk: tokens between two calls (and between the loop's checks that all rows are done).
        private_state: decode into a state of this call's own (see the module doc).
    """

    def __init__(self, on_tokens: Optional[Callable[[torch.Tensor], None]] = None,
                 on_chunk: Optional[Callable[[], None]] = None, chunk: int = 8,
                 private_state: bool = False) -> None:
        if int(chunk) < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.on_tokens = on_tokens
        self.on_chunk = on_chunk
        self.chunk = int(chunk)
        self.private_state = bool(private_state)
        self.steps = 0          # columns generated so far (set by the decode loop)
        self.chunks = 0         # chunk boundaries passed
        self._stopped = threading.Event()
        self.reason: Optional[str] = None
        self.stopped_at: Optional[int] = None  # `steps` when stop() was called

    def stop(self, reason: str = "stopped") -> None:
        """Ask the generation to end before its next decode step (any thread; idempotent: the
        first reason is kept)."""
        if not self._stopped.is_set():
            self.reason = str(reason)
            self.stopped_at = self.steps
            self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def chunk_done(self, ids: torch.Tensor, steps: int) -> None:
        """Called by the decode loop at a chunk boundary: ``ids`` (B, max_new_tokens) on the
        device, ``steps`` columns filled."""
        self.chunks += 1
        if self.on_tokens is not None:
            self.on_tokens(ids[:, :steps].cpu())
        if self.on_chunk is not None:
            self.on_chunk()
