"""Filter stage: keep an exercise only if it is well-formed and its solution passes its own tests.

Every record gets keep-or-drop with a reason (datatrove style). Exercises:

1. the code parses (signature + docstring + solution, helpers, imports, tests);
2. the function named in the signature exists and has its docstring;
3. the solution is not empty or a placeholder (`pass`, `...`, TODO, NotImplementedError);
4. length bounds (characters, solution lines);
5. imports only from `filter.allowed_imports`;
6. tests exist, contain asserts and call the function;
7. the solution passes its tests in the sandbox, and
8. a deliberately broken solution (body replaced by `pass`) fails them: tests that assert
   nothing useful are dropped too.

Textbooks get the checks that fit: every code block parses, length bounds in words.
Rejected records go to `rejected.jsonl` with `filter_reason` and `filter_detail`; `stats.json`
is the funnel. Work is done in resumable shards: a killed run redoes at most one shard.

    textbook filter --set filter.sandbox.timeout_s=5
"""

from __future__ import annotations

import ast
import logging
import time
from collections import Counter
from pathlib import Path

from pipeline.core.config import FilterConfig, RunConfig, configs_dir, to_dict
from pipeline.core.records import dumps, read_jsonl, run_sharded, write_json, write_jsonl
from pipeline.core.schema import RECORD_FIELDS, exercise_program, require_parsed
from pipeline.core.stage import write_resolved_config
from pipeline.sandbox import Job, Sandbox

log = logging.getLogger(__name__)

class Reject(Exception):
    """A record fails a check: args are (reason, detail)."""


def _is_placeholder(stmts: list[ast.stmt]) -> bool:
    def trivial(s: ast.stmt) -> bool:
        if isinstance(s, ast.Pass):
            return True
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and s.value.value in (Ellipsis,):
            return True
        if isinstance(s, ast.Raise) and s.exc is not None:
            target = s.exc.func if isinstance(s.exc, ast.Call) else s.exc
            return isinstance(target, ast.Name) and target.id == "NotImplementedError"
        return False
    return all(trivial(s) for s in stmts)


def static_checks(parsed: dict, cfg: FilterConfig) -> None:
    """Raise Reject(reason, detail) for the first check an exercise fails."""
    name = parsed["function_name"]
    code = parsed["prompt"] + "\n" + parsed["solution"]
    try:
        tree = ast.parse(exercise_program(parsed))
    except SyntaxError as exc:
        raise Reject("syntax_error", f"line {exc.lineno}: {exc.msg}") from None
    try:
        tests = ast.parse(parsed["tests"])
    except SyntaxError as exc:
        raise Reject("tests_syntax_error", f"line {exc.lineno}: {exc.msg}") from None
    func = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if func is None:
        raise Reject("missing_function", f"no top-level function named {name!r}")
    if ast.get_docstring(func) is None:
        raise Reject("missing_docstring", name)
    body = func.body[1:]
    if not body or _is_placeholder(body) or "TODO" in parsed["solution"]:
        raise Reject("placeholder_solution", parsed["solution"].strip()[:80])
    lines = [ln for ln in parsed["solution"].splitlines() if ln.strip()]
    if len(code) < cfg.min_chars or len(lines) < cfg.min_solution_lines:
        raise Reject("too_short", f"{len(code)} chars, {len(lines)} solution lines")
    if len(code) > cfg.max_chars or len(lines) > cfg.max_solution_lines:
        raise Reject("too_long", f"{len(code)} chars, {len(lines)} solution lines")
    allowed = set(cfg.allowed_imports)
    for node in ast.walk(ast.Module(body=tree.body + tests.body, type_ignores=[])):
        mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for mod in mods:
            if mod.split(".")[0] not in allowed:
                raise Reject("disallowed_import", mod)
    asserts = [n for n in ast.walk(tests) if isinstance(n, ast.Assert)]
    if len(asserts) < max(1, cfg.min_asserts):
        raise Reject("no_tests", f"{len(asserts)} assert(s)")
    if not any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(tests)):
        raise Reject("tests_do_not_call_function", name)


def textbook_checks(parsed: dict, cfg: FilterConfig) -> None:
    words = len(parsed["text"].split())
    if words < cfg.textbook_min_words:
        raise Reject("too_short", f"{words} words")
    if words > cfg.textbook_max_words:
        raise Reject("too_long", f"{words} words")
    for i, block in enumerate(parsed["code_blocks"], 1):
        try:
            ast.parse(block)
        except SyntaxError as exc:
            raise Reject("code_syntax_error", f"block {i}, line {exc.lineno}: {exc.msg}") from None


