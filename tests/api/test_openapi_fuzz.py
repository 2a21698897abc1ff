"""Schemathesis over Beaver's own OpenAPI: generated requests — valid and invalid, with an admin key —
to every operation of the real app under a real uvicorn server (a real SQLite database, and a real
PostgreSQL schema, with the embedded broker), asserting no 5xx and no status code the OpenAPI does not declare. Examples are
bounded so the whole run stays within a couple of minutes."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from api.app import create_app
from tests.api.conftest import auth


@pytest.fixture(autouse=True)
def on_both_databases(database):
    """Every test here runs on SQLite and on PostgreSQL (autouse: before the keys are made)."""

MAX_EXAMPLES = 15  # per operation and database

schema = schemathesis.openapi.from_dict(create_app().openapi())


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_status_documented(case, live_server, keys):
    case.call_and_validate(base_url=f"http://127.0.0.1:{live_server}", headers=auth(keys["admin"]),
                           checks=[not_a_server_error, status_code_conformance])
