"""Fuzzing what the trainer reads from its user: a task file's lines and a pipeline recipe.

Parsers (`PARSERS`, run long by `bench/fuzz.py`) and what may come out of them:
    task_line   `trainer.dataset.parse_line(line, need_answer=...)` on one JSONL line: valid rows (both shapes),
                mutated, byte-edited or raw bytes. DataError only; an accepted row written back with `to_json`
                parses to the same row.
    recipe      `trainer.pipeline.parse_config(text, suffix=".toml" | ".yaml", root=...)` on a recipe: valid
                recipes, recipes with a value replaced by a hostile one, byte-edited text, raw text. ConfigError
                only (never a path outside what the text says, never an exception of tomllib or PyYAML).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ConfigError
from tests.fuzz.test_parsers import CI, byte_edits, hostile, wire
from trainer.dataset import DataError, parse_line
from trainer.pipeline import parse_config

texts = st.text(max_size=40)
labels = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 _.:/-]{0,20}", fullmatch=True)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": texts}), min_size=1, max_size=4)
row_docs = (st.fixed_dictionaries({"prompt": texts.filter(bool)}, optional={"answer": texts, "label": labels})
            | st.fixed_dictionaries({"messages": messages}, optional={"answer": texts, "label": labels}))


def check_task_line(x: tuple[bytes, bool]) -> None:
    line, need_answer = x
    try:
        row = parse_line(line, need_answer=need_answer)
    except DataError:
        return
    again = parse_line(json.dumps(row.to_json()), need_answer=need_answer)
    assert again == row, (row, again)


RECIPE = """work_dir = "work"
[base]
tiny = {steps = 4}
[data]
label_regex = "^(ok|warning|fault): "
[distill]
teacher = {url = "http://127.0.0.1:8800/v1", model = "triage"}
steps = 3
[export]
precision = "int4"
[eval]
limit = 6
[bundle]
name = "triage"
version = 3
out = "dist/triage.bundle"
keys = ["k.pem"]
"""
VALUES = st.sampled_from(['"x"', "0", "-1", "1e309", '"../../etc/passwd"', "[]", "{}", '"\\u0000"', "true",
                          '"a\\nb"', str(2**64), '"http://evil/"', '"int3"'])
LINES = RECIPE.splitlines()


def _text_of(value: object) -> str:
    """A hostile value as recipe text (JSON is valid TOML for scalars and arrays of them)."""
    try:
        return json.dumps(value, default=str)[:5000]
    except (ValueError, RecursionError):  # past the 4300-digit conversion limit, or nested too deep
        return "9" * 5000


@st.composite
def recipes(draw: st.DrawFn) -> tuple[str, str]:
    lines = list(LINES)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(lines) - 1))
        if " = " in lines[at]:
            key = lines[at].split(" = ")[0]
            lines[at] = f"{key} = {draw(VALUES | hostile(False).map(_text_of))}"
    text = "\n".join(lines) + "\n"
    if draw(st.booleans()):
        text = draw(byte_edits(text.encode())).decode("utf-8", "replace")
    if draw(st.integers(0, 5)) == 0:
        text = draw(st.text(max_size=300))
    return text, ".toml"


yaml_recipes = st.builds(lambda doc: (json.dumps(doc), ".yaml"), st.recursive(
    st.none() | st.booleans() | st.integers() | texts, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["base", "bundle", "tiny", "path", "name", "version", "out", "x"]), inner,
                      max_size=4), max_leaves=12))


def check_recipe(x: tuple[str, str]) -> None:
    text, suffix = x
    try:
        config = parse_config(text, suffix=suffix, root=Path("/srv/recipes"))
    except ConfigError:
        return
    assert config.bundle.out.is_absolute() and config.work_dir.is_absolute()


PARSERS: dict[str, tuple[st.SearchStrategy, Callable[[Any], None]]] = {
    "task_line": (st.tuples(wire(row_docs, ("prompt", "answer", "label", "messages")), st.booleans()),
                  check_task_line),
    "recipe": (recipes() | yaml_recipes, check_recipe),
}


@CI
@given(PARSERS["task_line"][0])
def test_task_lines_raise_only_data_errors(x: tuple[bytes, bool]) -> None:
    check_task_line(x)


@CI
@given(PARSERS["recipe"][0])
def test_recipes_raise_only_config_errors(x: tuple[str, str]) -> None:
    check_recipe(x)


@CI
@given(row_docs)
def test_valid_rows_parse(doc: dict) -> None:
    check_task_line((json.dumps(doc).encode(), False))
