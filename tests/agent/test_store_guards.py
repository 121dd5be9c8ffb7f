"""The agent store's path builders: a bad id, name or version, or a link that leads out of the data folder, is
refused with IdentifierError, and nothing on disk changes (no folder made, the active pointer untouched)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.store import ModelRef, Store
from protocol.errors import IdentifierError


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "data")
    s.switch(ModelRef("tiny", 1))
    return s


@pytest.mark.parametrize(
    "deployment_id",
    ["", ".", "..", "../x", "a/b", "/abs", "x\n", "a\x00b", "x" * 129, "x" * 10_000, "-x", "é"],
)
def test_staging_refuses_bad_deployment_ids(store: Store, deployment_id: str) -> None:
    before, pointer = tree(store.root), store.snapshot()
    with pytest.raises(IdentifierError):
        store.staging(deployment_id)
    with pytest.raises(IdentifierError):
        store.clear_staging(deployment_id)
    assert tree(store.root) == before and store.snapshot() == pointer


@pytest.mark.parametrize(
    "ref",
    [ModelRef("..", 1), ModelRef("../x", 1), ModelRef("a/b", 1), ModelRef("tiny\n", 1), ModelRef("", 1),
     ModelRef("x" * 65, 1), ModelRef("tiny", 0), ModelRef("tiny", -1), ModelRef("tiny", 2**63), ModelRef("tiny", True)],
    ids=lambda r: f"{r.name[:8]!r}-{r.version}",
)
def test_version_dir_refuses_bad_names_and_versions(store: Store, ref: ModelRef) -> None:
    before, pointer = tree(store.root), store.snapshot()
    with pytest.raises(IdentifierError):
        store.version_dir(ref)
    if ref != store.active():  # ModelRef("tiny", True) == the active ModelRef("tiny", 1): kept, never looked up
        with pytest.raises(IdentifierError):
            store.remove_version(ref)
    assert tree(store.root) == before and store.snapshot() == pointer


def test_links_out_of_the_data_folder_are_refused(store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (store.staging_root / "dep-1").symlink_to(outside)
    (store.versions_root / "tiny").symlink_to(outside)
    with pytest.raises(IdentifierError, match="outside"):
        store.staging("dep-1")
    with pytest.raises(IdentifierError, match="outside"):
        store.version_dir(ModelRef("tiny", 2))
    assert list(outside.iterdir()) == []


def test_good_ids_give_the_usual_layout(store: Store) -> None:
    assert store.staging("0123abcd") == store.root / "staging" / "0123abcd"
    assert store.version_dir(ModelRef("tiny", 2**63 - 1)) == store.root / "versions" / "tiny" / str(2**63 - 1)
