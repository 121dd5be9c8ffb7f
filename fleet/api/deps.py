"""What route handlers receive: the running fleet's parts and a database session, as `Annotated` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from protocol.trust import Keyring

from ..acl import BrokerAccounts
from ..bundles import BundleStore
from ..db import Database
from ..messaging import FleetMessaging
from ..settings import Settings


@dataclass(frozen=True)
class Fleet:
    """The parts the app's lifespan started; none of them holds state the database does not."""

    settings: Settings
    db: Database
    store: BundleStore
    messaging: FleetMessaging
    keyring: Keyring | None  # None: uploads need a signature, but from any key
    accounts: BrokerAccounts | None = None  # how enrolment and revocation reach the broker; None: kept by hand


def get_fleet(request: Request) -> Fleet:
    return request.app.state.fleet


FleetDep = Annotated[Fleet, Depends(get_fleet)]


def get_session(fleet: FleetDep) -> Iterator[Session]:
    """One session per request; handlers open the transaction (`with s.begin():`) where they write."""
    with fleet.db.sessions() as s:
        yield s


SessionDep = Annotated[Session, Depends(get_session)]
