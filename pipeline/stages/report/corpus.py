"""The report's section on the natural-code corpus (the corpus stage, docs/corpus.md): sources, counts at
each step, the teacher's ratings and self-agreement, the classifier's held-out metrics, the kept fraction
and the highest- and lowest-scored snippets; one line when the corpus did not run. The rows are
:func:`pipeline.core.corpus_stats.corpus_summary`'s, the same the dataset card shows.
"""

from __future__ import annotations

from pipeline.core.artifacts import CorpusSelectStats
from pipeline.core.config import RunConfig
from pipeline.core.corpus_stats import corpus_status, corpus_summary
from pipeline.stages.report.blocks import Block, code, heading, para, table


def corpus_section(cfg: RunConfig, stats: CorpusSelectStats | None) -> list[Block]:
    """`stats`: the corpus stage's stats.json (`{corpus.output_dir}/stats.json`), None when absent."""
    blocks: list[Block] = [heading(2, "Natural code corpus (phi-1's filtered half)")]
    status = corpus_status(stats, cfg)
    if stats is None or status is not None:  # not run, or not built
        return blocks + [para(status or "")]
    s = corpus_summary(stats, cfg)
    blocks.append(para(s["summary"]))
    blocks += [table(*s[key]) for key in ("counts", "teacher", "classifier")]
    if s["examples"]:
        blocks.append(para("Highest- and lowest-scored snippets (their first lines):"))
    for ex in s["examples"]:
        blocks += [para(f"{ex['which'].capitalize()}, score {ex['score']}, {ex['where']}:"), code(ex["excerpt"])]
    return blocks
