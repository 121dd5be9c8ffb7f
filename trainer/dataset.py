"""A user's task as JSONL: rows read with bounds, split the same way every time, and turned into training examples.

Workflow: `load_rows(path)` reads a JSONL file in which each line is one of
    {"prompt": "<user message>", "answer": "<what the model should say>", "label": "<optional class>"}
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], "label": "..."}
(in the second form the last message is the assistant's answer; `answer` is also accepted beside `messages`), or,
for distillation prompts, rows with no answer at all when `need_answer=False`. Every line is checked against a
full schema with bounded sizes and a bad line is a `DataError` that names the file and line. `split_rows(rows,
val=, test=)` deals rows into train/val/test by a hash of the prompt, so a row keeps its split when the file grows
and two rows with the same prompt never land in two splits. `Template` renders a row's prompt (the tokenizer's chat
template, or a text template with one `{prompt}`), and `encode(tokenizer, row, template)` returns the token ids
and the index where the answer starts, so the loss counts the answer tokens only; `collate()` right-pads a batch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocol.errors import ConfigError, clip
from protocol.manifest import first_error

if TYPE_CHECKING:
    import torch

MAX_FILE_BYTES = 2 * 1024**3  # bytes in one JSONL file
MAX_LINE_BYTES = 256 * 1024  # bytes in one line
MAX_ROWS = 2_000_000  # rows in one file
MAX_TEXT_CHARS = 64 * 1024  # characters in one prompt, answer or message
MAX_MESSAGES = 64  # messages in one row
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.:/-]{0,63}")  # a class label, matched in full
PROMPT_FIELD = "{prompt}"


class DataError(ConfigError):
    """A task file or one of its lines is not a valid task row."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=MAX_TEXT_CHARS)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class _RowIn(_Strict):
    prompt: str | None = Field(default=None, min_length=1)
    messages: tuple[Message, ...] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    answer: str | None = None
    label: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> _RowIn:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a row has exactly one of 'prompt' and 'messages'")
        if self.label is not None and not LABEL_RE.fullmatch(self.label):
            raise ValueError(f"label {clip(self.label)} must match {LABEL_RE.pattern}")
        return self


@dataclass(frozen=True)
class Row:
    """One task example: the conversation up to the answer, the answer (None for a bare prompt) and its label."""

    messages: tuple[tuple[str, str], ...]  # (role, content), ending with a user turn
    answer: str | None
    label: str | None = None

    @property
    def prompt(self) -> str:
        """The last user message: what a text template renders and what the split hashes."""
        return self.messages[-1][1]

    def key(self) -> str:
        """A stable identity of the question (every message before the answer)."""
        return hashlib.sha256(json.dumps(self.messages).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any]
        if len(self.messages) == 1 and self.prompt:  # an empty user message only has the messages form
            out = {"prompt": self.prompt}
        else:
            out = {"messages": [{"role": r, "content": c} for r, c in self.messages]}
        if self.answer is not None:
            out["answer"] = self.answer
        if self.label is not None:
            out["label"] = self.label
        return out


def _to_row(parsed: _RowIn) -> Row:
    answer = parsed.answer
    if parsed.prompt is not None:
        return Row((("user", parsed.prompt),), answer, parsed.label)
    messages = [(m.role, m.content) for m in parsed.messages or ()]
    if messages[-1][0] == "assistant":
        if answer is not None:
            raise ValueError("a row whose last message is the assistant's gives no separate 'answer'")
        answer = messages.pop()[1]
    if not messages or messages[-1][0] != "user":
        raise ValueError("the messages before the answer must end with a user message")
    return Row(tuple(messages), answer, parsed.label)


def parse_line(line: bytes | str, *, need_answer: bool = True) -> Row:
    """One JSONL line as a Row; DataError (without the file name) when it is not one."""
    if len(line) > MAX_LINE_BYTES:
        raise DataError(f"line is longer than {MAX_LINE_BYTES} bytes")
    try:
        row = _to_row(_RowIn.model_validate_json(line))
    except ValidationError as exc:
        raise DataError(first_error(exc)) from exc
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    if need_answer and row.answer is None:
        raise DataError("the row has no answer ('answer', or a last message from the assistant)")
    return row


