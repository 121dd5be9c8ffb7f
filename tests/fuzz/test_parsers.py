"""Fuzzing every parser of outside input: whatever arrives, only the parser's typed error may come out.

Parsers and the errors they may raise:
    messages           protocol.messages.parse_message(bytes)                       MessageError
    envelope           protocol.trust.verify_envelope(bytes, keyring, ...)          SlmopsError
    envelope_unverified protocol.trust.read_unverified(bytes)                       SlmopsError
    manifest           protocol.manifest.Manifest.from_signed(dict)                 SlmopsError
    root               protocol.root load_trusted_root / parse_root / verify_next_root(bytes)  SlmopsError; the
                       trusted root a rejected next root was checked against is unchanged
    bundle             protocol.bundle.read_envelope / unpack (seekable and not)     SlmopsError; a bundle refused
                       by its headers leaves the sink's folder empty, one refused for its data wrote at most the
                       declared sizes, an accepted one wrote exactly the manifest's files
    chat               agent.openai ChatRequest/CompletionRequest.model_validate_json + refusal + guidance
                                                                                    ValidationError, RequestError
    eval_set           protocol.evalset.parse_items(bytes), then is_right on each item  EvalSetError

Inputs mix raw bytes, random JSON values, and valid documents built from the models with hypothesis strategies then
mutated: a field replaced by a random JSON value, a huge int, NaN/inf, a long string or deep nesting (also written
as raw JSON text past Python's limits), fields deleted or added, then bytes flipped, cut, inserted or deleted; bundles
also get tar header fields rewritten (checksum fixed or not), PAX records replaced and members dropped, repeated or
swapped. `PARSERS` maps each name to (strategy, check); `bench/fuzz.py` runs the same checks for 100,000+ inputs.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.openai import NEUTRAL, ChatRequest, CompletionRequest, RequestError, guidance, refusal
from protocol.bundle import check_headers, read_envelope, unpack, write_bundle
from protocol.errors import EvalSetError, LengthOrHashMismatchError, MessageError, SlmopsError, one_line
from protocol.evalset import is_right, parse_items
from protocol.manifest import MAX_VERSION, NAME_RE, FileEntry, Manifest, SmokePrompt, canonical_bytes
from protocol.manifest import HealthCheck as HealthCheck_
from protocol.messages import (
    ID_RE, ActiveModel, BundleRef, CancelCommand, DeployCommand, Presence, Signature, StatusReport, Telemetry,
    UpdateState, encode, parse_message,
)
from protocol.root import ROLES, load_trusted_root, parse_root, root_signed, sign_root, verify_next_root
from protocol.trust import Keyring, generate_keypair, read_unverified, sign_envelope, verify_envelope
from tests.protocol.tarcraft import Unseekable

CI = settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
KEY = generate_keypair()
RING = Keyring((KEY.public,))
NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)

# ---- hostile values -------------------------------------------------------------------------------------------


class Raw:
    """JSON text spliced into a document as is: what Python's json cannot write (deep nesting, 5000-digit ints)."""

    def __init__(self, text: bytes) -> None:
        self.text = text


RAW_TEXTS = [b"1" * 5000, b"-" + b"9" * 4301, b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity", b'"\\ud800"',
             b'"\xff\xfe"', b'{"a":1,"a":[2]}', b"[" * 990 + b"]" * 990, b"[" * 5000 + b"]" * 5000,
             b'{"a":' * 1200 + b"0" + b"}" * 1200, b"0.1e-99999", b"1" * 4300]
HUGE_INTS = [2**63, 2**63 - 1, -(2**63) - 1, 2**64, 10**300, -1, 0, 1, 10**4299]
LONG = st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\x00", "/", "../", "9", "\ud800", "{"]),
                 st.integers(0, 100_000))


def nest(value: object, depth: int, as_dict: bool) -> object:
    for _ in range(depth):
        value = {"a": value} if as_dict else [value]
    return value


