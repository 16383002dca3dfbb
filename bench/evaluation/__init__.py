"""The quality engine: real prompts for any model, every method x budget from one prefill per prompt, paired
intervals against the full cache.

- `spec`: what an evaluation measures (`QualitySpec`, a matrix's `[quality]` table);
- `prompts` / `photos`: the prompts, as token ids of the model's own tokenizer or processor (RULER-style tasks over
  real text from `bench.tasks`, haystack windows; real photographs for LLaVA models);
- `read`: one prefill, a target read back under any method x budget (log-probabilities and greedy choices);
- `run`: the resumable driver (one JSON line per prompt);
- `summary`: paired losses with bootstrap intervals (`bench.paired`), the matrix's quality columns, tables;
- `suite`: the engine inside `bench run`;
- `variants`: methods as `name[key=value,...]`.
`python -m bench.realtext.evaluate` is its command line.
"""
