"""Schemathesis against the app's own OpenAPI schema: whatever it generates, no 5xx.

The schema is read from the app object when this module is imported (an app that is
built but not started loads no model), so `@schema.parametrize()` makes one test per
operation at collection time; each generated case is then sent over HTTP to the live
loopback server, which serves the tiny test model. (Schemathesis' fixture-based lazy
loader does not work with pytest 9.) `test_served_schema_is_the_one_tested` checks
that the running server publishes the same schema.

Bounded for CI: a few examples per operation. Requests that would generate up to
the whole context are capped by the server's small test model (512 tokens).
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from selfhost.server.app import create_app
from selfhost.server.settings import ServerSettings

MAX_EXAMPLES = 8

APP_SCHEMA = create_app(ServerSettings()).openapi()
schema = schemathesis.openapi.from_dict(APP_SCHEMA)


def test_served_schema_is_the_one_tested(http):
    assert http.get("/openapi.json").json() == APP_SCHEMA


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, server):
    response = case.call(base_url=server.url, timeout=120)
    case.validate_response(response, checks=[not_a_server_error])
    assert server.app.state.models.models  # the server still serves