def load_rows(path: Path | str, *, need_answer: bool = True, limit: int | None = None) -> list[Row]:
    """Every row of a JSONL task file (blank lines skipped); DataError naming file and line on the first bad one."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read the task file {path}: {exc.strerror}") from exc
    if size > MAX_FILE_BYTES:
        raise DataError(f"task file {path} is {size} bytes; the limit is {MAX_FILE_BYTES}")
    rows: list[Row] = []
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(parse_line(line.rstrip(b"\r\n"), need_answer=need_answer))
            except DataError as exc:
                raise DataError(f"{path} line {number}: {exc}") from None
            if len(rows) > MAX_ROWS:
                raise DataError(f"task file {path} has more than {MAX_ROWS} rows")
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"task file {path} holds no rows")
    return rows


def write_rows(path: Path | str, rows: Iterable[Row]) -> Path:
    """Write rows as JSONL (compact, one per line), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r.to_json(), separators=(",", ":"), ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    tmp.replace(path)
    return path


def split_of(row: Row, *, val: float, test: float, seed: int = 0) -> str:
    """'train', 'val' or 'test' for `row`, from a hash of its question and the seed (stable as the file grows)."""
    digest = hashlib.sha256(f"{seed}:{row.key()}".encode()).digest()
    x = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if x < test else "val" if x < test + val else "train"


def split_rows(rows: Sequence[Row], *, val: float = 0.1, test: float = 0.1, seed: int = 0) -> dict[str, list[Row]]:
    """Deal rows into train/val/test by `split_of`, keeping file order inside each split."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ConfigError(f"split fractions must be in [0, 1) with val + test < 1, not val={val} test={test}")
    out: dict[str, list[Row]] = {"train": [], "val": [], "test": []}
    for row in rows:
        out[split_of(row, val=val, test=test, seed=seed)].append(row)
    return out


@dataclass(frozen=True)
class Template:
    """How a row's question becomes text: "chat" (the tokenizer's own chat template) or a text with one {prompt}."""

    text: str = "chat"

    def __post_init__(self) -> None:
        if self.text != "chat" and self.text.count(PROMPT_FIELD) != 1:
            raise ConfigError(f"a prompt template is 'chat' or a text holding {PROMPT_FIELD} exactly once")

    def render(self, tokenizer: Any, row: Row) -> str:
        """The text the model reads before its answer."""
        if self.text != "chat":
            return self.text.replace(PROMPT_FIELD, row.prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the tokenizer has no chat template; pass a text template holding {prompt}")
        messages = [{"role": r, "content": c} for r, c in row.messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_text(tokenizer: Any) -> str:
    """What follows an answer: the tokenizer's eos token (ChatML's `<|im_end|>` for the tiny model)."""
    return tokenizer.eos_token or ""


def encode(tokenizer: Any, row: Row, template: Template, max_tokens: int | None = None) -> tuple[list[int], int]:
    """Token ids of question + answer + eos, and the index where the answer starts (cut to `max_tokens`)."""
    if row.answer is None:
        raise DataError("cannot train on a row without an answer")
    head = tokenizer.encode(template.render(tokenizer, row), add_special_tokens=False)
    tail = tokenizer.encode(row.answer + end_text(tokenizer), add_special_tokens=False)
    ids = head + tail
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids, min(len(head), len(ids))


def collate(examples: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 before the answer and on padding)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (seq, start) in enumerate(examples):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
        if start < len(seq):
            labels[i, start : len(seq)] = torch.tensor(seq[start:], dtype=torch.long)
    return ids, mask, labels


def reference_rows(split: str) -> list[Row]:
    """The shipped triage task's split as Rows (`trainer/data/triage_<split>.jsonl`)."""
    from trainer.task import DATA_DIR

    return load_rows(DATA_DIR / f"triage_{split}.jsonl")
