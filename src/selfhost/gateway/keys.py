"""Virtual keys: named client keys with a budget, a period and the models they may call.

A key is shown once, at creation (`sk-selfhost-...`); the database keeps only its
SHA-256 digest and a short prefix to recognise it by. Keys live in the ledger's
database, so `selfhost keys --config` and the server see the same ones.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from sqlalchemy import Column, DateTime, Integer, String, Table, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from selfhost.errors import InvalidParameterError, SelfhostError
from selfhost.gateway.ledger import metadata

KEY_PREFIX = "sk-selfhost-"
PERIODS = ("day", "month", "total")

keys_table = Table(
    "gateway_keys", metadata,
    Column("name", String(128), primary_key=True),
    Column("digest", String(64), nullable=False, unique=True),
    Column("shown_prefix", String(24), nullable=False),  # enough to tell keys apart, not to use one
    Column("budget_usd", String(40)),  # a Decimal as text; None: no budget
    Column("period", String(8), nullable=False),
    Column("models", String(2048)),  # comma list; None: every model
    Column("rpm", Integer),  # requests per minute; None: no limit
    Column("tpm", Integer),  # tokens per minute (prompt + generated); None: no limit
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
)


class VirtualKeyError(SelfhostError):
    """A key name that is taken or unknown."""


class DuplicateKeyError(VirtualKeyError):
    """A key name that is already taken."""


class UnknownKeyError(VirtualKeyError):
    """A key name that no key has."""


@dataclass(frozen=True)
class VirtualKey:
    name: str
    shown_prefix: str
    budget_usd: Decimal | None
    period: str
    models: tuple[str, ...] | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    rpm: int | None = None
    tpm: int | None = None

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def period_start(self, now: dt.datetime) -> dt.datetime | None:
        """The start of the budget period holding `now` (UTC); None for a lifetime budget."""
        if self.period == "day":
            return now.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == "month":
            return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_budget(value: str | float | None) -> Decimal | None:
    if value is None:
        return None
    try:
        budget = Decimal(str(value))
    except InvalidOperation:
        raise InvalidParameterError(f"--budget-usd must be a number of dollars, got {value!r}") from None
    if not budget.is_finite() or budget <= 0:
        raise InvalidParameterError(f"--budget-usd must be more than 0, got {value!r}")
    return budget


class KeyStore:
    def __init__(self, engine: Engine):
        self.engine = engine
        metadata.create_all(engine)

    def create(self, name: str, budget_usd: Decimal | None = None, period: str = "month",
               models: tuple[str, ...] | None = None, rpm: int | None = None, tpm: int | None = None) -> str:
        """Store a new key and return it: the only time its text exists outside the client."""
        if period not in PERIODS:
            raise InvalidParameterError(f"--period must be one of {', '.join(PERIODS)}, got {period!r}")
        if not name.strip():
            raise InvalidParameterError("a key needs a non-empty --name")
        for flag, limit in (("--rpm", rpm), ("--tpm", tpm)):
            if limit is not None and limit < 1:
                raise InvalidParameterError(f"{flag} must be at least 1, got {limit}")
        key = KEY_PREFIX + secrets.token_urlsafe(24)
        row = {"name": name, "digest": digest(key), "shown_prefix": key[:len(KEY_PREFIX) + 4],
               "budget_usd": None if budget_usd is None else format(budget_usd, "f"), "period": period,
               "models": ",".join(models) if models else None, "rpm": rpm, "tpm": tpm,
               "created_at": dt.datetime.now(dt.UTC)}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(keys_table).values(**row))
        except IntegrityError:
            raise DuplicateKeyError(f"a key named {name!r} already exists; choose another name or revoke it") from None
        return key

    def all(self) -> list[VirtualKey]:
        with self.engine.connect() as conn:
            return [_key(r) for r in conn.execute(select(keys_table).order_by(keys_table.c.name))]

    def get(self, name: str) -> VirtualKey:
        with self.engine.connect() as conn:
            row = conn.execute(select(keys_table).where(keys_table.c.name == name)).first()
        if row is None:
            raise UnknownKeyError(f"no key named {name!r}")
        return _key(row)

    def find(self, key: str) -> VirtualKey | None:
        """The key whose text is `key`, revoked ones included (the caller tells them apart)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(keys_table).where(keys_table.c.digest == digest(key))).first()
        return None if row is None else _key(row)

    def revoke(self, name: str) -> None:
        self.get(name)  # unknown names are an error
        with self.engine.begin() as conn:
            conn.execute(update(keys_table).where(keys_table.c.name == name, keys_table.c.revoked_at.is_(None))
                         .values(revoked_at=dt.datetime.now(dt.UTC)))


def _key(row) -> VirtualKey:
    r = row._mapping
    return VirtualKey(
        name=r["name"], shown_prefix=r["shown_prefix"],
        budget_usd=None if r["budget_usd"] is None else Decimal(r["budget_usd"]), period=r["period"],
        models=tuple(r["models"].split(",")) if r["models"] else None, created_at=_utc(r["created_at"]),
        revoked_at=_utc(r["revoked_at"]), rpm=r["rpm"], tpm=r["tpm"])


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands datetimes back without their zone; they were written in UTC.
    return value.replace(tzinfo=dt.UTC) if value is not None and value.tzinfo is None else value
