"""The HTML report: one self-contained file (figures embedded as base64 PNG) that answers "which method, at which
budget, on which hardware" for each workload (model x batch x lengths), with the uncertainty of every figure shown.

Order of the page: one line per machine across its workloads (`headline`), the decision per workload (a verdict per
quality tolerance, how the speed ratios were measured, the cells with intervals and ratios to the full cache), the
cross-machine comparison when the store holds several machines, the figures, the paper's published figures beside
ours, every cell (speed; memory, quality and the machine's load), failures, environments.

Modules, from data to page: `cells` (the per-cell frame, plain pandas), `numbers` (formatting), `tables`,
`headline` and `decision` (the page's answer, over `bench.decision`'s rule), `machines` (across machines),
`drawing`, `budget_figures` and `cost_figures` (matplotlib), `figures` (the catalogue), `page` (`write_report`).
"""

from bench.report.page import write_report

__all__ = ["write_report"]
