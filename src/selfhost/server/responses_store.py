"""ResponseStore: the stored /v1/responses objects behind `previous_response_id`, in SQLite through SQLAlchemy.

Each row holds a response as the API returned it and the conversation that led to it
(every earlier input and output item of its chain plus its own input), so a chained
request reads one row. The database opens on first use: an app that never stores a
response creates no file. Each save prunes past the retention limit (a count, or an age).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Float, MetaData, String, Table, Text, create_engine, delete, select

from selfhost.errors import InvalidParameterError

_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")

_metadata = MetaData()
_responses = Table(
    "responses", _metadata,
    Column("id", String, primary_key=True),
    Column("created_at", Float, nullable=False, index=True),
    Column("response", Text, nullable=False),  # the response object, JSON
    Column("conversation", Text, nullable=False),  # the input items that led to it, JSON
)


@dataclass(frozen=True)
class Retention:
    """Keep the newest `max_count` responses, or those younger than `max_age_s`."""

    max_count: int | None = None
    max_age_s: float | None = None

    @classmethod
    def parse(cls, value: str) -> Retention:
        text = value.strip().lower()
        if text.isdigit() and int(text) > 0:
            return cls(max_count=int(text))
        match = _AGE.match(text)
        if match and float(match[1]) > 0:
            return cls(max_age_s=float(match[1]) * _SECONDS[match[2]])
        raise InvalidParameterError(f"responses_retention={value!r} must be a positive count ('10000') or an age "
                                    "('30d', '12h', '90m', '600s')", param="responses_retention")


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, path: Path, retention: str):
        self.path = Path(path).expanduser()
        self.retention = Retention.parse(retention)
        self._engine = None
        self._open_lock = threading.Lock()

    def _db(self):
        with self._open_lock:
            if self._engine is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._engine = create_engine(f"sqlite:///{self.path}")
                _metadata.create_all(self._engine)
            return self._engine

    def save(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        """Blocking (call it off the event loop)."""
        row = {"id": response["id"], "created_at": time.time(), "response": json.dumps(response),
               "conversation": json.dumps(conversation)}
        with self._db().begin() as db:
            db.execute(_responses.insert().values(**row))
            db.execute(self._prune())

    def _prune(self):
        if self.retention.max_age_s is not None:
            return delete(_responses).where(_responses.c.created_at < time.time() - self.retention.max_age_s)
        newest = select(_responses.c.id).order_by(_responses.c.created_at.desc()).limit(self.retention.max_count)
        return delete(_responses).where(_responses.c.id.not_in(newest.scalar_subquery()))

    def get(self, response_id: str) -> StoredResponse | None:
        """Blocking (call it off the event loop). A lookup alone creates no database file."""
        if self._engine is None and not self.path.exists():
            return None
        query = select(_responses).where(_responses.c.id == response_id)
        if self.retention.max_age_s is not None:  # expired, though not yet pruned by a save
            query = query.where(_responses.c.created_at >= time.time() - self.retention.max_age_s)
        with self._db().connect() as db:
            row = db.execute(query).first()
        if row is None:
            return None
        return StoredResponse(json.loads(row.response), json.loads(row.conversation))

    def delete(self, response_id: str) -> bool:
        if self._engine is None and not self.path.exists():
            return False
        with self._db().begin() as db:
            return db.execute(delete(_responses).where(_responses.c.id == response_id)).rowcount > 0

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
