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

`filter.assert_policy: drop_failing` judges 7 and 8 assert by assert instead: a plausible
solution with one wrong hand-computed expected value among its asserts (the teacher's most
common mistake) is kept with that assert removed, under safeguards (only AssertionErrors, at
most `max_dropped_fraction` of the asserts, at least `min_kept_asserts` left that a `pass` body
fails); the dropped asserts and the values seen stay in the record (`dropped_asserts`).

`filter.assert_policy: observed` trusts the teacher's code over its mental arithmetic: the
expected value of a failing `assert f(x) == y` is replaced by the value the solution returned
(CRUXEval-style output recording), asserts whose inputs make the solution raise are dropped, and
the exercise is kept if at least `min_agreeing_asserts` of the teacher's own expected values
matched the solution (evidence that the code does what the teacher meant), at least
`min_kept_asserts` asserts remain that a `pass` body fails, and the rewritten tests pass when run
again (a solution that answers differently twice is dropped). The originals stay in the record
(`rewritten_asserts`, `dropped_asserts`).

Textbooks get the checks that fit: every code block parses, length bounds in words.
Rejected records go to `rejected.jsonl` with `filter_reason` and `filter_detail`; `stats.json`
is the funnel. Work is done in resumable shards: a killed run redoes at most one shard. Records
stream from the input through the shards to the outputs, so memory does not grow with the input
(bench/filter_memory.py).

    textbook filter --set filter.sandbox.timeout_s=5
