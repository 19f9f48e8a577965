"""Sampling parameters and the batched sampler.

Each row of the logits `[N, V]` follows its own request's parameters. Greedy rows take the argmax.
Sampled rows divide by the temperature, keep the top-k and the top-p nucleus, and draw with the
exponential race (`argmax p / q`, `q ~ Exp(1)`, equivalent to drawing from `p`) using the request's
own `torch.Generator`: a seeded request draws the same tokens whatever else shares its batch.
Penalties and `logit_bias` change the logits before both. Log-probabilities are those of the model's
distribution (before temperature, penalties and truncation), as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.errors import InputError

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
GREEDY_BELOW = 1e-5  # a temperature below this is greedy (as vLLM)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k: the sampled token's and the k most likely
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def validate(self, vocab_size: int) -> None:
        """Raise `InputError` naming the parameter (OpenAI's ranges; `top_k` and `ignore_eos` as vLLM's)."""
        def bad(param: str, message: str) -> InputError:
            return InputError(f"{param} {message}", param=param, code="invalid_value")

        if self.max_tokens < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise bad("temperature", f"must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise bad("top_k", f"must be -1 (off) or at least 1, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, f"must be between -2 and 2, got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        if self.seed is not None and not -2**63 <= self.seed < 2**64:
            raise bad("seed", "must fit in 64 bits")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(not s or len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise bad("stop", f"strings must be 1 to {MAX_STOP_LENGTH} characters long")
        for token, bias in self.logit_bias:
            if not 0 <= token < vocab_size:
                raise bad("logit_bias", f"has token id {token}, outside the vocabulary of {vocab_size}")
            if not -100 <= bias <= 100:
                raise bad("logit_bias", f"values must be between -100 and 100, got {bias}")


@dataclass(frozen=True)
class TokenLogprobs:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely tokens, most likely first


class Sampler:
    """`sample(logits, rows)`: one token (and its log-probabilities if asked) per row.

    `rows[i]` gives row i's `params`, its `generator` (None for greedy) and its `output_ids` so far.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def sample(self, logits: torch.Tensor, rows: list) -> tuple[list[int], list[TokenLogprobs | None]]:
        adjusted = logits
        if any(r.params.adjusts_logits for r in rows):
            adjusted = logits.clone()
            for i, r in enumerate(rows):
                if r.params.adjusts_logits:
                    self._adjust(adjusted[i], r)
        tokens = adjusted.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            drawn = self._draw(adjusted[sampled], [rows[i] for i in sampled])
            tokens[sampled] = drawn
        tokens = tokens.tolist()
        return tokens, self._logprobs(logits, rows, tokens)

    def _adjust(self, row: torch.Tensor, r) -> None:
        p = r.params
        if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
            counts = torch.bincount(torch.tensor(r.output_ids, device=row.device), minlength=row.shape[0])[:row.shape[0]]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        for token, bias in p.logit_bias:
            row[token] += bias

    def _draw(self, logits: torch.Tensor, rows: list) -> torch.Tensor:
        temps = torch.tensor([r.params.temperature for r in rows], device=logits.device, dtype=logits.dtype)
        x = logits / temps[:, None]
        top_k = [r.params.top_k if r.params.top_k > 0 else self.vocab_size for r in rows]
        top_p = [r.params.top_p for r in rows]
        if min(top_k) < self.vocab_size or min(top_p) < 1:
            x = self._truncate(x, top_k, top_p)
        probs = torch.softmax(x, dim=-1)
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for i, r in enumerate(rows):
            q = torch.empty_like(probs[i]).exponential_(generator=r.generator)
            out[i] = (probs[i] / q).argmax()
        return out

    def _truncate(self, x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        values, order = x.sort(dim=-1, descending=True)
        ranks = torch.arange(x.shape[-1], device=x.device)[None]
        drop = ranks >= torch.tensor(top_k, device=x.device)[:, None]
        probs = torch.softmax(values.masked_fill(drop, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
        drop |= before >= torch.tensor(top_p, device=x.device, dtype=x.dtype)[:, None]
        drop[:, 0] = False
        return torch.full_like(x, float("-inf")).scatter(-1, order, values.masked_fill(drop, float("-inf")))

    def _logprobs(self, logits: torch.Tensor, rows: list, tokens: list[int]) -> list[TokenLogprobs | None]:
        asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(rows)
        if not asked:
            return out
        logp = torch.log_softmax(logits[asked], dim=-1)
        k = max(rows[i].params.logprobs for i in asked)
        top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        chosen = logp[torch.arange(len(asked)), torch.tensor([tokens[i] for i in asked])].tolist()
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for j, i in enumerate(asked):
            n = rows[i].params.logprobs
            out[i] = TokenLogprobs(tokens[i], chosen[j], list(zip(top_ids[j][:n], top_values[j][:n])))
        return out