TOKENS = ["\ud800", "x\udfff", "", "1", "true", "null", "model/../x", "/etc/passwd", "a\\b", "x\n", "a{4294967296}",
          "(" * 1200 + ")" * 1200, "(?P<", "[z-a]", "2026-13-01T00:00:00Z", "9999-12-31T23:59:59+23:59", "-1", "1e309"]
leaf = (st.none() | st.booleans() | st.integers() | st.sampled_from(HUGE_INTS) | st.floats()
        | st.text(max_size=20) | st.sampled_from(TOKENS))
json_values = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


def hostile(raw: bool) -> st.SearchStrategy:
    """A replacement value: random JSON, huge ints, NaN/inf, long strings, deep nesting (raw text when `raw`)."""
    deep = st.builds(nest, leaf, st.integers(0, 50 if raw else 3000), st.booleans())
    extra = st.sampled_from(RAW_TEXTS).map(Raw) if raw else st.sampled_from([10**5000, float("nan"), -0.0, (1, 2)])
    return json_values | LONG | deep | extra


def dumps(doc: object) -> bytes:
    """JSON bytes (NaN and inf allowed), with each `Raw` spliced in."""
    raws: list[bytes] = []

    def default(o: object) -> str:
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"\x00raw{len(raws) - 1}"
        raise TypeError(type(o).__name__)

    out = json.dumps(doc, default=default).encode("utf-8", "surrogatepass")
    for i, text in enumerate(raws):
        out = out.replace(f'"\\u0000raw{i}"'.encode(), text, 1)
    return out


def _locations(doc: object, at: tuple = ()) -> Iterator[tuple]:
    """Key paths of a document, not below 20 levels (an earlier edit may have nested it thousands deep)."""
    yield at
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items if len(at) < 20 else ():
        yield from _locations(v, (*at, k))


def _get(doc: object, at: tuple) -> object:
    for k in at:
        doc = doc[k]
    return doc


@st.composite
def mutated(draw: st.DrawFn, docs: st.SearchStrategy, names: tuple[str, ...] = (), raw: bool = True) -> object:
    """A valid document with 1-3 edits: a value replaced, a key or item deleted, a key or item added."""
    doc = copy.deepcopy(draw(docs))
    for _ in range(draw(st.integers(1, 3))):
        locs = list(_locations(doc))
        texts = [at for at in locs if at and isinstance(_get(doc, at), str)]
        loc = draw(st.sampled_from(texts if texts and draw(st.booleans()) else locs))  # half the time: a string
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        value = draw(hostile(raw))
        if not loc:
            doc = value if op == "replace" else doc
            continue
        parent = doc
        for k in loc[:-1]:
            parent = parent[k]
        target = parent[loc[-1]]
        if op == "replace":
            strings = st.sampled_from(TOKENS) | st.text(max_size=20) | LONG
            parent[loc[-1]] = draw(strings) if isinstance(target, str) and draw(st.booleans()) else value
        elif op == "delete":
            del parent[loc[-1]]
        elif isinstance(target, dict):
            target[draw(st.sampled_from(names) | st.text(max_size=8)) if names else draw(st.text(max_size=8))] = value
        elif isinstance(target, list):
            target.insert(draw(st.integers(0, len(target))), value)
    return doc