"""

from __future__ import annotations

import ast
import contextlib
import heapq
import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.core.artifacts import FilterStats
from pipeline.core.asserts import keep_asserts, observed_assert
from pipeline.core.config import FilterConfig, RunConfig, configs_dir, to_dict
from pipeline.core.records import atomic_writer, dumps, iter_jsonl, iter_sharded
from pipeline.core.schema import RECORD_FIELDS, exercise_program, require_parsed
from pipeline.core.stage import stage_cli, write_resolved_config
from pipeline.sandbox import Job, Sandbox
from pipeline.sandbox.asserts import AssertRun, run_asserts

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


def _precheck(rec: dict, cfg: FilterConfig) -> tuple[str | None, str]:
    """The checks that need no sandbox: (reason, detail); reason None = passed them."""
    try:
        (static_checks if rec["kind"] == "exercise" else textbook_checks)(rec["parsed"], cfg)
    except Reject as rej:
        return rej.args[0], rej.args[1]
    return None, ""


def _verdict_detail(v) -> str:
    parts = [v.status]
    if v.error_type:
        parts.append(f"{v.error_type}: {(v.error_message or '')[:200]}")
    if v.failed_source:
        parts.append(f"at: {v.failed_source.strip()[:200]}")
    return " | ".join(parts)


def assert_policy_verdict(parsed: dict, sol: AssertRun, broken: AssertRun, cfg: FilterConfig
                          ) -> tuple[str | None, str, dict | None]:
    """`drop_failing`: (reason or None, detail, what was dropped) for a solution judged assert by assert.

    A failing assert is dropped only if it failed by AssertionError (an exception means the solution
    cannot handle that input), at most `max_dropped_fraction` of the asserts fail, and at least
    `min_kept_asserts` of the remaining ones fail with the body replaced by `pass` (so what is left
    still tells a working solution from an empty one)."""
    if sol.outcomes is None:
        return f"tests_failed:{sol.verdict.status}", "; ".join(sol.failures())[:400], None
    failing = [o for o in sol.outcomes if o.status != "passed"]
    if not failing:
        if broken.all_passed:
            return "vacuous_tests", "the tests pass with the body replaced by `pass`", None
        return None, "", None
    detail = "; ".join(sol.failures())[:400]
    if any(o.status == "error" for o in failing):
        return "tests_failed:exception", detail, None
    if len(failing) > cfg.max_dropped_fraction * len(sol.outcomes):
        return "tests_failed:too_many_failing", f"{len(failing)} of {len(sol.outcomes)} asserts fail: {detail}", None
    kept = {o.index for o in sol.outcomes if o.status == "passed"}
    if broken.outcomes is None:
        return "tests_failed:unverifiable", "the tests do not run to the end with a `pass` body", None
    discriminating = sum(1 for o in broken.outcomes if o.index in kept and o.status != "passed")
    if discriminating < cfg.min_kept_asserts:
        return ("tests_failed:too_few_kept", f"{discriminating} remaining assert(s) fail with a `pass` body "
                f"(need {cfg.min_kept_asserts}): {detail}", None)
    units = {u.index: u for u in sol.units}
    dropped = [{"assert": units[o.index].source, "values": o.detail} for o in failing]
    return None, "", {"tests": keep_asserts(parsed["tests"], kept), "dropped_asserts": dropped}


def observed_policy_plan(parsed: dict, sol: AssertRun, cfg: FilterConfig) -> tuple[str | None, str, dict | None]:
    """`observed`: (reason or None, detail, the tests rewritten to the values the solution returned).

    The plan still has to pass :func:`_verify_observed` (run again: all pass, and enough of them fail
    with a `pass` body)."""
    if sol.outcomes is None:
        return f"tests_failed:{sol.verdict.status}", "; ".join(sol.failures())[:400], None
    units = {u.index: u for u in sol.units}
    agreeing = {o.index for o in sol.outcomes if o.status == "passed"}
    if len(agreeing) == len(sol.outcomes):
        return None, "", None  # every expected value matched: nothing to rewrite
    if len(agreeing) < cfg.min_agreeing_asserts:
        return ("tests_failed:no_agreement", f"{len(agreeing)} of {len(sol.outcomes)} of the teacher's expected values "
                f"match the solution (need {cfg.min_agreeing_asserts}): " + "; ".join(sol.failures())[:400], None)
    # Agreement on one value only (every matching assert expects False, say) is what a constant
    # function also shows: it is no evidence that the code does what the teacher meant.
    expected = {units[i].sides[1] if units[i].sides else "<truthy>" for i in agreeing}
    if cfg.min_agreeing_asserts > 1 and len(expected) < 2:
        return ("tests_failed:no_agreement", f"the {len(agreeing)} matching assert(s) all expect {next(iter(expected))}, "
                "which a constant function matches too: " + "; ".join(sol.failures())[:400], None)
    replace, rewritten, dropped = {}, [], []
    for o in sol.outcomes:
        if o.status == "passed":
            continue
        new = observed_assert(units[o.index], o)
        if new is None:
            dropped.append({"assert": units[o.index].source, "values": o.detail})
        else:
            replace[o.index] = new
            rewritten.append({"assert": units[o.index].source, "observed": new, "values": o.detail})
    keep = agreeing | set(replace)
    if len(keep) < cfg.min_kept_asserts:
        return ("tests_failed:too_few_kept", f"{len(keep)} assert(s) left after dropping {len(dropped)} "
                f"(need {cfg.min_kept_asserts}): " + "; ".join(sol.failures())[:400], None)
    return None, "", {"tests": keep_asserts(parsed["tests"], keep, replace),
                      "dropped_asserts": dropped, "rewritten_asserts": rewritten}


def _verify_observed(sol: AssertRun, broken: AssertRun, cfg: FilterConfig) -> tuple[str | None, str]:
    """The rewritten tests, run again: the solution must pass all of them, a `pass` body fail enough."""
    if not sol.all_passed:
        return "tests_failed:not_reproducible", "the rewritten tests fail when run again: " + "; ".join(sol.failures())[:400]
    failing = sum(1 for o in broken.outcomes or [] if o.status != "passed")
    if broken.outcomes is not None and failing < cfg.min_kept_asserts:
        return ("tests_failed:too_few_kept", f"{failing} rewritten assert(s) fail with a `pass` body "
                f"(need {cfg.min_kept_asserts})")
    return None, ""


def filter_shard(records: list[dict], cfg: FilterConfig, sandbox: Sandbox) -> list[dict]:
    """Decide every record of a shard: each comes back with `filter_reason` (None = kept)."""
    if cfg.assert_policy != "all":
        return _filter_shard_by_assert(records, cfg, sandbox)
    decided: dict[str, tuple[str | None, str]] = {}
    jobs, owners = [], []
    for rec in records:
        parsed = rec["parsed"]
        decided[rec["id"]] = _precheck(rec, cfg)
        if rec["kind"] == "exercise" and decided[rec["id"]][0] is None:
            jobs.append(Job(exercise_program(parsed), test=parsed["tests"], job_id=rec["id"]))
            owners.append((rec["id"], "solution"))
            if cfg.check_vacuous_tests:
                jobs.append(Job(exercise_program(parsed, "    pass"), test=parsed["tests"], job_id=rec["id"]))
                owners.append((rec["id"], "broken"))
    for (rid, role), verdict in zip(owners, sandbox.run(jobs), strict=True):
        if decided[rid][0] is not None:
            continue  # the solution already failed: that is the reason
        if role == "solution" and not verdict.passed:
            decided[rid] = (f"tests_failed:{verdict.status}", _verdict_detail(verdict))
        elif role == "broken" and verdict.passed:
            decided[rid] = ("vacuous_tests", "the tests pass with the body replaced by `pass`")
    return [{**rec, "filter_reason": decided[rec["id"]][0], "filter_detail": decided[rec["id"]][1]}
            for rec in records]


def _filter_shard_by_assert(records: list[dict], cfg: FilterConfig, sandbox: Sandbox) -> list[dict]:
    out, items, owners = [], [], []
    for rec in records:
        reason, detail = _precheck(rec, cfg)
        if rec["kind"] == "exercise" and reason is None:
            parsed = rec["parsed"]
            items += [(exercise_program(parsed), parsed["tests"]), (exercise_program(parsed, "    pass"), parsed["tests"])]
            owners.append(len(out))
        out.append({**rec, "filter_reason": reason, "filter_detail": detail})
    runs = run_asserts(sandbox, items, [out[i]["id"] for i in owners for _ in (0, 1)])
    changes = {}
    for k, i in enumerate(owners):
        rec = out[i]
        if cfg.assert_policy == "observed":
            reason, detail, change = observed_policy_plan(rec["parsed"], runs[2 * k], cfg)
            if change is None and reason is None and runs[2 * k + 1].all_passed:
                reason, detail = "vacuous_tests", "the tests pass with the body replaced by `pass`"
        else:
            reason, detail, change = assert_policy_verdict(rec["parsed"], runs[2 * k], runs[2 * k + 1], cfg)
        if not cfg.check_vacuous_tests and reason == "vacuous_tests":
            reason, detail = None, ""
        if change:  # kept with asserts dropped or rewritten: the evidence travels with the record
            changes[i] = change
        out[i] = {**rec, "filter_reason": reason, "filter_detail": detail}
    if cfg.assert_policy == "observed":  # the rewritten tests run once more before they are trusted
        rewritten = list(changes)
        checks = [(exercise_program(out[i]["parsed"], body), changes[i]["tests"])
                  for i in rewritten for body in (None, "    pass")]
        again = run_asserts(sandbox, checks, [out[i]["id"] for i in rewritten for _ in (0, 1)])
        for k, i in enumerate(rewritten):
            reason, detail = _verify_observed(again[2 * k], again[2 * k + 1], cfg)
            if reason is not None:
                changes.pop(i)
                out[i] = {**out[i], "filter_reason": reason, "filter_detail": detail}
    for i, change in changes.items():
        extra = {k: change[k] for k in ("dropped_asserts", "rewritten_asserts") if change.get(k)}
        out[i] = {**out[i], "parsed": {**out[i]["parsed"], "tests": change["tests"]}, **extra}
    return out


def _input_records(in_dir: Path) -> tuple[Iterable[dict], int]:
    """Every input record in id order, and how many. A first pass validates each record (bad input fails
    before any work) and checks each file's order: files sorted by id, as the generate stage writes them,
    are then merged as streams (memory does not grow with the input); an unsorted file is sorted in memory."""
    paths = {kind[:-1]: in_dir / f"{kind}.jsonl" for kind in ("exercises", "textbooks")}

    def stream(kind: str) -> Iterator[dict]:
        for rec in iter_jsonl(paths[kind], required=RECORD_FIELDS):
            require_parsed(rec, str(paths[kind]), kind)
            yield rec

    count, ordered = 0, True
    for kind in paths:
        previous = None
        for rec in stream(kind):
            count += 1
            ordered = ordered and (previous is None or previous <= rec["id"])
            previous = rec["id"]
    if ordered:
        return heapq.merge(*(stream(k) for k in paths), key=lambda r: r["id"]), count
    log.warning("filter input is not sorted by id: sorting it in memory (the generate stage writes it sorted)")
    return sorted(itertools.chain(*(stream(k) for k in paths)), key=lambda r: r["id"]), count


class _Funnel:
    """The stage's counts, kept as decided records stream past."""

    def __init__(self) -> None:
        self.seen = {"exercise": 0, "textbook": 0}
        self.kept = {"exercise": 0, "textbook": 0}
        self.reasons: dict[str, Counter] = {"exercise": Counter(), "textbook": Counter()}
        self.extra = Counter()

    def add(self, rec: dict) -> None:
        kind = rec["kind"]
        self.seen[kind] += 1
        if rec["filter_reason"]:
            self.reasons[kind][rec["filter_reason"]] += 1
            return
        self.kept[kind] += 1
        for field in ("dropped_asserts", "rewritten_asserts"):
            if rec.get(field):
                self.extra[f"kept_with_{field}"] += 1
                self.extra[f"asserts_{field.split('_')[0]}"] += len(rec[field])

    def stats(self, fc: FilterConfig) -> dict:
        funnel = {kind: {"in": self.seen[kind], "kept": self.kept[kind], "dropped": sum(self.reasons[kind].values()),
                         "dropped_by_reason": dict(sorted(self.reasons[kind].items()))} for kind in self.seen}
        funnel["exercise"]["assert_policy"] = fc.assert_policy
        for key in ("kept_with_dropped_asserts", "asserts_dropped", "kept_with_rewritten_asserts", "asserts_rewritten"):
            funnel["exercise"][key] = self.extra[key]
        return funnel


