"""Benchmark: the dedupe stage's core at 10k, 100k and 1M synthetic exercises, against a plain
per-document datasketch loop on the same 100k.

    .venv/bin/python bench/dedupe.py                            # 10k, 100k, 1M + the baseline
    .venv/bin/python bench/dedupe.py --sizes 10000,100000
    .venv/bin/python bench/dedupe.py --quick                    # 10k only, baseline on 10k: a smoke run

The exercises are generated from templates (random names, constants, statements, nesting,
docstrings; records shaped like the generate stage's, about 2 KB each), with a controlled
fraction of exact copies (reformatted, comments added) and near copies (a renamed
variable, one changed or added line) of earlier records. A further fraction belongs to a few
boilerplate families: a long prelude shared by every member, then a short body of its own,
so members are alike (Jaccard about 0.7, under the threshold) and crowd LSH buckets by the
thousand; some near copies are of family members, planted inside those crowded buckets.
Each planted copy's true Jaccard to its source (the stage's own ``shingle_set`` and
``jaccard``) is recorded with the dataset (planted_pairs.tsv). Datasets are cached in
``--workdir`` by size and seed.

Recall is measured on the planted near copies at or above ``dedupe.threshold``: caught when not
both the copy and its source are kept; below the threshold a copy is rightly kept. Precision is checked on every removal, recomputed from the input: an exact
removal must share its exact key with its kept record, a near one must have a true Jaccard at
or above the threshold with it.

Each measurement runs in its own child process; its peak memory is the largest sum of RSS
over the child and its worker processes, sampled every 0.2 s. The baseline reads the same
file, tokenises with the same tokeniser, updates one ``datasketch.MinHash`` per document
shingle by shingle (permutations shared, its fastest plain use) and queries, then inserts
into a ``MinHashLSH``. The last line of stdout is one JSON object with every figure:
per size docs/s, wall and CPU seconds, peak MB, what was removed against what was planted,
recall (all planted near pairs at or above the threshold, and those in boilerplate families) and
precision, the baseline's, the speedup (docs/s), the CPU ratio and whether the goals are met (1M
in < 10 min and < 4 GB, 10M in < 30 min and < 4 GB, recall >= 99% at every size, every removal
confirmed, >= 3x the baseline). ``--no-baseline`` skips the datasketch loop (a 10M run).

``--compare-datasketch`` measures instead whether datasketch's bulk API would do the stage's
MinHash work faster, on the same documents' shingle sets (20k exercises by default;
shingling is not timed): signatures from our ``MinHasher`` (its numpy batches of
BATCH_DOCS documents) against ``datasketch.MinHash.bulk`` (num_perm 128 for both; datasketch
gets each shingle hash's upper 32 bits, the input ours uses, through an identity hashfunc:
its cheapest use), then LSH banding of our signatures: our ``band_hashes`` +
``candidate_pairs`` against ``MinHashLSH`` insert + query (same bands and rows, so both must
find the same candidate pairs). Each timing is the best of ``--reps``; the last line is one
JSON object with docs/s, wall and CPU seconds of each and the ratios (ours / datasketch).

    .venv/bin/python bench/dedupe.py --compare-datasketch      # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.records import dumps, sha256_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXACT_FRACTION = 0.05
NEAR_FRACTION = 0.05
FAMILY_FRACTION = 0.05  # new records that are boilerplate-family members
FAMILIES = 8  # shared across chunks: at 1M each family has ~6,000 members
FAMILY_PRELUDE = 22  # statements of a family's shared prelude: members end up at Jaccard ~0.7
NEAR_OF_FAMILY = 0.2  # share of near copies taken from a family member (inside crowded buckets)
CHUNK = 5000  # records generated per task (duplicates copy from their own chunk)
GOAL_1M_S = 600.0
GOAL_10M_S = 1800.0
GOAL_MB = 4096.0
GOAL_SPEEDUP = 3.0
GOAL_RECALL = 0.99
PAIRS_FILE = "planted_pairs.tsv"  # copy row, source row, exact|near, true Jaccard, family (0/1)

# ---------------------------------------------------------------------------------------
# Synthetic exercises
# ---------------------------------------------------------------------------------------

WORDS = (
    "value item count total score price record entry name label index offset window limit ratio "
    "weight height width depth level rank grade size length width area volume speed distance time "
    "start end begin stop step delta error margin factor scale bias mean median mode sum product "
    "text word line char token prefix suffix pattern key field column row matrix vector node edge "
    "graph tree path route city station order customer invoice account balance amount rate tax "
    "temperature reading sample signal noise peak valley threshold bucket group cluster batch chunk "
    "queue stack heap cache buffer result output answer candidate best worst first last next prev "
    "user email phone address score student course lesson teacher book page chapter title author"
).split()
VERBS = ("compute find count filter merge split parse build collect normalize rank group sort "
         "summarize validate convert extract clean score match scale encode decode").split()
AUDIENCE = ("a data analyst", "a high-school student", "a biologist", "a game developer", "a teacher")
BUILTINS = ("len", "sum", "max", "min", "abs", "sorted", "round", "int", "float", "str")
OPS = ("+", "-", "*", "//", "%")
CMPS = ("<", ">", "<=", ">=", "==", "!=")


def _ident(rng: random.Random, parts: int = 2) -> str:
    return "_".join(rng.choice(WORDS) for _ in range(rng.randint(1, parts)))


def _const(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.6:
        return str(rng.randint(0, 1000))
    if kind < 0.85:
        return f"{rng.uniform(0, 100):.{rng.randint(1, 3)}f}"
    return repr(rng.choice(WORDS) + rng.choice(("", "_", "-", " ")) + rng.choice(WORDS))


def _expr(rng: random.Random, names: list[str]) -> str:
    roll = rng.random()
    a, b = rng.choice(names), rng.choice(names)
    if roll < 0.35:
        return f"{a} {rng.choice(OPS)} {_const(rng)}"
    if roll < 0.55:
        return f"{rng.choice(BUILTINS)}({a})"
    if roll < 0.7:
        return f"{a} {rng.choice(OPS)} {b}"
    if roll < 0.85:
        return f"[{_ident(rng, 1)} {rng.choice(OPS)} {_const(rng)} for {_ident(rng, 1)} in {a}]"
    return f"{a}.get({_const(rng)}, {_const(rng)})"


def _block(rng: random.Random, names: list[str], depth: int, budget: list[int]) -> list[str]:
    """Statements at indentation `depth`, spending the shared statement budget."""
    pad = "    " * depth
    lines: list[str] = []
    for _ in range(rng.randint(1, 4 if depth > 1 else 7)):
        if budget[0] <= 0:
            break
        budget[0] -= 1
        roll = rng.random()
        if roll < 0.4 or depth > 3:
            var = _ident(rng)
            lines.append(f"{pad}{var} = {_expr(rng, names)}")
            names.append(var)
        elif roll < 0.55:
            loop_var = _ident(rng, 1)
            lines.append(f"{pad}for {loop_var} in {rng.choice(names)}:")
            lines.extend(_block(rng, [*names, loop_var], depth + 1, budget) or [f"{pad}    pass"])
        elif roll < 0.7:
            lines.append(f"{pad}if {rng.choice(names)} {rng.choice(CMPS)} {_const(rng)}:")
            lines.extend(_block(rng, list(names), depth + 1, budget) or [f"{pad}    pass"])
            if rng.random() < 0.5:
                lines.append(f"{pad}else:")
                lines.extend(_block(rng, list(names), depth + 1, budget) or [f"{pad}    pass"])
        elif roll < 0.78:
            lines.append(f"{pad}while {rng.choice(names)} {rng.choice(CMPS[:2])} {_const(rng)}:")
            lines.append(f"{pad}    {rng.choice(names)} += {rng.randint(1, 9)}")
        elif roll < 0.86:
            lines.append(f"{pad}try:")
            lines.append(f"{pad}    {_ident(rng)} = {rng.choice(BUILTINS)}({rng.choice(names)})")
            lines.append(f"{pad}except (ValueError, TypeError):")
            lines.append(f"{pad}    {_ident(rng)} = {_const(rng)}")
        elif roll < 0.94:
            lines.append(f"{pad}{rng.choice(names)}.append({_expr(rng, names)})")
        else:  # a comment, then a statement (a block of only a comment would not parse)
            lines.append(f"{pad}# {' '.join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))}")
            lines.append(f"{pad}{rng.choice(names)} = {_expr(rng, names)}")
    return lines


def make_function(rng: random.Random) -> tuple[str, str, str, str]:
    """(name, prompt: signature + docstring, solution body, tests) of a new random function."""
    name = f"{rng.choice(VERBS)}_{_ident(rng)}"
    params = list(dict.fromkeys(_ident(rng, 1) for _ in range(rng.randint(1, 4))))
    doc = (f"{rng.choice(VERBS).capitalize()} the {' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))}"
           f" for {rng.choice(AUDIENCE)}.\n\n    Args:\n"
           + "".join(f"        {p}: the {rng.choice(WORDS)} {rng.choice(WORDS)}.\n" for p in params)
           + f"\n    Returns:\n        The {rng.choice(WORDS)} {rng.choice(WORDS)}.\n    ")
    prompt = f"def {name}({', '.join(params)}):\n    \"\"\"{doc}\"\"\""
    names = list(params)
    body = _block(rng, names, 1, [rng.randint(6, 28)])
    body.append(f"    return {rng.choice(names[len(params):] or names)}")
    tests = "\n".join(f"assert {name}({', '.join(_const(rng) for _ in params)}) is not None" for _ in range(3))
    return name, prompt, "\n".join(body), tests


def exact_copy(rng: random.Random, solution: str) -> str:
    """The same code, reformatted: blank lines, trailing comments, operator spacing."""
    out = []
    for line in solution.splitlines():
        if rng.random() < 0.2:
            out.append("")
        if rng.random() < 0.2 and not line.rstrip().endswith(":") and "#" not in line:
            line += f"  # {rng.choice(WORDS)}"
        out.append(line.replace(" = ", " =  ", 1) if rng.random() < 0.3 else line)
    return "\n".join(out)


def near_copy(rng: random.Random, solution: str) -> str:
    """A variable renamed, or one simple statement changed, or one line added."""
    lines = solution.splitlines()
    simple = [i for i, ln in enumerate(lines) if not ln.rstrip().endswith(":") and not ln.lstrip().startswith("#")]
    assigned = sorted({lines[i].split(" = ")[0].strip() for i in simple if " = " in lines[i]} - {""})
    roll = rng.random()
    if roll < 0.4 and assigned:
        old = rng.choice(assigned)
        return re.sub(rf"\b{re.escape(old)}\b", f"{old}_{rng.choice(WORDS)}", solution)
    i = rng.choice(simple)
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    new = f"{indent}{_ident(rng)} = {_const(rng)}"
    if roll < 0.7:
        lines[i] = new
    else:
        lines.insert(i, new)  # before a simple statement, at its indentation: still valid code
    return "\n".join(lines)


def record(rid: str, rng: random.Random, name: str, prompt: str, solution: str, tests: str) -> dict:
    raw = f"```python\n{prompt}\n{solution}\n\n# Tests\n{tests}\n```"
    return {
        "id": rid, "kind": "exercise",
        "attributes": {"topic": rng.choice(WORDS), "subtopic": rng.choice(WORDS), "audience": rng.choice(AUDIENCE),
                       "difficulty": rng.choice(("easy", "medium", "hard"))},
        "finish_reason": "stop", "model": "synthetic", "prompt_hash": sha256_text(rid),
        "sampling": {"max_tokens": 768, "n": 1, "seed": rng.randrange(2**31), "temperature": 0.8, "top_p": 0.95},
        "usage": {"completion_tokens": len(raw) // 4, "prompt_tokens": 180},
        "raw": raw,
        "parsed": {"function_name": name, "imports": "", "helpers": "", "prompt": prompt,
                   "docstring": prompt.split('"""')[1].strip(), "solution": solution, "tests": tests},
    }


