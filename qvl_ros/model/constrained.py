"""Constrained decoding: a grammar compiled to a per-step token mask over the checkpoint's tokenizer.

The grammar engine is llguidance (PyPI `llguidance`, optional: `pip install qvl_ros[grounding]`):
a Lark-style grammar, with JSON schemas embedded as `%json {...}` and special tokens named as
`<|box_start|>`, is compiled once per request against the tokenizer's vocabulary; one matcher per
row then gives, at every step, the set of tokens that keep the output a prefix of the grammar
(end tokens only once the grammar is complete).

`GrammarGuide` plugs into `BatchedQwenVL`'s decode loop as its token hook. Per step:
`before(logits, done)` fills a (B, ceil(V/32)) int32 bitmask for all rows (llguidance's executor,
in parallel native threads, on machines of 4 or more cores with 4 or more rows; else row by row:
on 2 cores the executor's thread hand-off cost more than the masks, 0.2-7 ms against 15 us for 6
rows of a small vocabulary), copies it to the model device and sets the logits of the
forbidden tokens to -inf, out of place and outside any captured CUDA graph (the graph's step only
produces the logits); `after(t, tok, done)` feeds each row's chosen token to its matcher (one host
sync per step: the matchers live on the host). Both hooks also record each chosen token's
log-probability under the model's own (unmasked) distribution, the basis of the detection score.
`TokenScores` is the same hook without a grammar.
"""
from __future__ import annotations

import os
import time

import torch

INSTALL_HINT = ("constrained decoding needs the llguidance package: pip install 'llguidance==1.9.1' "
                "(or pip install qvl_ros[grounding])")


def require_llguidance():
    """The llguidance module, or an ImportError that says how to install it."""
    try:
        import llguidance
        import llguidance.hf  # noqa: F401  (imports transformers, already a dependency)
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return llguidance


_TOKENIZERS: dict = {}  # id(hf tokenizer), vocab size, eos ids -> (hf tokenizer, LLTokenizer)


def llg_tokenizer(hf_tokenizer, n_vocab: int, eos_ids):
    """llguidance's view of a fast Hugging Face tokenizer (built once per tokenizer: ~1 s on 150k tokens).

    `n_vocab`: the model's logit count (may exceed the tokenizer's; the extra ids are never
    allowed); `eos_ids`: the tokens that end a row, allowed once the grammar is complete."""
    llg = require_llguidance()
    key = (id(hf_tokenizer), int(n_vocab), tuple(eos_ids))
    hit = _TOKENIZERS.get(key)
    if hit is None or hit[0] is not hf_tokenizer:
        if len(_TOKENIZERS) > 8:
            _TOKENIZERS.clear()
        hit = (hf_tokenizer, llg.hf.from_tokenizer(hf_tokenizer, n_vocab=int(n_vocab), eos_token=list(eos_ids)))
        _TOKENIZERS[key] = hit
    return hit[1]


def grammar_problem(lark: str, hf_tokenizer, n_vocab: int, eos_ids) -> str | None:
    """Why llguidance cannot compile a grammar (its message), or None if it can."""
    llg = require_llguidance()
    tok = llg_tokenizer(hf_tokenizer, n_vocab, eos_ids)
    m = llg.LLMatcher(tok, llg.LLMatcher.grammar_from_lark(lark), log_level=0)
    return m.get_error() if m.is_error() else None


def expand_bitmask(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, W) int32 bitmask (bit j of word i: token 32*i + j allowed) -> (B, vocab) bool, on its device."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)  # (B, 32*W)
    if allowed.shape[1] >= vocab:
        return allowed[:, :vocab]
    pad = torch.zeros(bits.shape[0], vocab - allowed.shape[1], dtype=torch.bool, device=bits.device)
    return torch.cat([allowed, pad], dim=1)