@st.composite
def byte_edits(draw: st.DrawFn, data: bytes, max_edits: int = 3) -> bytes:
    """Bytes flipped, cut, inserted or deleted."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        pos = draw(st.integers(0, len(b)))
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if op == "flip" and pos < len(b):
            b[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=600))
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 600))]
    return bytes(b)


def wire(docs: st.SearchStrategy, names: tuple[str, ...]) -> st.SearchStrategy:
    """Bytes from outside: raw, random JSON, valid (as is, mutated, or mutated then byte-edited)."""
    valid = docs.map(dumps)
    bad = mutated(docs, names).map(dumps)
    return (st.binary(max_size=2000) | json_values.map(dumps) | valid | bad
            | (valid | bad).flatmap(byte_edits))


# ---- valid documents from the models --------------------------------------------------------------------------

ids = st.from_regex(ID_RE, fullmatch=True)
bundle_names = st.from_regex(NAME_RE, fullmatch=True)
versions = st.integers(1, MAX_VERSION)
counts = st.integers(0, MAX_VERSION)
hexes = st.text("0123456789abcdef", min_size=64, max_size=64)
times = st.datetimes(timezones=st.just(timezone.utc))
gauges = st.floats(0, 1e12)
actives = st.none() | st.builds(ActiveModel, name=bundle_names, version=versions)
header = dict(message_id=ids, seq=counts, sent_at=times, signatures=st.lists(
    st.builds(Signature, keyid=hexes, sig=st.text("0123456789abcdef", min_size=128, max_size=128)), max_size=2
).map(tuple))
messages = st.one_of(
    st.builds(DeployCommand, deployment_id=ids, device_id=ids, **header, bundle=st.builds(
        BundleRef, name=bundle_names, version=versions, url=st.text(min_size=1, max_size=200), sha256=hexes,
        size=versions)),
    st.builds(CancelCommand, deployment_id=ids, device_id=ids, **header),
    st.builds(StatusReport, device_id=ids, deployment_id=ids, bundle_name=bundle_names, bundle_version=versions,
              state=st.sampled_from(UpdateState), active_version=st.none() | versions, **header,
              error_code=st.none() | st.from_regex(r"[a-z][a-z0-9_]{0,63}", fullmatch=True),
              detail=st.text(max_size=100)),
    st.builds(Telemetry, device_id=ids, active=actives, uptime_s=gauges, requests_total=counts,
              tokens_generated_total=counts, tokens_per_s=gauges, cpu_percent=gauges, memory_rss_mb=gauges,
              memory_percent=gauges, **header),
    st.builds(Presence, device_id=ids, online=st.booleans(), agent_version=st.text(max_size=20), active=actives,
              **header),
)
message_docs = messages.map(lambda m: json.loads(encode(m)))
MESSAGE_FIELDS = ("kind", "schema_version", "message_id", "seq", "sent_at", "signatures", "deployment_id",
                  "device_id", "bundle", "state", "detail", "online", "active", "uptime_s")

path_parts = st.from_regex(r"[A-Za-z0-9_.é-]{1,12}", fullmatch=True).filter(lambda p: p not in (".", ".."))
file_entries = st.builds(FileEntry, path=st.lists(path_parts, min_size=1, max_size=3).map("/".join), size=counts,
                         sha256=hexes)
manifests = st.builds(
    Manifest, name=bundle_names, version=versions, base_model=st.text(max_size=20),
    files=st.lists(file_entries, min_size=1, max_size=4, unique_by=lambda f: f.path).map(tuple), created=times,
    expires=st.none() | times, description=st.text(max_size=50), health=st.builds(HealthCheck_, prompts=st.lists(
        st.builds(SmokePrompt, prompt=st.text(max_size=10), expect=st.sampled_from([r"\S", "yes|no", "^[0-9]+$"])),
        min_size=1, max_size=2).map(tuple)),
)
manifest_docs = manifests.map(Manifest.to_signed)
MANIFEST_FIELDS = tuple(Manifest.model_fields) + ("path", "size", "sha256", "prompts", "expect", "metrics")


def signed(doc: object) -> dict:
    """An envelope whose signature is good for `doc` (bogus when `doc` has no canonical bytes)."""
    try:
        sig = KEY.key.sign(canonical_bytes(doc)).hex()
    except SlmopsError:
        sig = "00" * 64
    return {"signed": doc, "signatures": [{"keyid": KEY.keyid, "sig": sig}]}


envelope_docs = manifest_docs.map(signed)
envelopes = (wire(envelope_docs, ("signed", "signatures", "keyid", "sig", *MANIFEST_FIELDS))
             | mutated(manifest_docs, MANIFEST_FIELDS).map(signed).map(dumps))

ROOT_KEYS = [generate_keypair() for _ in range(4)]
ROOT_FIELDS = ("_type", "spec_version", "version", "expires", "keys", "roles", "revoked", "keyids", "threshold",
               "keytype", "public", "signed", "signatures", "keyid", "sig", *ROLES)


@st.composite
def root_docs(draw: st.DrawFn) -> dict:
    """A valid root's signed part: each role 1-4 of the four keys with a threshold it can meet."""
    roles = {}
    for name in ROLES:
        ks = draw(st.lists(st.sampled_from(ROOT_KEYS), min_size=1, max_size=4, unique_by=lambda k: k.keyid))
        roles[name] = ([k.keyid for k in ks], draw(st.integers(1, len(ks))))
    used = {k for ids, _ in roles.values() for k in ids}
    expires = draw(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(9998, 1, 1),
                                timezones=st.just(timezone.utc)))
    return root_signed(version=draw(versions), expires=expires, keys=[k.public for k in ROOT_KEYS if k.keyid in used],
                       roles=roles, revoked=draw(st.lists(hexes, max_size=2, unique=True)))


