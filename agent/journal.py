"""The update journal, `state/update.json`: the update in progress and the outcomes of finished deployments.

Workflow: `Journal(store)` reads the file once (a damaged one means "no update in progress": staging is cleared and
the damage noted for the start-up report); `persist(record)` records the update in progress before each state's
handler runs; `remember(outcome)` ends it and keeps its outcome, the last `HISTORY`, so a redelivered command is
answered with that outcome and never run twice; `finished(deployment_id)` looks one up. The journal lives in memory
and is written through when the disk allows: on a full or read-only disk the update still runs to its end.
"""

from __future__ import annotations

import logging
from typing import Any

from protocol.errors import StateDamagedError

from .store import Store, read_json, storage_error, write_json_atomic

log = logging.getLogger("slmops.agent.update")
HISTORY = 200  # finished deployments whose outcome is kept, so a redelivered command is answered, not run twice


class Journal:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._stored = True  # whether the last write of update.json succeeded
        self.doc: dict[str, Any] = self._load()

    @property
    def current(self) -> dict[str, Any] | None:
        """The update in progress as it was last persisted, if any."""
        return self.doc.get("current")

    def persist(self, record: dict[str, Any]) -> None:
        self.doc["current"] = record
        self._write()

    def remember(self, outcome: dict[str, Any]) -> None:
        """End the update in progress and keep its outcome (replacing an older one of the same deployment)."""
        history = [h for h in self.doc.get("history", []) if _entry_id(h) != outcome["deployment_id"]]
        self.doc["current"] = None
        self.doc["history"] = (history + [outcome])[-HISTORY:]
        self._write()

    def finished(self, deployment_id: str) -> dict[str, Any] | None:
        """The outcome of a finished deployment; {} if an older agent remembered only its id; None if unknown."""
        for h in reversed(self.doc.get("history", [])):
            if _entry_id(h) == deployment_id:
                if isinstance(h, dict) and {"bundle", "state"} <= h.keys():
                    return h
                return {}
        return None

    def measured(self, name: str, version: int) -> dict[str, Any] | None:
        """The held-out score this device measured when it last installed `name` v`version` (None: none kept)."""
        for h in reversed(self.doc.get("history", [])):
            bundle = h.get("bundle") if isinstance(h, dict) else None
            if (isinstance(bundle, dict) and (bundle.get("name"), bundle.get("version")) == (name, version)
                    and h.get("state") == "active" and isinstance(h.get("eval"), dict)):
                return h["eval"]
        return None

    def damaged(self, why: str) -> dict[str, Any]:
        """update.json is unreadable: no update is in progress; clear staging, note it for the start-up report."""
        what = f"{why}; treated as no update in progress, staging cleared"
        log.error("%s", what)
        self.store.notes.append(("state_damaged", what))
        self.store.clear_all_staging()
        self.doc = {"current": None, "history": []}
        self._write()
        return self.doc

    def _load(self) -> dict[str, Any]:
        try:
            doc = read_json(self.store.update_file)
        except StateDamagedError as exc:
            return self.damaged(str(exc))
        if doc is None:
            return {"current": None, "history": []}
        if not isinstance(doc, dict) or not isinstance(doc.get("history", []), list):
            return self.damaged("state file update.json does not hold an update record")
        doc.setdefault("history", [])
        return doc

    def _write(self) -> None:
        try:
            write_json_atomic(self.store.update_file, self.doc)
            if not self._stored:
                log.warning("update record stored on disk again")
            self._stored = True
        except OSError as exc:
            if self._stored:
                log.error("cannot store the update record (%s); keeping it in memory", storage_error(exc, "update.json"))
            self._stored = False


def _entry_id(h: Any) -> Any:
    return h.get("deployment_id") if isinstance(h, dict) else h
