"""Corpus stage: phi-1's other half, natural Python code filtered by an educational-value classifier.

phi-1's CodeTextbook is ~6B tokens of The Stack and StackOverflow kept by a random forest trained on
GPT-4's ratings of "educational value for a student whose goal is to learn basic coding concepts",
beside ~1B synthetic textbook tokens. This stage builds that half, in two steps (``corpus.step``),
with the project's own dedupe and decontaminate stages between them (dvc.yaml: ``corpus_extract``,
``dedupe_corpus``, ``decontaminate_corpus``, ``corpus``):

1. ``extract`` (extract.py, sources.py): folders or globs (default: the standard library and
   site-packages of the running Python), JSONL or parquet files, or a streamed Hugging Face dataset,
   split into snippets (documented functions and classes with the imports they use, whole small
   files; tests, vendored, generated and unparsable files dropped: :mod:`pipeline.core.snippets`),
   in resumable shards, written as records dedupe and decontaminate read unchanged;
2. ``select`` (annotate.py, classify.py): the teacher rates a seeded sample (``corpus.annotate``)
   on a 1-5 scale with phi-1's intent in the prompt, a subset twice (self-agreement); a random forest
   on all-MiniLM-L6-v2 embeddings learns ``rating >= corpus.positive_score`` and reports held-out
   precision, recall and ROC AUC; every snippet is embedded (resumable shards) and scored; the top
   ``corpus.keep_fraction`` (or all over ``corpus.threshold``) is kept.

Outputs of select (``corpus.output_dir``): kept.jsonl (``text``, ``score``, where it came from: what
``pretrain.extra_corpus`` reads), scores.jsonl, annotations.jsonl, stats.json, resolved_config.yaml.
``corpus.enabled: false`` (the cpu-offline and ci profiles): each step writes its outputs empty, stats.json
``{"enabled": false}``, in a moment (stage.py: ``disabled``).

    textbook corpus --set corpus.step=extract --set corpus.roots=[stdlib/json]
    dvc repro corpus
"""

from __future__ import annotations

from pipeline.stages.corpus.stage import main, record_text, run_corpus, run_select

__all__ = ["main", "record_text", "run_corpus", "run_select"]
