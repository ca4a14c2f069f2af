"""The educational-value classifier: a scikit-learn random forest (phi-1's choice) on sentence
embeddings of the snippets, trained on the teacher's ratings; held-out precision, recall and ROC AUC,
at P >= 0.5 and at the selection rule (the share kept).

Scoring is one `predict_proba` per batch of embeddings; `bench/corpus.py` measures it apart from
embedding (the cost that dominates).
"""

from __future__ import annotations

import base64

import numpy as np

EMBED_DTYPE = np.float16  # what a saved shard holds: half the bytes, scores unchanged to ~1e-3


def pack(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype=EMBED_DTYPE).tobytes()).decode("ascii")


def unpack(rows: list[str]) -> np.ndarray:
    """Packed embeddings as one float32 matrix."""
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    buf = b"".join(base64.b64decode(r) for r in rows)
    return np.frombuffer(buf, dtype=EMBED_DTYPE).reshape(len(rows), -1).astype(np.float32)


def train(X: np.ndarray, y: np.ndarray, trees: int, heldout_fraction: float, seed: int, keep_fraction: float,
          threshold: float):
    """(the forest trained on the training split, its held-out metrics, the training rows' indices and their
    out-of-bag scores). The split is stratified when both classes have at least two examples; the metrics are
    those of the model that scores. A forest scores the rows it trained on near 0 or 1 (it has seen their
    labels), so a training row's score is its out-of-bag one: from the trees whose bootstrap left it out."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    stratify = y if min(np.bincount(y, minlength=2)) >= 2 else None
    tr, te = train_test_split(idx, test_size=heldout_fraction, random_state=seed, stratify=stratify)
    forest = RandomForestClassifier(n_estimators=trees, class_weight="balanced", random_state=seed, n_jobs=1,
                                    oob_score=len(set(y[tr].tolist())) == 2)
    forest.fit(X[tr], y[tr])
    forest.n_jobs = -1  # scoring: every core (training stays single-threaded, so it is the same on any machine)
    p = positive_proba(forest, X[te])
    pred = (p >= 0.5).astype(int)
    both = len(set(y[te].tolist())) == 2
    kept, _ = keep_mask(p, keep_fraction, threshold)
    metrics = {
        "model": "RandomForestClassifier", "trees": trees, "class_weight": "balanced",
        "train": int(len(tr)), "heldout": int(len(te)),
        "train_positive": int(y[tr].sum()), "heldout_positive": int(y[te].sum()),
        "precision": round(float(precision_score(y[te], pred, zero_division=0)), 4),
        "recall": round(float(recall_score(y[te], pred, zero_division=0)), 4),
        "f1": round(float(f1_score(y[te], pred, zero_division=0)), 4),
        "accuracy": round(float(accuracy_score(y[te], pred)), 4),
        "roc_auc": round(float(roc_auc_score(y[te], p)), 4) if both else None,
        "heldout_base_rate": round(float(y[te].mean()), 4) if len(te) else None,
        **at_keep(y[te], kept),
    }
    return forest, metrics, tr, out_of_bag(forest, X[tr])


def at_keep(y: np.ndarray, kept: np.ndarray) -> dict:
    """The held-out metrics of the selection rule itself (the top keep_fraction, or the threshold): how many
    held-out rows it keeps, the share of them rated educational (precision), the share of the educational
    ones it keeps (recall) and precision over the base rate (lift: 1.0 is a random selection's)."""
    n_kept, pos = int(kept.sum()), int(y.sum())
    hits = int(y[kept].sum())
    precision = hits / n_kept if n_kept else None
    base = pos / len(y) if len(y) else None
    return {"heldout_kept": n_kept,
            "precision_at_keep": round(precision, 4) if precision is not None else None,
            "recall_at_keep": round(hits / pos, 4) if pos else None,
            "lift_at_keep": round(precision / base, 3) if precision is not None and base else None}


def out_of_bag(forest, X: np.ndarray) -> np.ndarray:
    """Each training row's P(educational) from the trees that did not see it (in-sample where a row was in
    every bootstrap, or the forest was fit on one class)."""
    oob = getattr(forest, "oob_decision_function_", None)
    if oob is None:
        return positive_proba(forest, X)
    p = oob[:, list(forest.classes_).index(1)].copy()
    missing = np.isnan(p)
    if missing.any():  # the forest's own fit, only for those rows
        p[missing] = positive_proba(forest, X[missing])
    return p


def positive_proba(forest, X: np.ndarray) -> np.ndarray:
    """P(educational) of each row."""
    if len(X) == 0:
        return np.zeros(0)
    proba = forest.predict_proba(X)
    classes = list(forest.classes_)
    return proba[:, classes.index(1)] if 1 in classes else np.zeros(len(X))


def keep_mask(scores: np.ndarray, keep_fraction: float, threshold: float) -> tuple[np.ndarray, float]:
    """(which snippets are kept, the lowest kept score). With a threshold: every score at or above it;
    else the top ceil(keep_fraction x N), ties broken by input order (stable, so runs agree)."""
    if threshold > 0:
        mask = scores >= threshold
    else:
        k = int(np.ceil(keep_fraction * len(scores)))
        order = np.argsort(-scores, kind="stable")
        mask = np.zeros(len(scores), dtype=bool)
        mask[order[:k]] = True
    cut = float(scores[mask].min()) if mask.any() else float("nan")
    return mask, cut