def run_filter(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    fc = cfg.filter
    in_dir, out_dir = Path(fc.input_dir), Path(fc.output_dir)
    records, count = _input_records(in_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, configs_dir(config_path), "filter", out_dir)

    t0 = time.monotonic()
    # The fingerprint covers what decides a verdict; workers and isolation do not change verdicts.
    fingerprint = dumps({k: v for k, v in to_dict(fc).items() if k not in ("input_dir", "output_dir", "shard_size")})
    isolation = "none"
    funnel = _Funnel()
    with contextlib.ExitStack() as stack:
        # Decided records stream from the shards into the outputs: one shard in memory at a time.
        out = {name: stack.enter_context(atomic_writer(out_dir / f"{name}.jsonl"))
               for name in ("exercises", "textbooks", "rejected")}
        if count:
            sandbox = stack.enter_context(Sandbox(fc.sandbox))
            isolation = sandbox.isolation
            for rec in iter_sharded(records, fc.shard_size, out_dir / ".shards", fingerprint,
                                    lambda shard: filter_shard(shard, fc, sandbox), progress, "filter", total=count):
                funnel.add(rec)
                if rec["filter_reason"] is not None:
                    out["rejected"].write(dumps(rec) + "\n")
                else:
                    kept = {k: v for k, v in rec.items() if k not in ("filter_reason", "filter_detail")}
                    out[f"{rec['kind']}s"].write(dumps(kept) + "\n")
    elapsed = time.monotonic() - t0
    stats = {**funnel.stats(fc), "isolation": isolation,
             "timing": {"wall_s": round(elapsed, 2), "records_per_s": round(count / max(elapsed, 1e-9), 1)}}
    FilterStats.parse(stats, out_dir / "stats.json").write(out_dir / "stats.json")
    for path in (out_dir / ".shards").glob("shard-*.jsonl"):
        path.unlink()  # finished: the markers have served their purpose
    return stats


def main(args) -> int:
    return stage_cli(run_filter, args, lambda stats: {k: {"in": v["in"], "kept": v["kept"]} for k, v in stats.items()
                                                      if k in ("exercise", "textbook")})
