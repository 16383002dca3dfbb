"""Prefill once, compress many: every method x budget from one uncompressed prefill of a prompt.

During prefill no method changes the hidden states - every method compresses only what it stores - so one prefill
yields what each of them needs: every layer's full keys and values, and each scorer's statistics (each distinct
scorer runs once per layer, inside that layer's attention call, from the attention's own log-sum-exp, as in a normal
prefill; methods with the same `Method.scorer`, e.g. `uniform` and `prefixkv`, share one run, and scorers that read
the same attention mass, e.g. `h2o` and `prefixkv`, share that pass: `scoring.shared_attention_mass`). From that,
`PrefilledPrompt` builds any method's compressed cache at any budget through the normal path (`PrefixKVCache`:
allocation, selection, compaction into static decode buffers) and scores a continuation in one chunk forward, or
generates greedily.

    prefixkv.sweep_logprobs(model, inputs, continuation, methods=[...], budgets=[0.1, 0.2])
    # {(label, budget): (batch, T) float32}, ("full", 1.0) included as the reference

    prompt = prefixkv.prefill(model, inputs, methods=["snapkv", "prefixkv"])  # to use one prefill several ways
    prompt.continuation_logprobs(continuation, method="snapkv", budget=0.2)   # (batch, T) float32
    prompt.sweep_generate(methods=["snapkv", "prefixkv"], budgets=[0.2], max_new_tokens=16)

Memory: a `PrefilledPrompt` holds every layer's full keys and values for the prompt (what a full-cache prefill
holds), each distinct scorer's scores ((batch, kv_heads, n) float32 per layer) and the last position's logits
((batch, vocab) float32); `nbytes` says how many bytes that is. Each method x budget then builds one compressed cache,
uses it and drops it before the next: one compressed cache at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import torch
from torch import nn

from prefixkv.budget import check_budget, check_count
from prefixkv.cache import PrefixKVCache
from prefixkv.capture import bind, decoder_spec
from prefixkv.generation import (
    Decoder,
    _prefill,
    check_inputs,
    check_token_ids,
    fed_after_compression,
    greedy_tokens,
    make_cache,
    score_continuation,
)
from prefixkv.methods import Method, build_method
from prefixkv.methods.full import FullCache
from prefixkv.scoring import shared_attention_mass
from prefixkv.timer import Timer, check_timer

#: The reference every sweep includes: the full cache (it keeps everything whatever the budget).
REFERENCE = ("full", 1.0)
#: A sweep's results: (label, budget) -> a tensor per cell.
Results = dict[tuple[str, float], torch.Tensor]


class _ScoringPrefillCache(PrefixKVCache):
    """An uncompressed prefill that scores every layer with each of `scorers` (one method per distinct scorer)."""

    def __init__(self, num_layers: int, scorers: Iterable[Method], timer: Timer):
        super().__init__(num_layers, method=FullCache(), budget=1.0, timer=timer, compress_in_prefill=False)
        self.scorers = {method.scorer: method for method in scorers if method.needs_scores}
        self.scored: dict[tuple, dict[int, torch.Tensor]] = {key: {} for key in self.scorers}

    @property
    def needs_scores(self) -> bool:
        return bool(self.scorers)

    def layer_prefilled(self, layer_idx, queries, keys, lse=None) -> None:
        with shared_attention_mass():  # H2O's and PrefixKV's scores read the same attention mass: one pass
            for key, method in self.scorers.items():
                with self.timer.region("score"):
                    self.scored[key][layer_idx] = method.score_prompt(queries, keys, layer_idx, lse)


class PrefilledPrompt:
    """One prompt (a batch of equal-length prompts), prefilled once without compression, from which any method
    whose scorer ran at prefill is compressed at any budget (see the module docstring for what it holds).

    Built by `prefixkv.prefill`. Each call builds that method's compressed cache from the held prefill exactly as
    `prefixkv.generate` / `continuation_logprobs` build it after their own prefill, and gives the same result.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Mapping[str, torch.Tensor],
        input_ids: torch.Tensor,
        methods: Sequence[Method],
        timer: Timer,
    ):
        """Prefill `inputs` (checked: `input_ids` is theirs) with the scorers of `methods`."""
        self.model, self.input_ids, self.timer = model, input_ids, timer
        spec = decoder_spec(model)
        cache = _ScoringPrefillCache(spec.num_layers, methods, timer)
        with bind(model, cache, spec), timer.region("prefill"):
            #: (batch, vocab) float32: the prompt's last position, which predicts the first token after it.
            self.last_logits = _prefill(model, inputs, cache)
        self.keys = [layer.keys for layer in cache.layers]  # (batch, kv_heads, n, head_dim) per layer
        self.values = [layer.values for layer in cache.layers]
        self.scores = {key: [by_layer[i] for i in range(spec.num_layers)] for key, by_layer in cache.scored.items()}

    @property
    def nbytes(self) -> int:
        """Bytes held: keys and values of every layer, every scorer's scores, the last logits."""
        scores = [layer for by_layer in self.scores.values() for layer in by_layer]
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values, self.last_logits, *scores])

    @torch.inference_mode()
    def cache(self, method: str | Method, budget: float, planned: int = 0, **method_kwargs) -> PrefixKVCache:
        """`method`'s compressed cache at `budget`, planned for `planned` tokens fed after compression: a fresh
        `PrefixKVCache`, compressed; the held prefill is read, never written."""
        cache = make_cache(
            self.model, method, budget, planned, timer=self.timer, compress_in_prefill=False, **method_kwargs
        )
        cache.adopt_prefill(self.keys, self.values, self._scores_of(cache.method))
        cache.compress()
        return cache

    def _scores_of(self, method: Method) -> list[torch.Tensor] | None:
        """`method`'s scores per layer (None for a method that does not score), or ValueError naming it."""
        if not method.needs_scores:
            return None
        if method.scorer not in self.scores:
            raise ValueError(
                f"method {method.name!r} scores the prompt with a scorer that did not run at prefill: name it in "
                "prefill(methods=...)"
            )
        return self.scores[method.scorer]

    @torch.inference_mode()
    def continuation_logprobs(
        self,
        continuation: torch.Tensor,
        *,
        method: str | Method,
        budget: float,
        question: torch.Tensor | None = None,
        **method_kwargs,
    ) -> torch.Tensor:
        """As `prefixkv.continuation_logprobs` for this prompt: (batch, T) float32 log-probabilities of
        `continuation` (batch, T) under `method`'s compressed cache at `budget`, after `question` if given."""
        continuation = check_token_ids(self.model, "continuation", continuation, self.input_ids)
        return self._logprobs(continuation, self._question(question), method, budget, **method_kwargs)

    @torch.inference_mode()
    def generate(
        self,
        *,
        method: str | Method,
        budget: float,
        max_new_tokens: int,
        question: torch.Tensor | None = None,
        **method_kwargs,
    ) -> torch.Tensor:
        """As `prefixkv.generate` for this prompt, greedy: the `max_new_tokens` new tokens (batch, new) int64."""
        check_count("max_new_tokens", max_new_tokens, 1)
        return self._generate(max_new_tokens, self._question(question), method, budget, **method_kwargs)

    @torch.inference_mode()
    def sweep_logprobs(
        self,
        continuation: torch.Tensor,
        *,
        methods: Sequence[str | Method],
        budgets: Sequence[float],
        question: torch.Tensor | None = None,
        **method_kwargs,
    ) -> Results:
        """`prefixkv.sweep_logprobs` on this prompt (every method's scorer must have run at prefill)."""
        continuation = check_token_ids(self.model, "continuation", continuation, self.input_ids)
        cells = sweep_cells(methods, budgets, method_kwargs)
        return self._sweep_logprobs(cells, continuation, self._question(question))

    @torch.inference_mode()
    def sweep_generate(
        self,
        *,
        methods: Sequence[str | Method],
        budgets: Sequence[float],
        max_new_tokens: int,
        question: torch.Tensor | None = None,
        **method_kwargs,
    ) -> Results:
        """`prefixkv.sweep_generate` on this prompt (every method's scorer must have run at prefill)."""
        check_count("max_new_tokens", max_new_tokens, 1)
        cells = sweep_cells(methods, budgets, method_kwargs)
        return self._sweep_generate(cells, max_new_tokens, self._question(question))

    def _sweep_logprobs(self, cells: list[SweepCell], continuation, question) -> Results:
        return self._sweep(cells, lambda method, budget: self._logprobs(continuation, question, method, budget))

    def _sweep_generate(self, cells: list[SweepCell], max_new_tokens, question) -> Results:
        return self._sweep(cells, lambda method, budget: self._generate(max_new_tokens, question, method, budget))

    def _sweep(self, cells: list[SweepCell], run: Callable[[Method, float], torch.Tensor]) -> Results:
        """`run(method, budget)` for every cell, one compressed cache at a time; a full cache is computed once
        whatever its budget (it keeps every entry, and no decode policy evicts at a keep ratio of 1)."""
        for cell in cells:
            self._scores_of(cell.method)  # every scorer present, before any work
        results: Results = {}
        full: dict[str, torch.Tensor] = {}
        for cell in cells:
            if isinstance(cell.method, FullCache):
                identity = repr(cell.method)
                if identity not in full:
                    full[identity] = run(cell.method, 1.0)
                results[cell.key] = full[identity]
            else:
                results[cell.key] = run(cell.method, cell.budget)
        return results

    def _logprobs(self, continuation, question, method, budget, **method_kwargs) -> torch.Tensor:
        cache = self.cache(method, budget, fed_after_compression(question, continuation.shape[1]), **method_kwargs)
        with bind(self.model, cache):
            decoder = Decoder(self.model, cache, self.input_ids.shape[0])
            return score_continuation(decoder, self.last_logits, continuation, question, self.timer)

    def _generate(self, max_new_tokens, question, method, budget, **method_kwargs) -> torch.Tensor:
        cache = self.cache(method, budget, fed_after_compression(question, max_new_tokens), **method_kwargs)
        with bind(self.model, cache):
            decoder = Decoder(self.model, cache, self.input_ids.shape[0])
            return greedy_tokens(decoder, self.last_logits, max_new_tokens, question, self.timer)

    def _question(self, question: torch.Tensor | None) -> torch.Tensor | None:
        return None if question is None else check_token_ids(self.model, "question", question, self.input_ids)


