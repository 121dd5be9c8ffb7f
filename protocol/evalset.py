"""The held-out evaluation set a bundle carries, and the rule that scores one answer (pure: bytes in, values out).

Workflow: the trainer writes a few held-out items of its task as JSON lines into the model folder and names the
file in `eval.heldout` of the manifest (`protocol.manifest.HeldoutSet`); the fleet packs and signs it like every
other file. The device, once the bundle's hashes checked out, reads the file and calls `parse_items(data)` (bounded
size and count, every line a full-schema item, every failure an `EvalSetError` naming the line), asks its model each
item's `chat()` greedily, checks each answer with `is_right(answer, item.expected, item.match or spec.match)` and
reports only the aggregate, `aggregate(metric, rights)` -> `EvalScore`: never a prompt or an answer.

One item per line:
    {"prompt": "<the user message>", "expected": "fault"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}], "expected": "ok",
     "match": "exact" | {"regex": "(ok|warning|fault): "}}
Exactly one of `prompt` and `messages`; `match` (optional) replaces the set's rule for that item. The rules:
- "exact": the answer after strip and lower-case equals `expected` after strip and lower-case;
- {"regex": P}: the answer's label is what P matches at the start of the stripped answer (its first group, or the
  whole match when P has no group), compared like "exact". The reference task's rule is
  `{"regex": "(ok|warning|fault): "}`, the same rule `trainer/evaluate.py` scores `label_accuracy` with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import EvalSetError
from .manifest import MAX_EVAL_SET_BYTES, MatchRule, RegexMatch, first_error
from .messages import EvalScore

MAX_ITEMS = 200  # items in one held-out set: the health check answers each one on the device
MAX_CONTENT_CHARS = 4096  # characters in one prompt or message
MAX_MESSAGES = 16  # messages in one item
MAX_EXPECTED_CHARS = 256  # characters in an expected label
MAX_LINE_BYTES = 16 * 1024  # bytes in one line of the file


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EvalMessage(_Frozen):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CONTENT_CHARS)


class EvalItem(_Frozen):
    """One held-out item: what the model is asked and the label a right answer carries."""

    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_CONTENT_CHARS)
    messages: tuple[EvalMessage, ...] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    expected: str = Field(min_length=1, max_length=MAX_EXPECTED_CHARS)
    match: MatchRule | None = None

    @model_validator(mode="after")
    def _one_question(self) -> "EvalItem":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        if self.messages is not None and self.messages[-1].role != "user":
            raise ValueError("the last of 'messages' must be the user's")
        if not self.expected.strip():
            raise ValueError("'expected' is blank")
        return self

    def chat(self) -> list[dict[str, str]]:
        """The item as chat messages for the model."""
        if self.messages is not None:
            return [{"role": m.role, "content": m.content} for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]


def parse_items(data: bytes) -> tuple[EvalItem, ...]:
    """The held-out set file's bytes -> its items; EvalSetError saying what is wrong (and on which line)."""
    if len(data) > MAX_EVAL_SET_BYTES:
        raise EvalSetError(f"held-out set is {len(data)} bytes, over the {MAX_EVAL_SET_BYTES} byte limit")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvalSetError(f"held-out set is not UTF-8 (byte {exc.start}); write it as UTF-8 JSON lines") from None
    items: list[EvalItem] = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if len(line.encode()) > MAX_LINE_BYTES:
            raise EvalSetError(f"held-out set line {number} is over {MAX_LINE_BYTES} bytes")
        if len(items) == MAX_ITEMS:
            raise EvalSetError(f"held-out set has more than {MAX_ITEMS} items; keep it small, it runs on the device")
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise EvalSetError(f"held-out set line {number} is not JSON: {str(exc)[:120]}") from None
        if not isinstance(doc, dict):
            raise EvalSetError(f"held-out set line {number} is not a JSON object")
        try:
            items.append(EvalItem.model_validate(doc))
        except ValidationError as exc:
            raise EvalSetError(f"held-out set line {number} does not match the item schema: {first_error(exc)}") from None
    if not items:
        raise EvalSetError("held-out set holds no items")
    return tuple(items)


def label_of(answer: str, rule: MatchRule) -> str | None:
    """The label an answer gives under `rule` (lower-case), or None when the regex does not match its start."""
    text = answer.strip()
    if isinstance(rule, RegexMatch):
        found = re.match(rule.regex, text)
        if found is None:
            return None
        text = found.group(1) if found.re.groups else found.group(0)
        text = (text or "").strip()
    return text.lower()


def is_right(answer: str, expected: str, rule: MatchRule) -> bool:
    """Whether `answer` carries the `expected` label under `rule`."""
    return label_of(answer, rule) == expected.strip().lower()


def aggregate(metric: str, rights: Iterable[bool]) -> EvalScore:
    """The share of right answers as the score a device reports."""
    results = list(rights)
    if not results:
        raise EvalSetError("no held-out item was scored")
    return EvalScore(metric=metric, score=sum(results) / len(results), n=len(results))