def root_envelope(doc: object) -> dict:
    """A root envelope signed by all four keys (bogus signatures when `doc` has no canonical bytes)."""
    try:
        payload = canonical_bytes(doc)
        sigs = [{"keyid": k.keyid, "sig": k.key.sign(payload).hex()} for k in ROOT_KEYS]
    except SlmopsError:
        sigs = [{"keyid": ROOT_KEYS[0].keyid, "sig": "00" * 64}]
    return {"signed": doc, "signatures": sigs}


TRUSTED_ROOT = load_trusted_root(sign_root(root_signed(
    version=1, expires=datetime(9000, 1, 1, tzinfo=timezone.utc), keys=[k.public for k in ROOT_KEYS],
    roles={name: ([k.keyid for k in ROOT_KEYS], 1) for name in ROLES}), ROOT_KEYS))
root_files = (wire(root_docs().map(root_envelope), ROOT_FIELDS)
              | mutated(root_docs(), ROOT_FIELDS).map(root_envelope).map(dumps)
              | root_docs().map(lambda d: {**d, "version": 2}).map(root_envelope).map(dumps))

chat_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]),
     "content": st.text(max_size=50) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()}))}
), min_size=1, max_size=3)
response_formats = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "json_object", "json_schema", "regex"])},
    optional={"json_schema": st.fixed_dictionaries({}, optional={"name": st.text(max_size=10), "schema": st.dictionaries(
        st.text(max_size=5), json_values, max_size=3), "strict": st.booleans()}), "regex": st.text(max_size=20)},
)
chat_docs = st.fixed_dictionaries({"messages": chat_messages}, optional={
    "model": st.text(max_size=20), "max_tokens": st.integers(1, 1 << 20), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "seed": st.integers(-(1 << 63), (1 << 63) - 1), "stream": st.booleans(),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5), "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20), "max_completion_tokens": st.integers(1, 1 << 20),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "response_format": response_formats,
    "prompt": st.text(max_size=20), "user": st.text(max_size=5),
    **{name: st.sampled_from(values) | json_values for name, values in NEUTRAL.items()},
})
CHAT_FIELDS = tuple(ChatRequest.model_fields) + tuple(NEUTRAL) + ("role", "content", "type", "text", "schema")

# ---- the bundle: a valid one, then header-aware edits ---------------------------------------------------------

FILES = {"model.onnx": b"\x08\x01graph" * 300, "genai_config.json": b'{"model": {}}', "tokenizer/" + "t" * 110: b"{}",
         "vocab/é.txt": b"a\nb\n", "empty": b""}
MANIFEST = Manifest(name="triage", version=3, created=NOW, files=tuple(
    FileEntry(path=p, size=len(b), sha256=hashlib.sha256(b).hexdigest()) for p, b in FILES.items()))