@torch.inference_mode()
def prefill(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    methods: Sequence[str | Method],
    timer: Timer | None = None,
    **method_kwargs,
) -> PrefilledPrompt:
    """Prefill `inputs` once, uncompressed, scoring each layer with every distinct scorer of `methods` (names as
    `build_method` takes them, built with `method_kwargs`, or `Method` instances): the prompt from which each of
    them is then compressed at any budget (`PrefilledPrompt`)."""
    input_ids = check_inputs(model, inputs)
    built = [method for _, method in _methods(methods, method_kwargs)]
    return PrefilledPrompt(model, inputs, input_ids, built, check_timer(timer))


@dataclass(frozen=True)
class SweepCell:
    """One result of a sweep: `label` (the method as given: its string, or a `Method` instance's name), the
    method built, the budget."""

    label: str
    method: Method
    budget: float

    @property
    def key(self) -> tuple[str, float]:
        return self.label, self.budget


def sweep_cells(
    methods: Sequence[str | Method], budgets: Sequence[float], method_kwargs: Mapping[str, object]
) -> list[SweepCell]:
    """Every method x budget, checked (ValueError/TypeError naming the bad value), then the full cache at 1.0 (the
    reference) unless it is one of them."""
    if isinstance(budgets, Real) or not isinstance(budgets, Sequence) or not budgets:
        raise TypeError(f"budgets must be a non-empty list of numbers in (0, 1], got {budgets!r}")
    checked = list(dict.fromkeys(check_budget(budget) for budget in budgets))
    built = _methods(methods, method_kwargs)
    labels = [label for label, _ in built]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"methods repeat the labels {repeated}: give each method a distinct name or spec string")
    cells = [SweepCell(label, method, budget) for label, method in built for budget in checked]
    if REFERENCE not in {cell.key for cell in cells}:
        cells.append(SweepCell(REFERENCE[0], FullCache(), REFERENCE[1]))
    return cells


