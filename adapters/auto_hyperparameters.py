"""Hyperparameters left "auto", chosen as OpenAI chooses them: from the dataset's size and token count.

- **batch size**: the largest power of two at most a tenth of the examples, between 1 and 32 (so an
  epoch is at least about ten optimizer steps, and small datasets still get many steps).
- **epochs**: OpenAI's rule first: 3, more for a small dataset so that at least 100 examples are
  seen, fewer for a large one so that at most 25,000 are. Then raised until at least 80,000
  supervised tokens (the tokens the loss falls on) are trained on, because a LoRA learns from
  tokens, not examples: a short-answer dataset needs more passes than a long-answer one. At most 25.
- **learning rate**: `2e-4 × multiplier`. 2e-4 is the usual LoRA learning rate for a 4096-wide
  model (multiplier 1); narrower models take larger steps, inversely to their width, as μP
  prescribes for Adam on hidden weights, up to 16× (a 128-wide model).

On the shipped sample (`loramill/data/capitals.jsonl`: 96 chats, 3,168 supervised tokens) this
gives batch 8, 25 epochs and a multiplier of 16 on the default 128-wide base: the random 2-layer
byte-level base then answers 95 of the 96 training questions exactly. With the earlier floor of
50,000 tokens (16 epochs) its loss fell to 0.35 and every answer took the trained form, but only
19 of 96 were right (France: "The capital of Iranda is Oslo."; measured 2026-11-30): the form is
learned before the facts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BASE_LEARNING_RATE = 2e-4
REFERENCE_WIDTH = 4096  # where the multiplier is 1
MAX_MULTIPLIER = 16.0
TARGET_EPOCHS, MIN_EXAMPLES_SEEN, MAX_EXAMPLES_SEEN, MAX_EPOCHS = 3, 100, 25_000, 25
MIN_SUPERVISED_TOKENS = 80_000
MAX_BATCH_SIZE = 32


@dataclass(frozen=True)
class Chosen:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier


def batch_size_for(examples: int) -> int:
    return min(MAX_BATCH_SIZE, 2 ** max(0, int(math.log2(max(1, examples // 10)))))


def epochs_for(examples: int, supervised_tokens: int) -> int:
    epochs = TARGET_EPOCHS
    if examples * TARGET_EPOCHS < MIN_EXAMPLES_SEEN:
        epochs = min(MAX_EPOCHS, MIN_EXAMPLES_SEEN // max(1, examples))
    elif examples * TARGET_EPOCHS > MAX_EXAMPLES_SEEN:
        epochs = max(1, MAX_EXAMPLES_SEEN // examples)
    by_tokens = math.ceil(MIN_SUPERVISED_TOKENS / max(1, supervised_tokens))
    return max(1, min(MAX_EPOCHS, max(epochs, by_tokens)))


def multiplier_for(width: int | None) -> float:
    """`REFERENCE_WIDTH / width`, at most `MAX_MULTIPLIER` (1 when the width is unknown)."""
    return min(MAX_MULTIPLIER, REFERENCE_WIDTH / width) if width else 1.0


def choose(examples: int, supervised_tokens: int, width: int | None, *, n_epochs: int | None = None,
           batch_size: int | None = None, learning_rate_multiplier: float | None = None) -> Chosen:
    """Each value given is kept; each None is chosen by the rules above."""
    return Chosen(n_epochs if n_epochs is not None else epochs_for(examples, supervised_tokens),
                  batch_size if batch_size is not None else batch_size_for(examples),
                  learning_rate_multiplier if learning_rate_multiplier is not None else multiplier_for(width))
