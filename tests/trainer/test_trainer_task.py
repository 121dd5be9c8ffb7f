"""The triage task generator and the splits shipped in trainer/data."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from trainer.task import (
    ANSWER_RE,
    DATA_DIR,
    LABELS,
    SPLIT_SIZES,
    generate,
    label_of,
    load_split,
    make_row,
    write_splits,
)


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    small = {"train": 50, "val": 10, "test": 10}
    assert generate(7, small) == generate(7, small)
    assert generate(7, small) != generate(8, small)


def test_shipped_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    for written in write_splits(tmp_path, seed=0):
        assert written.read_bytes() == (DATA_DIR / written.name).read_bytes(), written.name


def test_splits_have_their_sizes_and_share_no_prompt() -> None:
    splits = {name: load_split(name) for name in SPLIT_SIZES}
    prompts = {name: {row["prompt"] for row in rows} for name, rows in splits.items()}
    for name, size in SPLIT_SIZES.items():
        assert len(splits[name]) == size
        assert len(prompts[name]) == size, f"duplicate prompt inside {name}"
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]


@pytest.mark.parametrize("split", list(SPLIT_SIZES))
def test_every_answer_is_label_colon_action(split: str) -> None:
    for row in load_split(split):
        assert ANSWER_RE.match(row["answer"]), row
        assert label_of(row["answer"]) == row["label"]
        assert row["answer"] != f"{row['label']}: "


def test_labels_are_balanced_enough() -> None:
    counts = Counter(row["label"] for row in load_split("train"))
    assert set(counts) == set(LABELS)
    assert min(counts.values()) > 0.2 * sum(counts.values())


def test_warning_and_fault_actions_name_the_device_of_the_line() -> None:
    rng = random.Random(3)
    for _ in range(200):
        row = make_row(rng)
        device = row["prompt"].split()[1]
        if row["label"] != "ok":
            assert device in row["answer"], row


def test_label_of_rejects_other_formats() -> None:
    assert label_of("fault: stop pump-1") == "fault"
    assert label_of("Fault: stop pump-1") is None
    assert label_of("fault stop pump-1") is None
    assert label_of("") is None


def test_shipped_data_stays_small() -> None:
    total = sum(path.stat().st_size for path in DATA_DIR.iterdir())
    assert total < 1_000_000
    assert len((DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()) > 150


def test_the_unlabelled_pool_is_what_the_generator_writes_and_shares_no_prompt_with_a_split(tmp_path: Path) -> None:
    from trainer.task import UNLABELLED_SIZE, write_unlabelled

    written = write_unlabelled(tmp_path)
    assert written.read_bytes() == (DATA_DIR / written.name).read_bytes()
    pool = [json.loads(line) for line in written.read_text().splitlines()]
    assert len(pool) == UNLABELLED_SIZE and all(set(p) == {"prompt"} for p in pool)
    prompts = {p["prompt"] for p in pool}
    assert len(prompts) == UNLABELLED_SIZE
    for name in SPLIT_SIZES:
        assert not prompts & {row["prompt"] for row in load_split(name)}, name
