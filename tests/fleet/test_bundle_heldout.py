"""Packing a bundle with its held-out evaluation set: the set named in eval.json goes into the manifest and into the
bundle like any other file (size and sha256 signed); a set the devices would refuse is refused here, before any
bundle file is written."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from fleet.bundles import build_bundle, verify_bundle
from protocol.errors import ConfigError, EvalSetError, ManifestError
from protocol.manifest import HeldoutSet, RegexMatch
from protocol.trust import Keyring

from .conftest import NOW, make_model_dir

SET = {"file": "eval/heldout.jsonl", "metric": "accuracy", "min_score": 0.75, "max_new_tokens": 8,
       "match": {"regex": "^(yes|no)\\b"}}
ITEMS = b'{"prompt": "2+2=4?", "expected": "yes"}\n{"prompt": "2+2=5?", "expected": "no"}\n'


def model(tmp_path: Path, *, heldout=SET, data: bytes | None = ITEMS) -> Path:
    doc = {"dataset": "ref-task", "metrics": {"accuracy": 0.91}, "heldout": heldout}
    folder = make_model_dir(tmp_path / "model", eval_doc=json.dumps(doc))
    if data is not None:
        (folder / "eval").mkdir()
        (folder / "eval" / "heldout.jsonl").write_bytes(data)
    return folder


def test_heldout_set_is_named_in_the_manifest_and_packed_with_its_hash(tmp_path, key):
    out = tmp_path / "b.bundle"
    built = build_bundle(model(tmp_path), out, name="tiny", version=1, signers=[key], now=NOW)
    manifest = verify_bundle(out, Keyring(keys=(key.public,)), now=NOW)
    assert manifest == built
    assert manifest.eval.heldout == HeldoutSet(file="eval/heldout.jsonl", metric="accuracy", min_score=0.75,
                                               max_new_tokens=8, match=RegexMatch(regex="^(yes|no)\\b"))
    entry = manifest.file("eval/heldout.jsonl")
    assert (entry.size, entry.sha256) == (len(ITEMS), hashlib.sha256(ITEMS).hexdigest())
    with tarfile.open(out) as tar:
        assert tar.extractfile("model/eval/heldout.jsonl").read() == ITEMS


REFUSALS = [
    ("set_file_missing", dict(data=None), ManifestError, "not one of the bundle's files"),
    ("set_not_json", dict(data=b"yes\n"), EvalSetError, "line 1 is not JSON"),
    ("set_empty", dict(data=b""), EvalSetError, "no items"),
    ("metric_bad", dict(heldout={**SET, "metric": "Acc Uracy"}), ConfigError, "metric name"),
    ("min_score_out_of_range", dict(heldout={**SET, "min_score": 2}), ConfigError, "min_score"),
]


@pytest.mark.parametrize("kw, error, reason", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_a_set_the_devices_would_refuse_is_refused_when_packing(tmp_path, key, kw, error, reason):
    out = tmp_path / "out" / "b.bundle"
    with pytest.raises(error, match=reason):
        build_bundle(model(tmp_path, **kw), out, name="tiny", version=1, signers=[key], now=NOW)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nothing written, not even a temp file


def test_inspect_names_the_set_and_its_minimum(tmp_path, key):
    from typer.testing import CliRunner

    from fleet.cli import bundle_app

    out = tmp_path / "b.bundle"
    build_bundle(model(tmp_path), out, name="tiny", version=1, signers=[key], now=NOW)
    shown = CliRunner().invoke(bundle_app, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "held-out set eval/heldout.jsonl: devices score accuracy (at least 0.75)" in shown.output