def _verdict_detail(v) -> str:
    parts = [v.status]
    if v.error_type:
        parts.append(f"{v.error_type}: {(v.error_message or '')[:200]}")
    if v.failed_source:
        parts.append(f"at: {v.failed_source.strip()[:200]}")
    return " | ".join(parts)


def filter_shard(records: list[dict], cfg: FilterConfig, sandbox: Sandbox) -> list[dict]:
    """Decide every record of a shard: each comes back with `filter_reason` (None = kept)."""
    decided: dict[str, tuple[str | None, str]] = {}
    jobs, owners = [], []
    for rec in records:
        parsed = rec["parsed"]
        try:
            if rec["kind"] == "exercise":
                static_checks(parsed, cfg)
                jobs.append(Job(exercise_program(parsed), test=parsed["tests"], job_id=rec["id"]))
                owners.append((rec["id"], "solution"))
                if cfg.check_vacuous_tests:
                    jobs.append(Job(exercise_program(parsed, "    pass"), test=parsed["tests"], job_id=rec["id"]))
                    owners.append((rec["id"], "broken"))
            else:
                textbook_checks(parsed, cfg)
            decided[rec["id"]] = (None, "")
        except Reject as rej:
            decided[rec["id"]] = (rej.args[0], rej.args[1])
    for (rid, role), verdict in zip(owners, sandbox.run(jobs), strict=True):
        if decided[rid][0] is not None:
            continue  # the solution already failed: that is the reason
        if role == "solution" and not verdict.passed:
            decided[rid] = (f"tests_failed:{verdict.status}", _verdict_detail(verdict))
        elif role == "broken" and verdict.passed:
            decided[rid] = ("vacuous_tests", "the tests pass with the body replaced by `pass`")
    return [{**rec, "filter_reason": decided[rec["id"]][0], "filter_detail": decided[rec["id"]][1]}
            for rec in records]


def run_filter(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    fc = cfg.filter
    in_dir, out_dir = Path(fc.input_dir), Path(fc.output_dir)
    records = []
    for kind in ("exercises", "textbooks"):
        path = in_dir / f"{kind}.jsonl"
        for rec in read_jsonl(path, required=RECORD_FIELDS):
            require_parsed(rec, str(path), kind[:-1])
            records.append(rec)
    records.sort(key=lambda r: r["id"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, configs_dir(config_path), "filter", out_dir)

    t0 = time.monotonic()
    # The fingerprint covers what decides a verdict; workers and isolation do not change verdicts.
    fingerprint = dumps({k: v for k, v in to_dict(fc).items() if k not in ("input_dir", "output_dir", "shard_size")})
    isolation = "none"
    if records:
        with Sandbox(fc.sandbox) as sandbox:
            isolation = sandbox.isolation
            decided = run_sharded(records, fc.shard_size, out_dir / ".shards", fingerprint,
                                  lambda shard: filter_shard(shard, fc, sandbox), progress, "filter")
    else:
        decided = []
    elapsed = time.monotonic() - t0

    kept = [{k: v for k, v in r.items() if k not in ("filter_reason", "filter_detail")}
            for r in decided if r["filter_reason"] is None]
    rejected = [r for r in decided if r["filter_reason"] is not None]
    write_jsonl(out_dir / "exercises.jsonl", [r for r in kept if r["kind"] == "exercise"])
    write_jsonl(out_dir / "textbooks.jsonl", [r for r in kept if r["kind"] == "textbook"])
    write_jsonl(out_dir / "rejected.jsonl", rejected)
    funnel = {}
    for kind in ("exercise", "textbook"):
        mine = [r for r in decided if r["kind"] == kind]
        reasons = Counter(r["filter_reason"] for r in mine if r["filter_reason"])
        funnel[kind] = {"in": len(mine), "kept": sum(1 for r in mine if r["filter_reason"] is None),
                        "dropped": sum(reasons.values()), "dropped_by_reason": dict(sorted(reasons.items()))}
    stats = {**funnel, "isolation": isolation,
             "timing": {"wall_s": round(elapsed, 2), "records_per_s": round(len(records) / max(elapsed, 1e-9), 1)}}
    write_json(out_dir / "stats.json", stats)
    for path in (out_dir / ".shards").glob("shard-*.jsonl"):
        path.unlink()  # finished: the markers have served their purpose
    return stats


def main(args) -> int:
    from pipeline.core.stage import load_stage_config

    cfg, path = load_stage_config(args)
    stats = run_filter(cfg, path, progress=not args.quiet)
    print(dumps({k: {"in": v["in"], "kept": v["kept"]} for k, v in stats.items() if k in ("exercise", "textbook")}))
    return 0
