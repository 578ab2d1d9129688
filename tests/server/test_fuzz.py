"""schemathesis over every route of the served /openapi.json: generated requests, no 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case

from tests.server.conftest import LiveServer, start_server

EXAMPLES_PER_OPERATION = 30
# Generated bodies may ask for any max_tokens and n; a short context keeps every request a few steps.
FUZZ_SERVER_ARGS = ("--max-model-len", "128", "--kv-cache-gib", "0.25", "--max-queued-requests", "64")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("fuzz"), *FUZZ_SERVER_ARGS)
    yield live
    live.stop()
    # A 5xx may come with an engine crash: the log says why.
    log = Path(live.log).read_text()
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_no_server_errors(case: Case) -> None:
    response = case.call(timeout=120)
    assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:2000])
    if response.status_code >= 400 and "text/event-stream" not in response.headers.get("content-type", ""):
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text