def family_prelude(seed: int, family: int) -> list[str]:
    """The statements every member of a boilerplate family starts with (seeded per family)."""
    return _block(random.Random(f"{seed}:family:{family}"), ["items", "config"], 1, [FAMILY_PRELUDE])


def family_member(rng: random.Random, prelude: list[str]) -> tuple[str, str, str, str]:
    """A function of its own (name, docstring, three statements) after the family's prelude."""
    name, prompt, solution, tests = make_function(rng)
    body = solution.splitlines()
    return name, prompt, "\n".join([*prelude, *body[:3], body[-1]]), tests


def make_chunk(args: tuple[int, int, int, int, int]) -> tuple[str, int, int, str]:
    """(JSONL text, exact copies, near copies, planted_pairs.tsv lines) of records [start, start+count);
    seeded per chunk. Each copy's true Jaccard to its source is computed as the stage would."""
    from pipeline.stages.dedupe import jaccard, record_text, shingle_set

    seed, start, count, width, k = args
    rng = random.Random(f"{seed}:{start}")
    preludes = [family_prelude(seed, f) for f in range(FAMILIES)]
    made: list[tuple[int, str, str, str, str]] = []  # (row, name, prompt, solution, tests) of new records
    family: list[int] = []  # indexes into made of family members
    lines, pairs, n_exact, n_near = [], [], 0, 0
    for i in range(start, start + count):
        roll = rng.random()
        copy = None
        if made and roll < EXACT_FRACTION + NEAR_FRACTION:
            near = roll >= EXACT_FRACTION
            from_family = near and bool(family) and rng.random() < NEAR_OF_FAMILY
            src = made[rng.choice(family)] if from_family else rng.choice(made)
            name, prompt, solution, tests = src[1:]
            solution = near_copy(rng, solution) if near else exact_copy(rng, solution)
            copy = (src, near, from_family)
            n_near, n_exact = n_near + near, n_exact + (not near)
        else:
            in_family = roll < EXACT_FRACTION + NEAR_FRACTION + FAMILY_FRACTION
            name, prompt, solution, tests = (family_member(rng, rng.choice(preludes)) if in_family
                                             else make_function(rng))
            if in_family:
                family.append(len(made))
            made.append((i, name, prompt, solution, tests))
        rec = record(f"ex-{i:0{width}d}", rng, name, prompt, solution, tests)
        lines.append(dumps(rec) + "\n")
        if copy:
            (row, _, src_prompt, src_solution, _), near, from_family = copy
            j = jaccard(shingle_set("exercise", record_text("exercise", rec["parsed"]), k),
                        shingle_set("exercise", src_prompt + "\n" + src_solution, k))
            pairs.append(f"{i}\t{row}\t{'near' if near else 'exact'}\t{j!r}\t{int(from_family)}\n")
    return "".join(lines), n_exact, n_near, "".join(pairs)


