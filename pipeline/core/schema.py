"""The one record schema: what the teacher's answers parse into, and what an exercise *is*.

Every stage reads records through these definitions, so "the program of an exercise" (what the
sandbox runs, what the student trains on) and "the prompt of an exercise" (what the evaluator
would send) exist once:

    python -c "from pipeline.core.schema import parse_exercise, exercise_program; \
print(exercise_program(parse_exercise(open('answer.md').read())))"

A record is ``{"id", "kind", "parsed", ...}``; ``parsed`` holds :data:`PARSED_FIELDS` of its kind.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from pipeline.core.records import RecordError

CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)

KINDS = ("exercise", "textbook")
# Where each kind lives in a stage's output folder (generate, filter, dedupe, decontaminate, the pools).
KIND_FILES = {"exercise": "exercises.jsonl", "textbook": "textbooks.jsonl"}
RECORD_FIELDS = ("id", "kind", "parsed")
# Fields under `parsed` per kind, with their types: a record without them cannot be curated.
PARSED_FIELDS: dict[str, dict[str, type]] = {
    "exercise": {f: str for f in ("function_name", "imports", "helpers", "prompt", "solution", "tests")},
    "textbook": {"text": str, "code_blocks": list},
}


def code_blocks(text: str) -> list[str]:
    """The fenced Python code blocks of a markdown answer, in order."""
    return [b.strip("\n") for b in CODE_BLOCK.findall(text)]


class ParseError(ValueError):
    """The response does not follow the requested format; str(exc) is the reason."""


def parse_exercise(text: str) -> dict:
    """Split an answer into signature+docstring (the prompt), solution body and assert tests."""
    blocks = code_blocks(text)
    if not blocks:
        raise ParseError("no_code_block")
    trees = []
    for i, block in enumerate(blocks):
        try:
            trees.append((block, ast.parse(block)))
        except SyntaxError as exc:
            raise ParseError(f"syntax_error: block {i + 1}, line {exc.lineno}: {exc.msg}") from None
    func = src = None
    imports, helpers, tests = [], [], []
    for block, tree in trees:
        for node in tree.body:
            seg = ast.get_source_segment(block, node)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imports.append(seg)
            elif isinstance(node, ast.FunctionDef) and func is None and ast.get_docstring(node) is not None:
                func, src = node, block
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("test"):
                helpers.append(seg)
            elif isinstance(node, ast.Assert):
                tests.append(seg)
            elif isinstance(node, (ast.FunctionDef, ast.If)):
                # Asserts inside `def test_...():` or `if __name__ == "__main__":` are tests too.
                tests.extend(ast.unparse(n) for n in node.body if isinstance(n, ast.Assert))
    if func is None:
        raise ParseError("no_function_with_docstring")
    if not tests:
        raise ParseError("no_assert_tests")
    lines = src.splitlines()
    start = (func.decorator_list[0].lineno if func.decorator_list else func.lineno) - 1
    doc_end = func.body[0].end_lineno
    prompt = "\n".join(lines[start:doc_end])
    solution = "\n".join(lines[doc_end:func.end_lineno]) if len(func.body) > 1 else ""
    header = "\n".join(dict.fromkeys(imports))
    return {
        "function_name": func.name,
        "imports": header,
        "helpers": "\n\n".join(h for h in helpers if h),
        "prompt": prompt,
        "docstring": ast.get_docstring(func),
        "solution": solution,
        "tests": "\n".join(dict.fromkeys(tests)),
    }


def parse_truncated_exercise(text: str) -> dict:
    """An answer cut at max_tokens, parsed if the cut fell in its tests (a small greedy teacher
    often repeats one assert until the cap): the open code block is closed after its last complete
    top-level statement, and repeated asserts collapse into one. ParseError if the cut fell in the
    function or its helpers, or nothing complete is left."""
    if text.count("```") % 2 == 0:
        raise ParseError("truncated: cut outside a code block")
    head, _, last = text.rpartition("```")
    lang, _, body = last.partition("\n")
    lines = body.splitlines()
    if not body.endswith("\n"):
        lines = lines[:-1]  # the line the cut fell in, even if what is left of it parses (`assert f`)
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
        if tree.body:
            break
    else:
        raise ParseError("truncated: nothing complete before the cut")
    tail = tree.body[-1]
    in_tests = isinstance(tail, (ast.Assert, ast.If)) or (isinstance(tail, ast.FunctionDef) and tail.name.startswith("test"))
    if not in_tests:
        raise ParseError("truncated: cut inside the function or its helpers")
    return parse_exercise(f"{head}```{lang}\n" + "\n".join(lines[:end]) + "\n```\n")


def parse_textbook(text: str) -> dict:
    blocks = code_blocks(text)
    if not blocks:
        raise ParseError("no_code_block")
    prose = CODE_BLOCK.sub("", text).strip()
    if len(prose.split()) < 20:
        raise ParseError("too_little_prose")
    title = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")
    return {"title": title, "text": text.strip(), "code_blocks": blocks}


FUTURE_IMPORT = re.compile(r"^from __future__ import [^\n]*\n?", re.MULTILINE)


def join_program(*parts: str) -> str:
    """Pieces of code as one program, `from __future__` imports moved to its top (where Python requires them:
    a solution that starts with one stays valid behind a prelude)."""
    text = "".join(parts)
    future = FUTURE_IMPORT.findall(text)
    if not future:
        return text
    return "".join(line.rstrip("\n") + "\n" for line in dict.fromkeys(future)) + FUTURE_IMPORT.sub("", text)


def exercise_prompt(parsed: dict) -> str:
    """Imports, helpers, then the signature and docstring: everything before the solution body."""
    return "\n\n".join(p for p in (parsed["imports"], parsed["helpers"], parsed["prompt"]) if p.strip())


def exercise_function_name(prompt: str) -> str:
    """The name of the function an exercise's prompt asks for: its last top-level `def` (imports and helpers
    come first)."""
    names = re.findall(r"^(?:async\s+)?def\s+(\w+)\s*\(", prompt, flags=re.MULTILINE)
    if not names:
        raise RecordError(f"no top-level function in the exercise prompt {prompt[:60]!r}")
    return names[-1]


def exercise_program(parsed: dict, solution: str | None = None) -> str:
    """The whole exercise: the program whose tests the sandbox runs, and the training text."""
    body = parsed["solution"] if solution is None else solution
    return exercise_prompt(parsed) + "\n" + body + "\n"


# What a chat model is asked, in evaluation and in training alike (one definition, so an instruct
# student is fine-tuned in exactly the format it is evaluated in): EvalPlus's instruction and layout
# (evalplus/codegen.py and provider/openai.py), so published instruct scores are comparable.
CHAT_INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem in a markdown "
                    "code block:")


def chat_messages(prompt: str) -> list[dict]:
    """The chat request for a code prompt (a HumanEval prompt, or an exercise's signature and docstring)."""
    return [{"role": "user", "content": f"{CHAT_INSTRUCTION}\n```python\n{prompt.strip()}\n```"}]


def chat_answer(program: str) -> str:
    """The answer a chat model should give to :func:`chat_messages`: the whole program in one block."""
    return f"```python\n{program.rstrip()}\n```"


def bad_parsed_fields(kind: str, parsed: Any) -> list[str]:
    """Names of the ``parsed`` fields of a ``kind`` record that are missing or of the wrong type."""
    if not isinstance(parsed, dict):
        return ["parsed"]
    return [f"parsed.{f}" for f, tp in PARSED_FIELDS[kind].items() if not isinstance(parsed.get(f), tp)]


def require_parsed(rec: dict, where: str, kind: str | None = None) -> dict:
    """The record's ``parsed`` object, or a RecordError naming ``where``, the record id and the bad fields.

    ``kind``: the kind the file holds; ``None`` accepts either kind.
    """
    rid = rec.get("id", "?")
    if rec.get("kind") not in KINDS or (kind is not None and rec["kind"] != kind):
        want = repr(kind) if kind else " or ".join(map(repr, KINDS))
        raise RecordError(f"{where}: record {rid!r} has kind {rec.get('kind')!r}, expected {want}")
    bad = bad_parsed_fields(rec["kind"], rec.get("parsed"))
    if bad:
        raise RecordError(f"{where}: record {rid!r} is missing or has a bad {', '.join(bad)}")
    return rec["parsed"]
