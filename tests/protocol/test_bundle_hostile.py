"""Hostile tar members: every header is checked against the manifest before a byte of any file is written.

One row per crafted bundle (built with the tarfile module, see tarcraft.py): the specific error it must raise and
the member its message must name; each row also checks that nothing reached the sink (staging stays empty).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from protocol.bundle import read_envelope, unpack, write_bundle
from protocol.errors import (
    BadHeaderError,
    BundleError,
    DuplicateFileError,
    LengthOrHashMismatchError,
    ManifestError,
    MissingFileError,
    NotRegularFileError,
    UnexpectedFileError,
    UnsafePathError,
)

from .tarcraft import (
    FILES,
    TWO_GIB,
    Unseekable,
    envelope_member,
    gnu_sparse,
    manifest_of,
    member,
    model_members,
    tar,
)

ONNX = FILES["model.onnx"]
GOOD = model_members()


def hostile(*members: bytes) -> bytes:
    return tar(envelope_member(), *members)


def rest(*skip: str) -> list[bytes]:
    """The honest members other than those named."""
    return [m for p, m in zip(FILES, GOOD) if p not in skip]


CASES = [
    # (a) a header that declares more than the manifest, over a short payload
    ("size_over_manifest", hostile(member("model/model.onnx", ONNX[:100], size=len(ONNX) + 10**6), *rest("model.onnx")),
     LengthOrHashMismatchError, "model/model.onnx"),
    ("size_under_manifest", hostile(member("model/model.onnx", ONNX[:100]), *rest("model.onnx")),
     LengthOrHashMismatchError, "model/model.onnx"),
    ("size_2gib_short_payload", hostile(*rest("model.onnx"), member("model/model.onnx", ONNX[:100], size=TWO_GIB)),
     LengthOrHashMismatchError, "model/model.onnx"),
    # (b) GNU sparse: 1000 stored bytes that stdlib tarfile would extract as 2 GiB
    ("gnu_sparse", hostile(gnu_sparse("model/model.onnx", ONNX[:1000], TWO_GIB), *rest("model.onnx")),
     NotRegularFileError, "GNU sparse"),
    ("pax_sparse_map", hostile(member("model/model.onnx", ONNX, pax={"GNU.sparse.map": "0,10", "GNU.sparse.realsize": str(TWO_GIB)}),
                               *rest("model.onnx")), BadHeaderError, "GNU.sparse"),
    # (c) (d) links and other special members under a name the manifest lists
    ("symlink", hostile(member("model/model.onnx", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), *rest("model.onnx")),
     NotRegularFileError, "symbolic link"),
    ("hardlink", hostile(member("model/model.onnx", kind=tarfile.LNKTYPE, linkname="manifest.json"), *rest("model.onnx")),
     NotRegularFileError, "hard link"),
    ("fifo", hostile(member("model/model.onnx", kind=tarfile.FIFOTYPE), *rest("model.onnx")), NotRegularFileError, "fifo"),
    ("char_device", hostile(member("model/model.onnx", kind=tarfile.CHRTYPE), *rest("model.onnx")),
     NotRegularFileError, "character device"),
    ("directory", hostile(member("model/tokenizer", kind=tarfile.DIRTYPE), *GOOD), NotRegularFileError, "directory"),
    ("v7_directory", hostile(member("model/tokenizer/", kind=tarfile.AREGTYPE), *GOOD), NotRegularFileError, "directory"),
    ("gnu_longname", hostile(member("model/" + "a" * 120, b"x", fmt=tarfile.GNU_FORMAT), *GOOD),
     NotRegularFileError, "GNU long-name"),
    ("global_pax", hostile(member("pax_global_header", b"10 a=bcdef\n", kind=tarfile.XGLTYPE), *GOOD),
     NotRegularFileError, "global PAX"),
    # (e) paths outside model/ or with '..'
    ("dotdot", hostile(member("model/../model.onnx", ONNX), *rest("model.onnx")), UnsafePathError, "model/../model.onnx"),
    ("dotdot_out", hostile(member("model/../../etc/cron.d/x", b"x"), *GOOD), UnsafePathError, "../../etc"),
    ("absolute", hostile(member("/model/model.onnx", ONNX), *rest("model.onnx")), UnsafePathError, "/model/model.onnx"),
    ("outside_model", hostile(member("evil.sh", b"x"), *GOOD), UnsafePathError, "evil.sh"),
    ("dot_part", hostile(member("model/./model.onnx", ONNX), *rest("model.onnx")), UnsafePathError, "model/./model.onnx"),
    ("empty_part", hostile(member("model//model.onnx", ONNX), *rest("model.onnx")), UnsafePathError, "model//model.onnx"),
    ("backslash", hostile(member("model\\model.onnx", ONNX), *rest("model.onnx")), UnsafePathError, "model"),
    ("second_manifest", hostile(*GOOD, envelope_member()), UnsafePathError, "manifest.json"),
    # (f) a duplicate member (the first copy is fine)
    ("duplicate", hostile(*GOOD, member("model/genai_config.json", FILES["genai_config.json"])),
     DuplicateFileError, "model/genai_config.json"),
    # (g) a member the manifest does not name
    ("not_in_manifest", hostile(*GOOD, member("model/evil.py", b"print(1)")), UnexpectedFileError, "model/evil.py"),
    # (h) PAX headers that change a member's size or path, or carry other fields
    ("pax_size_override", hostile(member("model/model.onnx", ONNX, pax={"size": str(TWO_GIB)}), *rest("model.onnx")),
     BadHeaderError, "size"),
    ("pax_size_smaller", hostile(member("model/model.onnx", ONNX, pax={"size": "10"}), *rest("model.onnx")),
     BadHeaderError, "size"),
    ("pax_size_not_a_number", hostile(member("model/model.onnx", ONNX, pax={"size": "-1"}), *rest("model.onnx")),
     BadHeaderError, "size"),
    ("pax_path_rename", hostile(member("model/innocent", ONNX, pax={"path": "model/model.onnx"}), *rest("model.onnx")),
     BadHeaderError, "renames"),
    ("pax_linkpath", hostile(member("model/model.onnx", ONNX, pax={"linkpath": "/etc/passwd"}), *rest("model.onnx")),
     BadHeaderError, "linkpath"),
    ("pax_then_nothing", hostile(*GOOD)[: -2 * 512] + member("x", b"", kind=tarfile.XHDTYPE)[:512] + b"\0" * 1024,
     BadHeaderError, "PAX"),
    ("damaged_header", hostile(*GOOD[:1], b"\x01" * 512, *GOOD[1:]), BadHeaderError, "damaged"),
    ("truncated_header", envelope_member() + GOOD[0] + GOOD[1][:300], BadHeaderError, "truncated"),
    # data missing: the header fits the manifest but the file ends first
    ("cut_short", envelope_member() + GOOD[1] + GOOD[2] + GOOD[0][: 512 + 100], LengthOrHashMismatchError, "past the end"),
]


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    root = tmp_path / "staging" / "dep-1" / "model"
    root.mkdir(parents=True)
    return root


def sink_into(root: Path):
    def sink(rel: str):
        out = root / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        return out.open("wb")

    return sink


def written(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize("data, error, named", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_member_is_refused_before_anything_is_written(data: bytes, error: type, named: str, staging: Path) -> None:
    manifest = manifest_of()
    with pytest.raises(error) as info:
        unpack(io.BytesIO(data), manifest, sink_into(staging))
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert named in str(info.value)
    assert len(str(info.value)) < 400
    assert written(staging) == []
    with pytest.raises(error):  # the fleet's check (no sink) refuses it the same way
        unpack(io.BytesIO(data), manifest)


def test_the_crafted_tars_really_lie_to_a_naive_reader() -> None:
    """What the rows above defend against: stdlib tarfile believes these headers."""
    sparse = tarfile.open(fileobj=io.BytesIO(hostile(gnu_sparse("model/model.onnx", ONNX[:1000], TWO_GIB))))
    assert [(m.name, m.size, m.issparse()) for m in sparse.getmembers()][1] == ("model/model.onnx", TWO_GIB, True)
    pax = tarfile.open(fileobj=io.BytesIO(hostile(member("model/model.onnx", ONNX, pax={"size": str(TWO_GIB)}))), mode="r|")
    assert [m.size for m in (pax.next(), pax.next())] == [2, TWO_GIB]


def test_honest_bundle_unpacks_with_long_and_non_ascii_paths(staging: Path) -> None:
    files = {**FILES, "tokenizer/" + "x" * 150 + ".json": b"long", "vocab-é.txt": b"accent"}
    out = io.BytesIO()
    write_bundle(out, b"{}", [(p, io.BytesIO(b), len(b)) for p, b in files.items()])
    unpack(io.BytesIO(out.getvalue()), manifest_of(files), sink_into(staging))
    assert {p: (staging / p).read_bytes() for p in files} == files


def test_unseekable_stream_checks_each_header_before_its_bytes(staging: Path) -> None:
    data = hostile(gnu_sparse("model/model.onnx", ONNX[:1000], TWO_GIB), *rest("model.onnx"))
    with pytest.raises(NotRegularFileError):
        unpack(Unseekable(data), manifest_of(), sink_into(staging))
    assert written(staging) == []
    missing = hostile(*rest("genai_config.json"))
    with pytest.raises(MissingFileError, match="genai_config.json"):
        unpack(Unseekable(missing), manifest_of())
    unpack(Unseekable(hostile(*GOOD)), manifest_of(), sink_into(staging))
    assert written(staging) == ["genai_config.json", "model.onnx", "tokenizer", "tokenizer/tokenizer.json"]


def test_missing_file_is_found_before_anything_is_written(staging: Path) -> None:
    with pytest.raises(MissingFileError, match="genai_config.json"):
        unpack(io.BytesIO(hostile(*rest("genai_config.json"))), manifest_of(), sink_into(staging))
    assert written(staging) == []


@pytest.mark.parametrize(
    "data",
    [
        member("manifest.json", kind=tarfile.SYMTYPE, linkname="/etc/passwd") + b"\0" * 1024,
        member("manifest.json", b"{}", pax={"size": "99999999999"}) + b"\0" * 1024,
        gnu_sparse("manifest.json", b"{}", TWO_GIB) + b"\0" * 1024,
        member("other.json", b"{}") + b"\0" * 1024,
        member("manifest.json", b"{}", size=(1 << 20) + 1) + b"\0" * 1024,
        b"\0" * 1024,
    ],
    ids=["symlink", "pax_size", "sparse", "wrong_name", "too_big", "empty_tar"],
)
def test_envelope_member_must_be_a_plain_small_manifest(data: bytes) -> None:
    with pytest.raises(ManifestError):
        read_envelope(io.BytesIO(data))
    with pytest.raises(BundleError):
        unpack(io.BytesIO(data), manifest_of())
