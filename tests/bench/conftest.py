import pytest

from tests.bench.fake_openai import FakeServer


@pytest.fixture(scope="session")
def fake_server():
    server = FakeServer().start()
    yield server
    server.stop()


@pytest.fixture
def fake(fake_server):
    """The shared fake server with its state reset for this test (and after it, which
    releases any request the test held)."""
    fake_server.state.reset()
    yield fake_server
    fake_server.state.reset()
