"""Report stage: eval/report.md and eval/report.html from the run's metrics and stats, never by hand.

Sections: pass@k of the base and fine-tuned student with the delta and 95% intervals; the
published numbers beside them (references.py, published.py) with how each differs from this run;
the phi-1 Table 3 style split of pass@1 into HumanEval problems similar / non-similar to the
training data at each AST tau (evaluation.py); the likelihood endpoint (likelihood.py); the data funnel;
the natural-code corpus (corpus.py); the cost ledger; the training curves; the evaluation run and its sanity
checks; limitations computed from the run (run.py).

Inputs (inputs.py), each read through its model in pipeline.core.artifacts and each optional (a missing
or invalid one is named "not available", with the file and the bad key): `{evaluate.output_dir}/
metrics.json` and `per_problem.json`, `{finetune.output_dir}/metrics.json` and its dvclive
tsv curves, every curate stage's stats.json, `{decontaminate.output_dir}/humaneval_similarity.json`,
`{corpus.output_dir}/stats.json`.

Rendering: Python prepares everything (`build_report`, stage.py) as a plain context dict, `title`, `note` and
`blocks`: the document as a list of heading / para / table / bullets / image dicts (blocks.py), their text in
the report's own Markdown (code, links, bold), table cells already formatted, plots as base64 PNG. The
Jinja2 templates in templates/ lay it out: report.md.j2 (not escaped) and report.html.j2
(autoescaped; its `inline` filter escapes the text, then turns that Markdown into HTML).

Outputs (in `evaluate.output_dir`): report.md, report.html (plots embedded as base64 PNG),
plots/pass_at_1.png, plots/loss.png, plots/funnel.png and, for `dvc plots`, plots/pass_at_1.csv
and plots/funnel.csv. The same inputs give the same bytes (no clock; PNGs without metadata).

    textbook report
"""

from __future__ import annotations

from pipeline.stages.report.inputs import Inputs, read_inputs
from pipeline.stages.report.run import reproducibility_note
from pipeline.stages.report.stage import GENERATED_NOTE, TITLE, build_report, main, run_report

__all__ = ["GENERATED_NOTE", "TITLE", "Inputs", "build_report", "main", "read_inputs", "reproducibility_note",
           "run_report"]
