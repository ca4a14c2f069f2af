"""Typed artifacts between stages: one pydantic model per file a stage writes and another reads.

Each model holds exactly the keys its producer writes (a misspelled or unknown key is an error naming the file
and the key), each field with a short description. `Model.read(path)` parses a file (ArtifactError, a
RecordError, when it is missing, not JSON or not the model); `Model.parse(dict, source)` a producer's dict;
`model.dump()` gives the dict to write (the keys that were set, and only those: a key the producer left out
stays out, so a file read and written back is the same bytes); `model.write(path)` writes it as every stage
writes JSON.

- curation.py: GenerateStats, FilterStats, DedupeStats, DecontaminateStats (each with its `funnel()` row),
  ControlsStats, HumanEvalSimilarity, and the Ledger the LLM client's session gives (embedded in stats.json);
- corpus.py: CorpusPoolStats (extract), CorpusSelectStats (select);
- training.py: FinetuneMetrics, PretrainMetrics (with `examples`: train, eval, tokens, ...);
- evaluation.py: EvalMetrics, PerProblem, AblationMetrics, AblationPerProblem.

    python -c "from pipeline.core.artifacts import FinetuneMetrics as M; print(M.read('data/finetune/metrics.json').examples)"
"""

from pipeline.core.artifacts.base import Artifact, ArtifactError, Num, PerKind, Section
from pipeline.core.artifacts.corpus import CorpusPoolStats, CorpusSelectStats
from pipeline.core.artifacts.curation import (
    ControlsStats,
    DecontaminateStats,
    DedupeStats,
    FilterStats,
    GenerateStats,
    HumanEvalSimilarity,
    Ledger,
)
from pipeline.core.artifacts.evaluation import (
    MODEL_NAMES,
    AblationMetrics,
    AblationPerProblem,
    BenchmarkMetrics,
    Delta,
    EvalMetrics,
    HumanEvalMetrics,
    LikelihoodSet,
    ModelScore,
    PerProblem,
)
from pipeline.core.artifacts.training import Examples, FinetuneMetrics, PretrainMetrics, TrainingMetrics

__all__ = [
    "MODEL_NAMES", "AblationMetrics", "AblationPerProblem", "Artifact", "ArtifactError", "BenchmarkMetrics",
    "ControlsStats", "CorpusPoolStats", "CorpusSelectStats", "DecontaminateStats", "DedupeStats", "Delta",
    "EvalMetrics", "Examples", "FilterStats", "FinetuneMetrics", "GenerateStats", "HumanEvalMetrics",
    "HumanEvalSimilarity", "Ledger", "LikelihoodSet", "ModelScore", "Num", "PerKind", "PerProblem",
    "PretrainMetrics", "Section", "TrainingMetrics",
]
