"""With API keys set, every route but the public ones needs one, checked before the body is parsed,
and the key never reaches the logs (issue 25)."""

from __future__ import annotations

import logging

import pytest

from tests.server.conftest import MODEL

KEY = "k-3f9a1c7e5b"
PUBLIC = {"/", "/health"}


def all_routes(routes, prefix: str = ""):
    """(path, method) of every route, included routers flattened (newer FastAPI nests them)."""
    for route in routes:
        if hasattr(route, "original_router"):
            yield from all_routes(route.original_router.routes, prefix + route.include_context.prefix)
        elif hasattr(route, "routes") and not hasattr(route, "methods"):  # a Mount: /static
            continue
        else:
            for method in sorted(route.methods - {"HEAD"}):
                yield prefix + route.path, method


def concrete(path: str) -> str:
    return path.replace("{model_id:path}", MODEL).replace("{response_id}", "resp_missing")


@pytest.fixture
def keys_on(server):
    server.settings.api_key = [KEY]
    yield KEY
    server.settings.api_key = []


@pytest.fixture(scope="module")
def routes(server):
    found = sorted({(concrete(p), m) for p, m in all_routes(server.app.routes) if p not in PUBLIC})
    paths = {p for p, _ in found}
    assert {"/v1/chat/completions", "/api/chat", "/v1/messages", "/metrics", "/stats", "/docs",
            "/openapi.json"} <= paths, paths
    return found


def send(http, path: str, method: str, **headers):
    body = b'{"model": "tiny", "messa'  # malformed: a 400 if the key check came after parsing
    if method in ("POST", "PUT", "PATCH"):
        return http.request(method, path, content=body, headers={"content-type": "application/json", **headers})
    return http.request(method, path, headers=headers)


def test_every_route_needs_the_key(http, keys_on, routes):
    for path, method in routes:
        refused = send(http, path, method)
        assert refused.status_code == 401, (method, path, refused.status_code, refused.text)
        assert refused.headers["www-authenticate"] == "Bearer"
        assert send(http, path, method, authorization="Bearer wrong").status_code == 401, (method, path)
        assert send(http, path, method, **{"x-api-key": "wrong"}).status_code == 401, (method, path)
        for headers in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
            served = send(http, path, method, **headers)
            assert served.status_code != 401 and served.status_code < 500, (method, path, headers, served.text)


def test_401_comes_in_each_apis_error_shape(http, keys_on):
    openai = send(http, "/v1/chat/completions", "POST").json()["error"]
    assert openai["type"] == "authentication_error" and openai["code"] == "invalid_api_key"
    assert isinstance(send(http, "/api/chat", "POST").json()["error"], str)
    anthropic = send(http, "/v1/messages", "POST").json()
    assert anthropic["type"] == "error" and anthropic["error"]["type"] == "authentication_error"


def test_unauthenticated_malformed_body_is_401_not_400(http, keys_on):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
                 "/api/chat", "/api/generate", "/api/show"):
        assert send(http, path, "POST").status_code == 401, path
        assert send(http, path, "POST", authorization=f"Bearer {KEY}").status_code == 400, path


def test_operations_and_docs_need_the_key(http, keys_on):
    for path in ("/metrics", "/stats", "/docs", "/openapi.json", "/redoc"):
        assert http.get(path).status_code == 401, path
        assert http.get(path, headers={"authorization": f"Bearer {KEY}"}).status_code == 200, path
    # The probe and the chat page stay open: the page sends the key the user types with each call.
    assert http.get("/health").status_code == 200
    assert http.get("/").status_code == 200


def test_no_key_means_open(http, routes):
    assert http.get("/metrics").status_code == 200 and http.get("/v1/models").status_code == 200


def test_the_key_never_reaches_the_logs(http, keys_on, caplog):
    wrong = "k-wrong-51d0e8"
    with caplog.at_level(logging.DEBUG, logger="selfhost"), caplog.at_level(logging.DEBUG, logger="selfhost.access"):
        for headers in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}, {"authorization": f"Bearer {wrong}"},
                        {"x-api-key": wrong}, {"authorization": KEY}):
            http.get("/v1/models", headers=headers)
            http.get("/metrics", headers=headers)
            http.post("/v1/chat/completions", headers=headers,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
            http.post("/api/chat", headers=headers, content=b"{not json")
            http.get("/v1/nowhere", headers=headers)
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert any(r.name == "selfhost.access" for r in caplog.records)  # the capture did see the server's logs
    assert KEY not in text and wrong not in text
