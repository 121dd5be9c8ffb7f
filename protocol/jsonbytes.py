"""Bytes from outside -> a JSON value, bounded: the first step of every signed-document parser (envelope, root).

`load_bounded(data, limit=..., error=..., what=...)` refuses more than `limit` bytes unread, and turns everything
`json.loads` may raise on hostile bytes (bad UTF-8, bad JSON, a number past the int-digit limit, nesting past the
recursion limit) into `error` with one line naming `what`.
"""

from __future__ import annotations

import json

from .errors import SlmopsError


def load_bounded(data: bytes, *, limit: int, error: type[SlmopsError], what: str) -> object:
    if len(data) > limit:
        raise error(f"{what} is {len(data)} bytes, over the {limit} byte limit")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, a number Python refuses, nesting too deep
        raise error(f"{what} is not JSON this device can read: {str(exc)[:200]}") from exc
