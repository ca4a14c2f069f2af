"""The topics step against the real local fake OpenAI server: growth, dedupe, provenance, cache, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

import tests.fakeserver
from pipeline.cli import main as cli_main
from pipeline.core.config import ConfigError, load_config, load_preset
from pipeline.core.records import dumps, sha256_text
from pipeline.engines.llm import RequestsFailed
from pipeline.stages.generate import load_prompt_space
from pipeline.stages.topics import normalise, parse_items, run_topics

from .conftest import add_preset

SEED = "topics:\n  strings: [palindromes, anagrams]\n  lists: [prefix sums, sliding windows]\n"
SUBTOPICS = ("palindromes", "anagrams", "prefix sums", "sliding windows")
# What the teacher answers, by subtopic: a preamble, mixed list markers, markup, a child equal to a
# seed subtopic, an overlong one, an empty one, a repeat differing only in case/spacing/punctuation.
ANSWERS = {
    "palindromes": "Here are three:\n- Palindromic substrings.\n2. **ignoring punctuation**\n* Anagrams\n- "
                   + "x" * 100 + "\n-\n- palindromic  SUBSTRINGS!\n",
    "sliding windows": "1. Fixed-size windows\n2) Prefix sums\n3. Variable-size windows\n4. Window maximum\n"
                       "5. Window minimum\n",  # one too many: children = 3
}


def _answer(prompt: str, *_: object) -> str:
    """Stands in for tests.fakeserver._answer_text (prompt = the last user message; other args ignored)."""
    sub = next(s for s in SUBTOPICS if s in prompt)
    return ANSWERS.get(sub, f"- {sub} basics\n- {sub} edge cases\n- {sub} with large inputs\n")


@pytest.fixture
def teacher(fake_project, fake_server, monkeypatch):
    """The fake server answering topic requests with markdown lists; the seed tree in seed.yaml."""
    monkeypatch.setattr(tests.fakeserver, "_answer_text", _answer)
    (fake_project / "seed.yaml").write_text(SEED)
    return fake_server


def run(project: Path, *overrides: str) -> dict:
    base = ["topics.teacher=fake", "topics.seed_file=seed.yaml", "topics.output=grown/topics.yaml",
            "topics.children=3", "topics.client.backoff_base_s=0.01"]
    cfg = load_config(project / "params.yaml", base + list(overrides))
    return run_topics(cfg, project / "params.yaml", progress=False)


def read(project: Path, name: str = "grown/topics.yaml") -> dict:
    return yaml.safe_load((project / name).read_text())


def test_grows_the_tree_with_dedupe_and_provenance_and_reruns_from_cache(fake_project, teacher):
    stats = run(fake_project)
    doc = read(fake_project)
    assert list(doc) == ["version", "source", "stats", "topics"]
    assert doc["topics"] == {
        "strings": ["palindromes", "anagrams",
                    "anagrams: anagrams basics", "anagrams: anagrams edge cases", "anagrams: anagrams with large inputs",
                    "palindromes: ignoring punctuation", "palindromes: Palindromic substrings"],
        "lists": ["prefix sums", "sliding windows",
                  "prefix sums: prefix sums basics", "prefix sums: prefix sums edge cases",
                  "prefix sums: prefix sums with large inputs",
                  "sliding windows: Fixed-size windows", "sliding windows: Variable-size windows",
                  "sliding windows: Window maximum"],
    }
    assert stats["requests"] == teacher.state.requests == 4
    assert {k: doc["stats"][k] for k in ("seed_subtopics", "added", "subtopics", "dropped_duplicates",
                                         "dropped_invalid", "dropped_over_limit", "failed_requests")} == {
        "seed_subtopics": 4, "added": 11, "subtopics": 15, "dropped_duplicates": 3, "dropped_invalid": 2,
        "dropped_over_limit": 1, "failed_requests": 0}
    src = doc["source"]
    assert src["seed_file"] == "seed.yaml" and src["seed_sha256"] == hashlib.sha256(SEED.encode()).hexdigest()
    assert src["teacher"] == {"preset": "fake",
                              "identity": load_preset("fake", fake_project / "configs").identity()}
    assert (src["children"], src["target_size"], src["seed"]) == (3, 0, 7)
    assert doc["version"] == sha256_text(dumps(doc["topics"]))[:12] == stats["version"]
    resolved = yaml.safe_load((fake_project / "grown/resolved_config.yaml").read_text())
    assert resolved["topics"]["teacher"] == "fake" and "fake" in resolved["presets"]

    first = {p: (fake_project / "grown" / p).read_bytes() for p in ("topics.yaml", "resolved_config.yaml")}
    sent = teacher.state.requests
    teacher.stop()  # nothing may be sent: the server is gone
    again = run(fake_project)
    assert {p: (fake_project / "grown" / p).read_bytes() for p in first} == first
    assert teacher.state.requests == sent and again["ledger_this_run"] == {}


def test_target_size_stops_early(fake_project, teacher):
    stats = run(fake_project, "topics.target_size=6")
    doc = read(fake_project)
    assert teacher.state.requests == stats["requests"] == 1  # ceil((6 - 4 seeds) / 3 children)
    assert stats["subtopics"] == sum(len(s) for s in doc["topics"].values()) == 6
    assert doc["source"]["target_size"] == 6
    stats = run(fake_project, "topics.target_size=4", "topics.output=seeds_only.yaml")  # already there
    assert stats["requests"] == 0 and teacher.state.requests == 1
    assert read(fake_project, "seeds_only.yaml")["topics"] == yaml.safe_load(SEED)["topics"]


@pytest.mark.parametrize("content", [None, "topics: []\n", "topics:\n  strings: []\n", "topics: {a: [b]\n"])
def test_missing_or_malformed_seed_file_names_the_key_and_file(fake_project, fake_server, content):
    if content is not None:
        (fake_project / "seed.yaml").write_text(content)
    with pytest.raises(ConfigError, match=r"topics\.seed_file: .*seed\.yaml"):
        run(fake_project)
    assert fake_server.state.requests == 0 and not (fake_project / "grown").exists()


def test_output_loads_with_the_generate_loader(fake_project, teacher):
    run(fake_project, "topics.output=prompts/expanded/topics.yaml")  # the default place
    space = load_prompt_space(fake_project / "prompts", "expanded/topics.yaml")  # generate.topics_file
    assert space.topics == read(fake_project, "prompts/expanded/topics.yaml")["topics"] and len(space.pairs) == 15


def test_failed_requests_stop_the_step_with_one_line_unless_accepted(project, capsys, caplog):
    add_preset(project, "fake", engine="remote", model="m", base_url="http://127.0.0.1:9/v1")  # a closed port
    (project / "seed.yaml").write_text(SEED)
    args = ["topics", "-q", "--set", "topics.teacher=fake", "--set", "topics.seed_file=seed.yaml",
            "--set", "topics.client.max_retries=0"]
    shipped = (project / "prompts/expanded/topics.yaml").read_bytes()
    assert cli_main(args) == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]  # stage_cli's one line
    assert line == ("topics failed: 4 request(s) failed at preset 'fake' at http://127.0.0.1:9/v1 "
                    "(connection: 4); 0 answered and cached; run again: only the 4 failed requests are sent")
    assert (project / "prompts/expanded/topics.yaml").read_bytes() == shipped  # nothing written
    # Accepted explicitly: the tree is written, and its stats list what failed.
    assert cli_main([*args, "--set", "topics.client.max_failed_fraction=1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["failed_requests"] == 4 and summary["added"] == 0
    doc = read(project, "prompts/expanded/topics.yaml")
    assert doc["topics"] == yaml.safe_load(SEED)["topics"]
    assert sorted(f["subtopic"] for f in doc["stats"]["failed"]) == sorted(SUBTOPICS)
    assert {f["error"] for f in doc["stats"]["failed"]} == {"connection"}
    assert doc["stats"]["failed_by_error"] == {"connection": 4}


def test_a_rerun_after_failures_sends_only_the_failed_requests(fake_project, teacher):
    teacher.state.fail_first_bodies = 1
    with pytest.raises(RequestsFailed, match=r"1 request\(s\) failed .*\(server_error: 1\); 3 answered and cached"):
        run(fake_project, "topics.client.max_retries=1")
    teacher.state.failing.clear()
    teacher.state.fail_first_bodies = 0
    sent = teacher.state.requests
    stats = run(fake_project)
    assert teacher.state.requests - sent == 1 and stats["failed_requests"] == 0


def test_topics_through_the_batch_api_grow_the_same_tree(fake_project, teacher):
    add_preset(fake_project, "fake", engine="remote", model="fake-model", api="chat", base_url=teacher.base_url,
               batch_api=True)
    run(fake_project, "topics.output=online/topics.yaml", "topics.cache_path=data/online.sqlite")
    run(fake_project, "topics.client.batch=true", "topics.client.batch_poll_s=0.01")
    assert teacher.state.batches_created == 1 and teacher.state.batch_items == 4
    assert read(fake_project)["topics"] == read(fake_project, "online/topics.yaml")["topics"]


def test_missing_seed_file_through_the_cli(fake_project, capsys):
    assert cli_main(["topics", "-q", "--set", "topics.teacher=fake", "--set", "topics.seed_file=nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert "topics.seed_file" in err and "nope.yaml" in err


def test_parse_items_and_normalise():
    assert parse_items("Sure!\n- a.\n* `b`;\n+ c\n3) d:\n10. e\n") == ["a", "b", "c", "d", "e"]
    assert parse_items("plain one\nplain two\n") == ["plain one", "plain two"]  # no markers: every line
    assert normalise("  Run-Length   Encoding! ") == normalise("run length encoding") == "run length encoding"