class TokenScores:
    """Decode hook recording each chosen token's log-probability under the model's distribution."""

    def __init__(self, batch: int, max_new_tokens: int, device):
        self.logprobs = torch.zeros(batch, max_new_tokens, device=device)  # (B, T); 0 after a row ends
        self._lse = self._logits = None
        self.seconds = 0.0  # host time spent in the grammar's mask and matchers (GrammarGuide)
        self.steps = 0

    def before(self, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        self._logits = logits
        self._lse = torch.logsumexp(logits.float(), dim=-1)  # (B,)
        return logits

    def after(self, t: int, tok: torch.Tensor, done: torch.Tensor) -> None:
        chosen = self._logits.gather(1, tok.unsqueeze(1)).squeeze(1).float() - self._lse
        self.logprobs[:, t] = torch.where(done, torch.zeros_like(chosen), chosen)


class GrammarGuide(TokenScores):
    """Decode hook that keeps every row inside a grammar (one llguidance matcher per row).

    `grammars`: one Lark grammar string per row (rows may differ, e.g. per-image coordinate
    bounds); `threads`: llguidance executor threads (None: see the module doc; 1: row by row). A grammar that does not compile raises ValueError before any decoding. A matcher
    that ends in an error state (it cannot, with the mask applied) leaves its row only end tokens."""

    def __init__(self, grammars: list[str], hf_tokenizer, n_vocab: int, eos_ids, max_new_tokens: int, device,
                 threads: int | None = None):
        super().__init__(len(grammars), max_new_tokens, device)
        llg = require_llguidance()
        self.tokenizer = llg_tokenizer(hf_tokenizer, n_vocab, eos_ids)
        self.vocab, self.eos = int(n_vocab), list(eos_ids)
        compiled: dict[str, str] = {}
        self.matchers = []
        for g in grammars:
            if g not in compiled:
                compiled[g] = llg.LLMatcher.grammar_from_lark(g)
            m = llg.LLMatcher(self.tokenizer, compiled[g], log_level=0)
            if m.is_error():
                raise ValueError(f"grammar does not compile: {m.get_error()}")
            self.matchers.append(m)
        cores = os.cpu_count() or 1
        parallel = threads > 1 if threads is not None else (cores >= 4 and len(grammars) >= 4)
        self.executor = llg.LLExecutor(num_threads=threads) if parallel else None
        words = (self.vocab + 31) // 32
        pin = torch.device(device).type == "cuda"
        self.bits = torch.zeros(len(grammars), words, dtype=torch.int32, pin_memory=pin)  # host side
        self.eos_only = torch.zeros(words, dtype=torch.int32)
        for e in self.eos:
            if e < self.vocab:
                self.eos_only[e // 32] |= torch.tensor(1 << (e % 32), dtype=torch.int64).to(torch.int32)
        self.device = torch.device(device)
        self.errors = [None] * len(grammars)  # per row: the matcher's error message, if it failed

    def before(self, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        super().before(logits, done)
        t0 = time.perf_counter()
        self.steps += 1
        live = [(m, i) for i, m in enumerate(self.matchers) if not m.is_error()]
        for i, m in enumerate(self.matchers):
            if m.is_error():
                self.bits[i] = self.eos_only
        row_bytes = self.bits.shape[1] * 4
        if live and self.executor is not None:
            self.executor.unsafe_compute_mask_ptr(live, self.bits.data_ptr(), row_bytes, self.bits.shape[0])
        else:
            for m, i in live:
                m.unsafe_compute_mask_ptr(self.bits[i].data_ptr(), row_bytes)
        allowed = expand_bitmask(self.bits.to(self.device, non_blocking=True), logits.shape[-1])
        masked = logits.masked_fill(~allowed, float("-inf"))
        self.seconds += time.perf_counter() - t0
        return masked

    def after(self, t: int, tok: torch.Tensor, done: torch.Tensor) -> None:
        super().after(t, tok, done)
        t0 = time.perf_counter()
        for i, (m, k, d) in enumerate(zip(self.matchers, tok.tolist(), done.tolist())):
            if d or m.is_error() or m.is_stopped():
                continue
            if not m.consume_token(k) and self.errors[i] is None:
                self.errors[i] = m.get_error()
        self.seconds += time.perf_counter() - t0
