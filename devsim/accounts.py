"""Who the simulated devices are: ids and broker credentials.

- `numbered(n, prefix)`: ids `<prefix>-00000` ... with no credentials (an anonymous broker);
- `with_pattern(ids, username=, password=)`: `{id}` in each pattern becomes the device id (e.g. username "{id}",
  password "secret-{id}");
- `from_csv(path)`: lines `device_id,username,password` (a header line `device_id,...` is skipped); every id is
  checked with `protocol.topics.check_device_id`, the file is size-capped, and an empty password means none.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import ConfigError, SlmopsError, clip
from protocol.topics import check_device_id

MAX_CSV_BYTES = 64 * 2**20  # bytes: a credentials file larger than this is refused
MAX_DEVICES = 100_000
MAX_FIELD_CHARS = 256  # characters in a username or password


@dataclass(frozen=True)
class Account:
    device_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def numbered(n: int, prefix: str = "sim") -> list[str]:
    if not 1 <= n <= MAX_DEVICES:
        raise ConfigError(f"the number of devices must be 1 to {MAX_DEVICES}, not {n}")
    width = max(5, len(str(n - 1)))
    return [check_device_id(f"{prefix}-{i:0{width}d}") for i in range(n)]


def with_pattern(ids: list[str], *, username: str | None = None, password: str | None = None) -> list[Account]:
    if password is not None and not username:
        raise ConfigError("a password pattern needs a username pattern too (e.g. --username '{id}')")
    return [Account(d, username.replace("{id}", d) if username else None,
                    password.replace("{id}", d) if password is not None else None) for d in ids]


def from_csv(path: Path) -> list[Account]:
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_CSV_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the credentials file {path}: {exc.strerror}") from exc
    if len(data) > MAX_CSV_BYTES:
        raise ConfigError(f"credentials file {path} is over {MAX_CSV_BYTES} bytes")
    out, seen = [], set()
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"credentials file {path} is not UTF-8 CSV: {type(exc).__name__}") from exc
    for n, row in enumerate(rows, 1):
        if not row or (n == 1 and row[0] == "device_id"):
            continue
        if len(row) != 3 or any(len(v) > MAX_FIELD_CHARS for v in row):
            raise ConfigError(f"credentials file {path} line {n}: want device_id,username,password "
                              f"(each at most {MAX_FIELD_CHARS} chars)")
        try:
            device_id = check_device_id(row[0])
        except SlmopsError as exc:
            raise ConfigError(f"credentials file {path} line {n}: {exc}") from exc
        if device_id in seen:
            raise ConfigError(f"credentials file {path} line {n}: device {clip(device_id)} appears twice")
        seen.add(device_id)
        out.append(Account(device_id, row[1] or None, row[2] or None))
        if len(out) > MAX_DEVICES:
            raise ConfigError(f"credentials file {path} names more than {MAX_DEVICES} devices")
    if not out:
        raise ConfigError(f"credentials file {path} names no device")
    return out
