"""Outbound endpoints (BEAVER_ENDPOINTS): what a bad value says (never a key), and how a worker gets
an endpoint's key from the file an admin gave. The routes and the jobs that use them:
tests/hostile/test_egress.py and tests/integration/test_evaluate.py."""

from __future__ import annotations

import json

import pytest

KEY = "sk-never-shown"


@pytest.mark.parametrize("value, says", [
    ("{not json", "is not valid JSON"),
    ("[]", "must be a JSON object"),
    ('{"http://evil:1": {"url": "http://x/v1", "model": "m"}}', "endpoint name"),
    ('{"g": "http://x/v1"}', "g: must be an object"),
    ('{"g": {"url": "http://x/v1", "model": "m", "api_key_env": "X"}}', "unknown field 'api_key_env'"),
    ('{"g": {"model": "m", "api_key": "%s"}}' % KEY, "g.url must be an http:// or https:// base URL"),
    ('{"g": {"url": "ftp://x/v1", "model": "m"}}', "g.url"),
    ('{"g": {"url": "http://user:%s@x/v1", "model": "m"}}' % KEY, "g.url"),
    ('{"g": {"url": "http://x/v1?k=%s", "model": "m"}}' % KEY, "g.url"),
    ('{"g": {"url": "http://x/v1"}}', "g.model"),
    ('{"g": {"url": "http://x/v1", "model": "m", "api_key": ""}}', "g.api_key"),
    ('{"g": {"url": "http://x/v1", "model": "m", "api_key_file": "key.txt"}}', "g.api_key_file must be an absolute"),
    ('{"g": {"url": "http://x/v1", "model": "m", "api_key": "%s", "api_key_file": "/k"}}' % KEY, "not both"),
])
def test_a_bad_endpoints_value_is_refused_naming_what_is_wrong_never_the_key(monkeypatch, value, says):
    from api.settings import SettingsInvalid, get_settings

    monkeypatch.setenv("BEAVER_ENDPOINTS", value)
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsInvalid) as raised:
            get_settings()
    finally:
        monkeypatch.delenv("BEAVER_ENDPOINTS")
        get_settings.cache_clear()
    message = str(raised.value)
    assert message.startswith("BEAVER_ENDPOINTS: ") and says in message, message
    assert KEY not in message and "\n" not in message


def test_a_worker_reads_an_endpoints_key_from_its_file(monkeypatch, tmp_path):
    from api.settings import get_settings
    from models.jobs import EndpointError
    from workers.attempt import resolve_endpoint

    key_file = tmp_path / "guard.key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv("BEAVER_ENDPOINTS", json.dumps({
        "guard": {"url": "https://guard.internal/v1", "model": "m", "api_key_file": str(key_file)},
        "lost": {"url": "https://guard.internal/v1", "model": "m", "api_key_file": str(tmp_path / "missing")}}))
    get_settings.cache_clear()
    try:
        endpoint = resolve_endpoint("guard")
        assert (endpoint.url, endpoint.model, endpoint.api_key) == ("https://guard.internal/v1", "m", KEY)
        assert KEY not in repr(endpoint)  # an endpoint in a log line or a traceback shows no key
        with pytest.raises(EndpointError) as raised:
            resolve_endpoint("lost")
        assert str(raised.value) == "endpoint 'lost': its api_key_file cannot be read on this worker (see the " \
                                    "worker's log)"
        with pytest.raises(ValueError, match="'nope' is not configured on this worker"):
            resolve_endpoint("nope")
    finally:
        get_settings.cache_clear()