_out = io.BytesIO()
write_bundle(_out, sign_envelope(MANIFEST, [KEY]), [(p, io.BytesIO(b), len(b)) for p, b in FILES.items()])
BUNDLE = _out.getvalue()
FIELDS = [(0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (148, 8), (156, 1), (157, 100), (257, 6),
          (263, 2), (329, 8), (337, 8), (345, 155)]  # ustar: name mode uid gid size mtime chksum type link magic ...


def _headers(data: bytes) -> list[tuple[int, int, bool]]:
    """(header offset, data size, is a PAX header) of each member of a valid tar."""
    out, pos = [], 0
    while pos + 512 <= len(data) and data[pos:pos + 512].count(0) < 512:
        info = tarfile.TarInfo.frombuf(data[pos:pos + 512], "utf-8", "surrogateescape")
        out.append((pos, info.size, info.type == tarfile.XHDTYPE))
        pos += 512 + -(-info.size // 512) * 512
    return out


HEADERS = _headers(BUNDLE)


def _checksum(b: bytearray, at: int) -> None:
    b[at + 148:at + 156] = b" " * 8
    b[at + 148:at + 155] = b"%06o\0" % sum(b[at:at + 512])


@st.composite
def bundle_edits(draw: st.DrawFn) -> bytes:
    b = bytearray(BUNDLE)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["field", "field", "pax", "members", "bytes"]))
        at, size, pax = draw(st.sampled_from(HEADERS))
        if op == "field" and at + 512 <= len(b):
            start, width = draw(st.sampled_from(FIELDS))
            value = draw(st.binary(min_size=width, max_size=width)
                         | st.integers(0, 8**(width - 1) - 1).map(lambda n, w=width: b"%0*o\0" % (w - 1, n))
                         | st.binary(min_size=width, max_size=width).map(lambda v: bytes([0x80 | v[0] & 1]) + v[1:])
                         | st.sampled_from(b"0123456789AgKLSxXDMNV\x00").map(lambda c: bytes([c]) * width))
            b[at + start:at + start + width] = value[:width]
            if draw(st.integers(0, 4)):
                _checksum(b, at)
        elif op == "pax" and pax and at + 512 <= len(b):
            key = draw(st.sampled_from(["path", "size", "linkpath", "GNU.sparse.map", "mtime"]) | st.text(max_size=5))
            value = draw(st.text(max_size=30) | st.integers(-1, 2**70).map(str) | st.just("model/model.onnx"))
            body = f" {key}={value}\n".encode("utf-8", "surrogatepass")
            n = len(body) + len(str(len(body)))
            record = b"%d" % (n + (len(str(n)) > len(str(len(body)))) if draw(st.booleans()) else draw(st.integers(0, 99)))
            record += body
            records = record * draw(st.integers(1, 2))
            header = bytearray(b[at:at + 512])
            header[124:136] = b"%011o\0" % len(records)
            _checksum(header, 0)
            b[at:at + 512 + -(-size // 512) * 512] = header + records + b"\0" * (-len(records) % 512)
        elif op == "members":
            members = [BUNDLE[h:n] for (h, _, _), (n, _, _) in zip(HEADERS, [*HEADERS[1:], (len(BUNDLE) - 1024, 0, 0)])]
            i, j = draw(st.integers(0, len(members) - 1)), draw(st.integers(0, len(members) - 1))
            how = draw(st.sampled_from(["drop", "repeat", "swap"]))
            if how == "drop":
                del members[i]
            elif how == "repeat":
                members.insert(j, members[i])
            else:
                members[i], members[j] = members[j], members[i]
            b = bytearray(b"".join(members) + b"\0" * 1024)
        else:
            b = bytearray(draw(byte_edits(bytes(b), 1)))
    return bytes(b)


bundles = bundle_edits() | st.just(BUNDLE) | st.binary(max_size=3000) | st.sampled_from(
    [BUNDLE[:n] for n in (0, 100, 512, 1024, len(BUNDLE) - 1024, len(BUNDLE) - 1)])

# ---- the checks: allowed errors pass, anything else propagates --------------------------------------------------


def check_message(payload: bytes) -> None:
    try:
        parse_message(payload)
    except MessageError:
        pass


def check_envelope(data: bytes) -> None:
    for ring, now, floor in ((RING, NOW, None), (RING, None, 2), (Keyring((KEY.public, generate_keypair().public), 2), NOW, 1)):
        try:
            verify_envelope(data, ring, now=now, min_version=floor)
        except SlmopsError:
            pass


def check_envelope_unverified(data: bytes) -> None:
    try:
        read_unverified(data)
    except SlmopsError:
        pass


def check_manifest(doc: object) -> None:
    try:
        Manifest.from_signed(doc)
    except SlmopsError:
        pass


class _Memory(io.BytesIO):
    def __init__(self, into: dict[str, bytes], path: str) -> None:
        super().__init__()
        self.into, self.path = into, path

    def close(self) -> None:
        self.into[self.path] = self.into.get(self.path, b"") + self.getvalue()
        super().close()


def _sink(root: Path) -> Callable[[str], io.BufferedWriter]:
    def sink(rel: str) -> io.BufferedWriter:
        out = root / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        return out.open("wb")

    return sink


def check_bundle(data: bytes) -> None:
    try:
        read_envelope(io.BytesIO(data))
    except SlmopsError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            unpack(io.BytesIO(data), MANIFEST, _sink(root))
        except SlmopsError as exc:
            got = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
            try:
                check_headers(io.BytesIO(data), MANIFEST)
            except SlmopsError:
                assert not got, f"refused by its headers ({one_line(exc)}) but the sink got {got[:5]}"
            else:
                assert isinstance(exc, LengthOrHashMismatchError), f"headers pass, then {one_line(exc)}"
                for p in root.rglob("*"):
                    if p.is_file():
                        assert p.stat().st_size <= MANIFEST.file(p.relative_to(root).as_posix()).size
        else:
            assert {p: (root / p).read_bytes() for p in FILES} == FILES, "accepted, but the files differ"
    written: dict[str, bytes] = {}
    try:
        unpack(Unseekable(data), MANIFEST, lambda path: _Memory(written, path))
    except SlmopsError:
        pass
    for path, body in written.items():
        assert len(body) <= MANIFEST.file(path).size, f"{path}: {len(body)} bytes written"


def check_root(data: bytes) -> None:
    before = (TRUSTED_ROOT.version, dict(TRUSTED_ROOT.roles), TRUSTED_ROOT.revoked, TRUSTED_ROOT.raw)
    for step in (lambda: load_trusted_root(data, NOW), lambda: parse_root(data),
                 lambda: verify_next_root(TRUSTED_ROOT, data)):
        try:
            step()
        except SlmopsError:
            pass
    assert (TRUSTED_ROOT.version, dict(TRUSTED_ROOT.roles), TRUSTED_ROOT.revoked, TRUSTED_ROOT.raw) == before


def check_chat(body: bytes) -> None:
    for kind in (ChatRequest, CompletionRequest):
        try:
            req = kind.model_validate_json(body)
            refusal(req)
            req.stops(), req.top(), req.wanted_tokens()
            if isinstance(req, ChatRequest):
                req.chat()
                guidance(req.response_format)
            else:
                req.text()
        except (ValidationError, RequestError):
            pass


EVAL_FIELDS = ("prompt", "messages", "expected", "match", "regex", "role", "content")
eval_items = st.fixed_dictionaries(
    {"expected": st.sampled_from(["ok", "warning", "fault"])},
    optional={"match": st.just("exact") | st.just({"regex": "^(ok|warning|fault): "})},
).flatmap(lambda d: st.one_of(
    st.builds(lambda p: {**d, "prompt": p}, st.text(min_size=1, max_size=40)),
    st.builds(lambda c: {**d, "messages": [{"role": "user", "content": c}]}, st.text(min_size=1, max_size=40)),
))
eval_sets = (st.lists(wire(eval_items, EVAL_FIELDS), max_size=6).map(b"\n".join)  # a bad line refuses the whole set
             | st.lists(eval_items.map(dumps), min_size=1, max_size=6).map(b"\n".join))  # so valid ones too


def check_eval_set(data: bytes) -> None:
    """`protocol.evalset.parse_items` on a held-out set file: EvalSetError only; what it accepts can be asked and
    scored (a regex rule on any answer, including one that makes a backtracking regex work hard, stays cheap)."""
    try:
        items = parse_items(data)
    except EvalSetError:
        return
    assert 1 <= len(items) <= 200
    for item in items:
        assert item.chat() and item.chat()[-1]["role"] == "user"
        rule = item.match or "exact"
        for answer in ("", "ok: fine", item.expected, "x" * 2000):
            assert isinstance(is_right(answer, item.expected, rule), bool)


PARSERS: dict[str, tuple[st.SearchStrategy, Callable[[object], None]]] = {
    "messages": (wire(message_docs, MESSAGE_FIELDS), check_message),
    "envelope": (envelopes, check_envelope),
    "envelope_unverified": (envelopes, check_envelope_unverified),
    "manifest": (json_values | manifest_docs | mutated(manifest_docs, MANIFEST_FIELDS, raw=False), check_manifest),
    "bundle": (bundles, check_bundle),
    "root": (root_files, check_root),
    "chat": (wire(chat_docs, CHAT_FIELDS), check_chat),
    "eval_set": (eval_sets, check_eval_set),
}

# ---- the short run (make test) --------------------------------------------------------------------------------


@CI
@given(messages)
def test_valid_messages_parse(message) -> None:
    assert parse_message(encode(message)) == message


@CI
@given(manifests)
def test_valid_envelopes_verify(manifest: Manifest) -> None:
    assert verify_envelope(sign_envelope(manifest, [KEY]), RING) == manifest


def test_valid_bundle_unpacks(tmp_path: Path) -> None:
    check_bundle(BUNDLE)
    unpack(io.BytesIO(BUNDLE), MANIFEST, _sink(tmp_path))
    assert {p: (tmp_path / p).read_bytes() for p in FILES} == FILES


@CI
@given(PARSERS["messages"][0])
def test_parse_message_raises_only_message_error(payload: bytes) -> None:
    check_message(payload)


@CI
@given(PARSERS["envelope"][0])
def test_verify_envelope_raises_only_slmops_errors(data: bytes) -> None:
    check_envelope(data)


@CI
@given(PARSERS["envelope_unverified"][0])
def test_read_unverified_raises_only_slmops_errors(data: bytes) -> None:
    check_envelope_unverified(data)


def _expecting(regex: str) -> dict:
    return MANIFEST.to_signed() | {"health": {"prompts": [{"prompt": "Hi", "expect": regex}]}}


@CI
@given(PARSERS["manifest"][0])
@example(_expecting("a{4294967296}"))  # found by bench.fuzz: OverflowError from re.compile
@example(_expecting("(" * 1200 + ")" * 1200))  # found by bench.fuzz: RecursionError from re.compile
def test_manifest_from_signed_raises_only_slmops_errors(doc: object) -> None:
    check_manifest(doc)


@CI
@given(PARSERS["bundle"][0])
def test_bundle_raises_only_slmops_errors_and_writes_nothing_when_headers_are_refused(data: bytes) -> None:
    check_bundle(data)


@CI
@given(root_docs())
def test_valid_roots_verify(doc: dict) -> None:
    data = sign_root(doc, ROOT_KEYS)
    assert load_trusted_root(data).version == doc["version"]
    if doc["version"] == 2:
        assert verify_next_root(TRUSTED_ROOT, data).version == 2


@CI
@given(PARSERS["root"][0])
def test_root_parsers_raise_only_slmops_errors(data: bytes) -> None:
    check_root(data)


@CI
@given(PARSERS["chat"][0])
def test_chat_body_raises_only_validation_or_request_errors(body: bytes) -> None:
    check_chat(body)


@CI
@given(PARSERS["eval_set"][0])
def test_held_out_sets_raise_only_eval_set_errors(data: bytes) -> None:
    check_eval_set(data)
