"""A user's task file: what is read, what is refused (one row per case), how rows split and encode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol.errors import ConfigError
from trainer.dataset import (
    MAX_LINE_BYTES, DataError, Row, Template, collate, encode, load_rows, parse_line, reference_rows, split_rows,
    write_rows,
)

GOOD = {"prompt": "pump-1 temp=99C", "answer": "fault: stop pump-1", "label": "fault"}

REFUSED = {
    "not json": (b"{nope", "Invalid JSON"),
    "both prompt and messages": (json.dumps({**GOOD, "messages": [{"role": "user", "content": "x"}]}), "exactly one"),
    "neither prompt nor messages": (json.dumps({"answer": "x"}), "exactly one"),
    "unknown field": (json.dumps({**GOOD, "extra": 1}), "xtra"),
    "empty prompt": (json.dumps({**GOOD, "prompt": ""}), "at least 1"),
    "prompt not a string": (json.dumps({**GOOD, "prompt": 5}), "string"),
    "label with a newline": (json.dumps({**GOOD, "label": "ok\n"}), "label"),
    "label too long": (json.dumps({**GOOD, "label": "a" * 65}), "label"),
    "bad role": (json.dumps({"messages": [{"role": "tool", "content": "x"}], "answer": "y"}), "role"),
    "messages end with the system": (json.dumps({"messages": [{"role": "system", "content": "x"}], "answer": "y"}),
                                     "end with a user"),
    "two answers": (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                "answer": "b"}), "no separate"),
    "no answer": (json.dumps({"prompt": "q"}), "no answer"),
    "text too long": (json.dumps({**GOOD, "answer": "a" * (64 * 1024 + 1)}), "at most"),
    "line too long": (b'{"prompt": "' + b"a" * MAX_LINE_BYTES + b'", "answer": "x"}', "longer than"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_line_is_refused_with_its_file_and_line_and_no_rows(tmp_path: Path, case: str) -> None:
    line, needle = REFUSED[case]
    line = line if isinstance(line, bytes) else line.encode()
    path = tmp_path / "task.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + line + b"\n")
    rows = None
    with pytest.raises(DataError) as err:
        rows = load_rows(path)
    assert f"{path} line 3:" in str(err.value)
    assert needle.lower() in str(err.value).lower(), str(err.value)
    assert rows is None and path.read_bytes().startswith(json.dumps(GOOD).encode())  # nothing was changed


def test_empty_and_missing_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no rows"):
        load_rows(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="cannot read"):
        load_rows(tmp_path / "missing.jsonl")


def test_both_row_shapes_read_and_write_back(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a"}], "label": "ok"}
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(GOOD) + "\n" + json.dumps(chat) + "\n")
    rows = load_rows(src)
    assert rows[0] == Row((("user", GOOD["prompt"]),), GOOD["answer"], "fault")
    assert rows[1] == Row((("system", "be brief"), ("user", "q")), "a", "ok")
    assert load_rows(write_rows(tmp_path / "out.jsonl", rows)) == rows
    bare = parse_line(json.dumps({"prompt": "only a question"}), need_answer=False)
    assert bare.answer is None and bare.prompt == "only a question"


def test_split_is_stable_disjoint_and_keeps_its_rows_as_the_file_grows() -> None:
    rows = reference_rows("train")
    small = split_rows(rows[:1000], val=0.1, test=0.1)
    big = split_rows(rows, val=0.1, test=0.1)
    for name in small:
        assert set(r.key() for r in small[name]) <= set(r.key() for r in big[name])
    keys = [set(r.key() for r in big[name]) for name in ("train", "val", "test")]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert sum(len(v) for v in big.values()) == len(rows)
    assert 0.07 < len(big["val"]) / len(rows) < 0.13 and 0.07 < len(big["test"]) / len(rows) < 0.13
    assert split_rows(rows, val=0.1, test=0.1, seed=1)["val"] != big["val"]
    with pytest.raises(ConfigError, match="fractions"):
        split_rows(rows, val=0.6, test=0.5)


def test_encode_masks_the_question_and_ends_with_eos(tiny_hf: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf)
    row = reference_rows("test")[0]
    ids, start = encode(tok, row, Template())
    assert tok.decode(ids[:start]) == f"<|im_start|>user\n{row.prompt}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids[start:]) == row.answer + "<|im_end|>"
    ids2, start2 = encode(tok, row, Template("Q: {prompt}\nA: "))
    assert tok.decode(ids2[:start2]) == f"Q: {row.prompt}\nA: "
    batch_ids, mask, labels = collate([(ids, start), (ids2, start2)], pad_id=0)
    assert mask[0].sum() == len(ids) and (labels[0][:start] == -100).all() and labels[0][start] == ids[start]
    with pytest.raises(ConfigError, match="exactly once"):
        Template("no field")
