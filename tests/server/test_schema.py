"""Schemathesis against the app's own OpenAPI schema: whatever it generates, no 5xx.

Bounded for CI: a few examples per operation. Requests that would generate up to
the whole context are capped by the server's small test model (512 tokens).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

MAX_EXAMPLES = 8


@pytest.fixture
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, server):
    response = case.call(timeout=120)
    case.validate_response(response, checks=[not_a_server_error])
    assert server.app.state.models.models  # the server still serves