def dataset(workdir: Path, n: int, seed: int) -> tuple[Path, dict]:
    """A folder with in/exercises.jsonl (n records) and an empty in/textbooks.jsonl, cached."""
    root = workdir / f"data-v2-{n}-{seed}"  # v2: families and planted_pairs.tsv
    meta_path = root / "planted.json"
    if meta_path.is_file():
        return root, json.loads(meta_path.read_text())
    (root / "in").mkdir(parents=True, exist_ok=True)
    k = load_config(REPO / "params.yaml", []).dedupe.shingle_size
    tasks = [(seed, s, min(CHUNK, n - s), 7, k) for s in range(0, n, CHUNK)]
    planted = {"exact": 0, "near": 0}
    t0 = time.monotonic()
    with (root / "in" / "exercises.jsonl").open("w", encoding="utf-8") as fh, \
            (root / PAIRS_FILE).open("w", encoding="utf-8") as pairs_fh, \
            multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        for text, n_exact, n_near, pairs in pool.imap(make_chunk, tasks):
            fh.write(text)
            pairs_fh.write(pairs)
            planted["exact"] += n_exact
            planted["near"] += n_near
    (root / "in" / "textbooks.jsonl").write_text("")
    planted["bytes"] = (root / "in" / "exercises.jsonl").stat().st_size
    meta_path.write_text(json.dumps(planted))
    print(f"generated {n} records ({planted['bytes'] / 1e6:.0f} MB) in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return root, planted


# ---------------------------------------------------------------------------------------
# Recall and precision, from the stage's outputs (after the measurement, untimed)
# ---------------------------------------------------------------------------------------


def _line_offsets(path: Path) -> np.ndarray:
    """Byte offset of every line's start, plus the file's size (row r is ex-{r})."""
    starts, pos = [np.zeros(1, np.int64)], 0
    with path.open("rb") as fh:
        while block := fh.read(64 << 20):
            starts.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10).astype(np.int64) + pos + 1)
            pos += len(block)
    return np.concatenate(starts)


