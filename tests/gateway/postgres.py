"""A real PostgreSQL server for the ledger's tests: pgserver's wheel carries the binaries, so no system install.

One server per test session, on a Unix socket in a temporary folder (no TCP port), stopped and its folder
deleted at the end by pgserver (it stops only the server it started); each test gets a database of its own.
"""

from __future__ import annotations

import itertools
import tempfile

import pytest

_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres_server():
    import pgserver
    folder = tempfile.mkdtemp(prefix="selfhost-pg-")
    server = pgserver.get_server(folder, cleanup_mode="delete")
    yield server
    server.cleanup()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """postgresql://... of an empty database made for this test."""
    name = f"ledger_{next(_databases)}"
    postgres_server.psql(f"CREATE DATABASE {name};")
    return postgres_server.get_uri(name)
