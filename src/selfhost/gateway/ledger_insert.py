"""The ledger writer's batch insert, through the database driver's own `executemany`.

SQLAlchemy's per-execution machinery (pool checkout and reset, execution context,
parameter processing by dict) cost 3-5x SQLite's own work for the gateway's rows:
measured on the 2-core VM, 0.22 ms of CPU for a one-row commit and 0.066 ms a row in
batches of 8, against 0.043 and 0.018 ms through sqlite3 directly. So the statement
is compiled once for the engine's dialect, each value goes through that column's
bind processor (a SQLite DATETIME is stored as SQLAlchemy stores it, so every reader
still reads it back), and the rows go to the driver in one call. Any SQLAlchemy URL
still works: the SQL, its parameter style and the processors are the dialect's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy import Table, insert
from sqlalchemy.engine import Engine


class BatchInsert:
    """INSERTs many rows of `table` in one transaction on a driver connection the caller holds."""

    def __init__(self, engine: Engine, table: Table):
        self.engine = engine
        dialect = engine.dialect
        names = [column.key for column in table.columns]
        compiled = insert(table).compile(dialect=dialect, column_keys=names)
        self.sql = str(compiled)
        # Positional drivers (sqlite3's qmark) take tuples in the statement's order; named ones take dicts.
        self.order: Sequence[str] | None = list(compiled.positiontup) if compiled.positional else None
        processors: dict[str, Callable] = {}
        for column in table.columns:
            processor = column.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors[column.key] = processor
        self.processors = processors

    def parameters(self, row: dict) -> tuple | dict:
        for name, processor in self.processors.items():
            row[name] = processor(row[name])
        if self.order is None:
            return row
        return tuple(row[name] for name in self.order)

    def insert(self, rows: list[dict]) -> None:
        """Every row committed, or none (the transaction is rolled back and the error raised)."""
        params = [self.parameters(dict(row)) for row in rows]
        connection = self.engine.raw_connection()  # pooled: a dropped server connection is replaced next time
        try:
            cursor = connection.cursor()
            try:
                cursor.executemany(self.sql, params)
            finally:
                cursor.close()
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        finally:
            connection.close()  # back to the pool