def check_removals(args: tuple[str, int, float, list[tuple[int, int, int, int, int, int]]]) -> list[bool]:
    """For (removed offset, length, kept offset, length, kind, _) spans: is the removal confirmed?
    A true Jaccard at or above the threshold, else (an exact removal) the same exact key."""
    from pipeline.stages.dedupe import exact_key, jaccard, record_text, shingle_set

    path, k, threshold, spans = args
    out = []
    with open(path, "rb") as fh:
        for off_a, len_a, off_b, len_b, exact, _ in spans:
            a, b = (record_text("exercise", json.loads(os.pread(fh.fileno(), n, off))["parsed"])
                    for off, n in ((off_a, len_a), (off_b, len_b)))
            ok = jaccard(shingle_set("exercise", a, k), shingle_set("exercise", b, k)) >= threshold
            out.append(ok or (bool(exact) and exact_key("exercise", a)[0] == exact_key("exercise", b)[0]))
    return out


def quality(root: Path, n: int) -> dict:
    """Recall on the planted near pairs at or above the threshold (all, and in boilerplate families),
    and precision: the share of removals confirmed against the input."""
    cfg = load_config(REPO / "params.yaml", []).dedupe
    survivor = np.arange(n)
    removals = []  # (row, kept row, exact)
    with (root / "out" / "removed.jsonl").open("rb") as fh:
        for line in fh:
            rec = json.loads(line)
            row, kept = int(rec["id"][3:]), int(rec["duplicate_of"][3:])
            survivor[row] = kept
            removals.append((row, kept, rec["kind_of_duplicate"] == "exact"))
    cols = np.loadtxt(root / PAIRS_FILE, dtype=str, delimiter="\t", ndmin=2)
    copy, source = cols[:, 0].astype(np.int64), cols[:, 1].astype(np.int64)
    near, jac, fam = cols[:, 2] == "near", cols[:, 3].astype(float), cols[:, 4] == "1"
    # A pair is caught when not both of it are kept: the copy (or its source) went as a confirmed
    # duplicate. Same-cluster is too strict: a source removed as the duplicate of a third record
    # that its copy is under the threshold with rightly leaves the copy kept.
    found = (survivor[copy] != copy) | (survivor[source] != source)
    at = near & (jac >= cfg.threshold)

    def recall(mask: np.ndarray) -> dict:
        hit = int((found & mask).sum())
        return {"pairs": int(mask.sum()), "found": hit, "recall": round(hit / max(int(mask.sum()), 1), 5)}

    offsets = _line_offsets(root / "in" / "exercises.jsonl")
    spans = [(int(offsets[r]), int(offsets[r + 1] - offsets[r] - 1), int(offsets[s]),
              int(offsets[s + 1] - offsets[s] - 1), int(e), 0) for r, s, e in removals]
    tasks = [(str(root / "in" / "exercises.jsonl"), cfg.shingle_size, cfg.threshold, spans[i: i + 2000])
             for i in range(0, len(spans), 2000)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        confirmed = sum(sum(part) for part in pool.imap(check_removals, tasks))
    return {
        "threshold": cfg.threshold,
        "planted_near_at_or_above_threshold": recall(at), "planted_near_in_families": recall(at & fam),
        "planted_near_below_threshold": {"pairs": int((near & ~at).sum()), "removed": int((found & near & ~at).sum())},
        "planted_exact": recall(~near),
        "removals": len(removals), "removals_confirmed": int(confirmed),
        "precision": round(confirmed / max(len(removals), 1), 6),
    }


# ---------------------------------------------------------------------------------------
# Measured children
# ---------------------------------------------------------------------------------------


def _cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (the stage's worker processes)."""
    return sum(ru.ru_utime + ru.ru_stime for ru in (resource.getrusage(resource.RUSAGE_SELF),
                                                       resource.getrusage(resource.RUSAGE_CHILDREN)))


def child_stage(root: Path, seed: int) -> dict:
    from pipeline.stages.dedupe import run_dedupe

    cfg = load_config(REPO / "params.yaml", [f"seed={seed}", f"dedupe.input_dir={root}/in",
                                             f"dedupe.output_dir={root}/out"])
    t0 = time.monotonic()  # CLOCK_MONOTONIC is system-wide: the parent splits its RSS samples by phase with it
    stats = run_dedupe(cfg, REPO / "params.yaml", progress=False)
    return {"wall_s": time.monotonic() - t0, "cpu_s": _cpu_s(), "stats": stats, "t0": t0}


def child_baseline(root: Path, seed: int) -> dict:
    """A plain datasketch loop: one MinHash per document, updated shingle by shingle, then LSH."""
    from datasketch import MinHash, MinHashLSH

    from pipeline.stages.dedupe import record_text, tokenize

    cfg = load_config(REPO / "params.yaml", [f"seed={seed}"]).dedupe
    k = cfg.shingle_size
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    permutations = MinHash(num_perm=cfg.num_perm, seed=seed).permutations
    t0 = time.monotonic()
    docs = removed = 0
    with (root / "in" / "exercises.jsonl").open("rb") as fh:
        for line in fh:
            rec = json.loads(line)
            tokens = tokenize("exercise", record_text("exercise", rec["parsed"]))
            m = MinHash(num_perm=cfg.num_perm, seed=seed, permutations=permutations, scheme="affine32")
            for i in range(max(1, len(tokens) - k + 1)):
                m.update(" ".join(tokens[i: i + k]).encode("utf-8"))
            if lsh.query(m):
                removed += 1
            else:
                lsh.insert(rec["id"], m)
            docs += 1
    return {"wall_s": time.monotonic() - t0, "cpu_s": _cpu_s(), "docs": docs, "removed": removed}


def _best(fn: Callable[[], object], reps: int) -> tuple[object, float, float]:
    """(fn's result, best wall seconds, best CPU seconds of this process) over reps runs."""
    walls, cpus, out = [], [], None
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return out, min(walls), min(cpus)


def child_compare(root: Path, seed: int, reps: int) -> dict:
    """Our MinHash signatures and LSH banding against datasketch's, on the same shingle sets."""
    import numpy as np
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    from pipeline.stages.dedupe import (
        BATCH_DOCS,
        MinHasher,
        band_hashes,
        candidate_pairs,
        optimal_bands,
        raw_tokens,
        record_text,
        shingle_hashes,
    )

    cfg = load_config(REPO / "params.yaml", [f"seed={seed}"]).dedupe
    with (root / "in" / "exercises.jsonl").open("rb") as fh:
        texts = [record_text("exercise", json.loads(line)["parsed"]) for line in fh]
    n = len(texts)
    # The shingle sets, untimed: the stage's batches of (64-bit shingle hashes, shingles per document).
    batches = [shingle_hashes([raw_tokens("exercise", t) for t in texts[lo: lo + BATCH_DOCS]], cfg.shingle_size)
               for lo in range(0, n, BATCH_DOCS)]
    # datasketch's input, untimed: per document the upper 32 bits of each shingle hash (what MinHasher
    # permutes), as Python ints, so its hashfunc can be the identity.
    per_doc = [part.tolist() for hashes, counts in batches
               for part in np.split(hashes >> np.uint64(32), np.cumsum(counts)[:-1])]

    hasher = MinHasher(cfg.num_perm, seed)
    ours_sig, ours_wall, ours_cpu = _best(
        lambda: np.concatenate([hasher.signatures(h, c) for h, c in batches]), reps)
    lean, ds_wall, ds_cpu = _best(
        lambda: MinHash.bulk(per_doc, num_perm=cfg.num_perm, seed=seed, hashfunc=_identity), reps)
    assert len(lean) == len(ours_sig) == n

    bands, rows = optimal_bands(cfg.threshold, cfg.num_perm)
    ours_pairs, lsh_wall, lsh_cpu = _best(lambda: candidate_pairs(band_hashes(ours_sig, bands, rows)), reps)
    ours_as_lean = [LeanMinHash(seed=seed, hashvalues=sig, scheme="affine32") for sig in ours_sig]  # untimed

    def datasketch_lsh() -> set[tuple[int, int]]:
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(bands, rows))
        for i, m in enumerate(ours_as_lean):
            lsh.insert(i, m)
        return {(min(i, j), max(i, j)) for i, m in enumerate(ours_as_lean) for j in lsh.query(m) if j != i}

    ds_pairs, ds_lsh_wall, ds_lsh_cpu = _best(datasketch_lsh, reps)

    def figures(wall: float, cpu: float) -> dict:
        return {"docs_per_s": round(n / wall, 1), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}

    return {
        "docs": n, "shingles": int(sum(len(h) for h, _ in batches)), "num_perm": cfg.num_perm, "reps": reps,
        "bands": bands, "rows": rows,
        "signatures": {"ours": figures(ours_wall, ours_cpu), "datasketch_bulk": figures(ds_wall, ds_cpu),
                       "ratio_wall": round(ds_wall / ours_wall, 2), "ratio_cpu": round(ds_cpu / ours_cpu, 2)},
        "lsh": {"ours": {**figures(lsh_wall, lsh_cpu), "candidate_pairs": len(ours_pairs)},
                "datasketch": {**figures(ds_lsh_wall, ds_lsh_cpu), "candidate_pairs": len(ds_pairs)},
                "same_pairs": set(map(tuple, ours_pairs.tolist())) == ds_pairs,
                "ratio_wall": round(ds_lsh_wall / lsh_wall, 2), "ratio_cpu": round(ds_lsh_cpu / lsh_cpu, 2)},
    }


def _identity(x: int) -> int:
    return x


def _tree_rss_mb(pid: int) -> float:
    """Sum of RSS over a process and all its descendants, from /proc."""
    parents, rss = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        rss[int(entry.name)] = int(fields[21]) * page
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return sum(rss.get(p, 0) for p in tree) / 2**20


def measure(mode: str, root: Path, seed: int, extra: tuple[str, ...] = ()) -> dict:
    """Run one measurement in a child process; its result plus the peak RSS of its process tree and
    the 1-minute load average before and after (this machine may be shared: load shows contention)."""
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, "--data", str(root), "--seed", str(seed), *extra],
                            stdout=subprocess.PIPE, text=True)
    samples: list[tuple[float, float]] = []  # (monotonic time, RSS of the tree in MB)

    def sample() -> None:
        while proc.poll() is None:
            samples.append((time.monotonic(), _tree_rss_mb(proc.pid)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_mb"] = round(max((mb for _, mb in samples), default=0.0), 1)
    if "t0" in result:  # the stage's phases, from its own timing
        lo, by_phase = result["t0"], {}
        for phase in ("index_s", "decide_s", "write_s"):
            hi = lo + result["stats"]["timing"][phase]
            by_phase[phase.removesuffix("_s")] = round(max((mb for t, mb in samples if lo <= t <= hi), default=0.0), 1)
            lo = hi
        result["peak_mb_by_phase"] = by_phase
    result["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="Comma-separated record counts.")
    parser.add_argument("--quick", action="store_true", help="10k only, baseline on 10k: a smoke run.")
    parser.add_argument("--baseline-size", type=int, default=100_000, help="Records for the datasketch baseline.")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dedupe-bench"))
    parser.add_argument("--compare-datasketch", action="store_true",
                        help="Our MinHash signatures and LSH banding against datasketch's, on the same shingle sets.")
    parser.add_argument("--compare-size", type=int, default=20_000, help="Records for --compare-datasketch.")
    parser.add_argument("--reps", type=int, default=3, help="--compare-datasketch: best of this many runs.")
    parser.add_argument("--no-baseline", action="store_true", help="Skip the datasketch baseline (for 10M runs).")
    parser.add_argument("--out", help="Also write the report here (e.g. bench/results/dedupe.json), after each size; "
                                      "sizes already in the file and not run again are kept.")
    parser.add_argument("--child", choices=("stage", "baseline", "compare"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "compare":
        print(json.dumps(child_compare(Path(args.data), args.seed, args.reps)))
        return
    if args.child:
        fn = child_stage if args.child == "stage" else child_baseline
        print(json.dumps(fn(Path(args.data), args.seed)))
        return
    if args.compare_datasketch:
        root, _ = dataset(Path(args.workdir), args.compare_size, args.seed)
        print(json.dumps(measure("compare", root, args.seed, ("--reps", str(args.reps))), sort_keys=True))
        return

    sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    base_n = 10_000 if args.quick else args.baseline_size
    workdir = Path(args.workdir)
    report: dict = {"cores": os.cpu_count(), "sizes": {}}
    if args.out:  # sizes measured before (another run, another day) stay, each with its commit and date
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        if Path(args.out).is_file():
            report = {**json.loads(Path(args.out).read_text()), "cores": os.cpu_count()}
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    if commit and subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True).stdout.strip():
        commit += "+changes"  # measured on uncommitted code
    for n in sizes:
        root, planted = dataset(workdir, n, args.seed)
        res = measure("stage", root, args.seed)
        ex = res["stats"]["exercise"]
        report["sizes"][str(n)] = {
            "docs_per_s": round(n / res["wall_s"], 1), "wall_s": round(res["wall_s"], 1), "peak_mb": res["peak_mb"],
            "cpu_s": round(res["cpu_s"], 1), "load_avg": res["load_avg"], "peak_mb_by_phase": res["peak_mb_by_phase"],
            "commit": commit, "date": time.strftime("%Y-%m-%d"),
            "resumed": res["stats"]["timing"]["resumed"]["exercise"],
            "input_mb": round(planted["bytes"] / 2**20, 1), "kept": ex["kept"], "removed_exact": ex["removed_exact"],
            "removed_near": ex["removed_near"], "planted_exact": planted["exact"], "planted_near": planted["near"],
            "candidate_pairs": ex["candidate_pairs"], "confirmed_pairs": ex["confirmed_pairs"],
            "bands": res["stats"]["lsh"]["bands"], "rows": res["stats"]["lsh"]["rows"],
            "phases_s": {k: v for k, v in res["stats"]["timing"].items() if k.endswith("_s") and k != "docs_per_s"},
            "quality": quality(root, n),
        }
        print(json.dumps({str(n): report["sizes"][str(n)]}), file=sys.stderr)
        if args.out:  # what is measured so far survives a later size that runs out of time
            Path(args.out).write_text(json.dumps(report, sort_keys=True, indent=1) + "\n")
    if not args.no_baseline:
        root, _ = dataset(workdir, base_n, args.seed)
        base = measure("baseline", root, args.seed)
        report["baseline"] = {"docs": base["docs"], "docs_per_s": round(base["docs"] / base["wall_s"], 1),
                              "wall_s": round(base["wall_s"], 1), "cpu_s": round(base["cpu_s"], 1),
                              "peak_mb": base["peak_mb"], "removed": base["removed"], "load_avg": base["load_avg"]}
        same = report["sizes"].get(str(base_n))
        report["speedup"] = round(same["docs_per_s"] / report["baseline"]["docs_per_s"], 2) if same else None
        # CPU seconds per document, baseline over stage: the work saved, whatever else runs here.
        report["cpu_ratio"] = round(base["cpu_s"] / base["docs"] / (same["cpu_s"] / base_n), 2) if same else None
    big, huge = report["sizes"].get("1000000"), report["sizes"].get("10000000")
    report["goals"] = {
        "1M_under_10_min": big["wall_s"] < GOAL_1M_S if big else None,
        "1M_under_4_GB": big["peak_mb"] < GOAL_MB if big else None,
        "10M_under_30_min": huge["wall_s"] < GOAL_10M_S if huge else None,
        "10M_under_4_GB": huge["peak_mb"] < GOAL_MB if huge else None,
        "recall_at_least_99pct_every_size": all(
            v["quality"][key]["recall"] >= GOAL_RECALL for v in report["sizes"].values()
            for key in ("planted_near_at_or_above_threshold", "planted_near_in_families")),
        "every_removal_confirmed": all(v["quality"]["precision"] == 1.0 for v in report["sizes"].values()),
        "speedup_at_least_3x": report["speedup"] >= GOAL_SPEEDUP if report.get("speedup") else None,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, sort_keys=True, indent=1) + "\n")
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