def _methods(methods: Sequence[str | Method], method_kwargs: Mapping[str, object]) -> list[tuple[str, Method]]:
    """(label, method) per entry of `methods`: strings are built with `method_kwargs`, instances used as given."""
    if isinstance(methods, str | Method) or not isinstance(methods, Sequence) or not methods:
        raise TypeError(f"methods must be a non-empty list of method names or Method instances, got {methods!r}")
    out = []
    for spec in methods:
        if isinstance(spec, str):
            out.append((spec, build_method(spec, **method_kwargs)))
        elif isinstance(spec, Method):
            out.append((spec.name, spec))
        else:
            raise TypeError(f"methods must hold method names or Method instances, got {spec!r}")
    return out


@torch.inference_mode()
def sweep_logprobs(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    continuation: torch.Tensor,
    *,
    methods: Sequence[str | Method],
    budgets: Sequence[float],
    question: torch.Tensor | None = None,
    timer: Timer | None = None,
    **method_kwargs,
) -> Results:
    """Log-probabilities of `continuation` ((batch, T) ids) under every method x budget, from one prefill:
    `{(label, budget): (batch, T) float32}`, each equal to `prefixkv.continuation_logprobs` for that pair, and
    `("full", 1.0)`, the full cache's, always included.

    `methods`: names as `build_method` takes them (built with `method_kwargs`; the label is the string as given) or
    `Method` instances (used as given; the label is their `name`). `question` ((batch, Tq) ids): fed after the
    compressed prompt, before the continuation (query-agnostic protocol). Holds one prefill and one compressed cache
    at a time (module docstring). Chunk forwards run eagerly.
    """
    input_ids = check_inputs(model, inputs)
    continuation = check_token_ids(model, "continuation", continuation, input_ids)
    question = None if question is None else check_token_ids(model, "question", question, input_ids)
    cells = sweep_cells(methods, budgets, method_kwargs)
    prompt = PrefilledPrompt(model, inputs, input_ids, [cell.method for cell in cells], check_timer(timer))
    return prompt._sweep_logprobs(cells, continuation, question)


@torch.inference_mode()
def sweep_generate(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    methods: Sequence[str | Method],
    budgets: Sequence[float],
    max_new_tokens: int,
    question: torch.Tensor | None = None,
    timer: Timer | None = None,
    **method_kwargs,
) -> Results:
    """Greedy generation under every method x budget, from one prefill: `{(label, budget): (batch, new) int64}`,
    the new tokens of `prefixkv.generate` for that pair, `("full", 1.0)` included. Arguments as in
    `sweep_logprobs`."""
    input_ids = check_inputs(model, inputs)
    check_count("max_new_tokens", max_new_tokens, 1)
    question = None if question is None else check_token_ids(model, "question", question, input_ids)
    cells = sweep_cells(methods, budgets, method_kwargs)
    prompt = PrefilledPrompt(model, inputs, input_ids, [cell.method for cell in cells], check_timer(timer))
    return prompt._sweep_generate(cells, max_new_tokens, question)
