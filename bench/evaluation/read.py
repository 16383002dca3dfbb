"""Read a target back under every method x budget from one prefill of its prompt (`prefixkv.prefill`).

For each compressed cache the target is fed in one chunk forward (teacher forcing; after the question under the
query-agnostic protocol), and each position gives two things: the log-probability of the target's token and whether
that token is the greedy choice. A target is reproduced by greedy decoding exactly when every position's token is
the greedy choice, so exact match costs one forward, not one decode step per token.

(`prefixkv.PrefilledPrompt.continuation_logprobs` returns the log-probabilities only; the greedy choices need the
logits, so the chunk is run here through the same public pieces: the prompt's compressed cache, `bind`, `Decoder`.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

import prefixkv
from bench.evaluation.variants import Variant
from prefixkv.capture import bind
from prefixkv.generation import Decoder

#: The reference every reading includes.
FULL = Variant("full", "full")


@dataclass(frozen=True)
class Reading:
    """What one compressed cache says about a target of T tokens: per position, the target token's log-probability
    and whether it is the greedy (argmax) choice."""

    logprobs: tuple[float, ...]
    greedy: tuple[bool, ...]

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per token (nats)."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def exact(self) -> bool:
        """Greedy decoding reproduces the whole target."""
        return all(self.greedy)

    @property
    def agreement(self) -> float:
        """Fraction of positions whose greedy choice is the target's token (top-1 agreement under teacher forcing)."""
        return sum(self.greedy) / len(self.greedy)


class Prefilled:
    """One prompt prefilled once (uncompressed, scored by every variant's scorer), read under any variant x budget.

    `inputs`: what a tokenizer or processor returns for the compressed part; `question` ((1, Tq) ids or None): read
    after compression (query-agnostic)."""

    def __init__(self, model, inputs: Mapping[str, torch.Tensor], variants: Sequence[Variant],
                 question: torch.Tensor | None = None):
        self.model, self.question = model, question
        self.methods = {v.label: v.build() for v in (FULL, *variants)}
        self.prompt = prefixkv.prefill(model, inputs, methods=list(self.methods.values()))

    @torch.inference_mode()
    def read(self, target: torch.Tensor, label: str, budget: float) -> Reading:
        """`target` (1, T) ids under `label`'s cache at `budget`."""
        method = self.methods[label]
        count = target.shape[1]
        fed = 0 if self.question is None else self.question.shape[1]
        cache = self.prompt.cache(method, budget, fed + count)
        with bind(self.model, cache):
            decoder = Decoder(self.model, cache, target.shape[0])
            if self.question is None:
                logits = self.prompt.last_logits[:, None]
                if count > 1:
                    logits = torch.cat([logits, decoder.feed(target[:, :-1], count - 1)], dim=1)
            else:
                logits = decoder.feed(torch.cat([self.question, target[:, :-1]], dim=1), count)
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, target[..., None])[0, :, 0]
        greedy = logits.argmax(-1)[0] == target[0]
        return Reading(tuple(logprobs.tolist()), tuple(greedy.tolist()))

    @torch.inference_mode()
    def full_greedy(self, new_tokens: int) -> torch.Tensor:
        """The full cache's greedy output (1, new_tokens) on this prompt (after the question, if any)."""
        return self.prompt.generate(method=self.methods[FULL.label], budget=1.0, max_new_tokens=new_tokens,
                                    question=self.question)
