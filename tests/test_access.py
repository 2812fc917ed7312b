"""API keys (services/http/access.py) without a server: which routes need a key, what each
refusal says, and a key file read again when it changes (rotation of a mounted Secret)."""

from __future__ import annotations

import os
import time

import pytest

from services.config import ServiceSettings
from services.http import access
from services.http.access import Keys, KeySource
from services.http.routes import ADMIN, KEY, RouteTable
from services.errors import ApiError


def keys(api: str = "", admin: str = "") -> Keys:
    return Keys(KeySource(api, "TEXTSERVE_API_KEYS"), KeySource(admin, "TEXTSERVE_ADMIN_KEYS"))


def refusal(keyring: Keys, header: str | None, admin: bool = False) -> ApiError:
    with pytest.raises(ApiError) as refused:
        keyring.check(header, admin)
    return refused.value


def test_api_keys_open_inference_and_only_admin_keys_open_load_and_unload():
    keyring = keys("k1, k2", "boss")
    for header in ("Bearer k1", "bearer k2", "Bearer  k2 ", "Bearer boss"):
        keyring.check(header, admin=False)
    keyring.check("Bearer boss", admin=True)
    error = refusal(keyring, "Bearer k1", admin=True)
    assert error.status == 403 and "TEXTSERVE_ADMIN_KEYS" in error.message


@pytest.mark.parametrize(("header", "says", "challenge"), [
    (None, "needs an API key", "Bearer"),
    ("", "needs an API key", "Bearer"),
    ("k1", "must be 'Bearer KEY'", "Bearer"),
    ("Basic azE6", "must be 'Bearer KEY'", "Bearer"),
    ("Bearer ", "must be 'Bearer KEY'", "Bearer"),
    ("Bearer k", "not valid", 'Bearer error="invalid_token"'),  # a prefix of a key is no key
    ("Bearer k1k1", "not valid", 'Bearer error="invalid_token"'),
])
def test_a_missing_malformed_or_unknown_key_is_401_with_a_challenge(header, says, challenge):
    error = refusal(keys("k1"), header)
    assert error.status == 401 and says in error.message
    assert error.headers == {"WWW-Authenticate": challenge}
    assert "k1" not in error.message  # a key is never echoed


def test_with_api_keys_but_no_admin_key_load_and_unload_are_closed():
    error = refusal(keys("k1"), "Bearer k1", admin=True)
    assert error.status == 403 and "none is configured" in error.message


def needed(method: str, path: str, settings: ServiceSettings, keyring: Keys) -> str | None:
    """What the route table and the keys ask of a request to `path` (an unknown path: a key)."""
    route = RouteTable().match(method, path).route
    return keyring.needed(route.access if route is not None else KEY, settings)


def test_probes_metrics_and_docs_are_open_everything_else_needs_a_key():
    settings, keyring = ServiceSettings(), keys("k1", "boss")
    for path in ("/v2/health/live", "/v2/health/ready", "/livez", "/readyz", "/metrics", "/", "/openapi.json", "/playground"):
        assert needed("GET", path, settings, keyring) is None, path
    for method, path in (("POST", "/classify"), ("GET", "/models"), ("GET", "/v2"), ("GET", "/v2/models/kim-cnn-trec6"),
                         ("GET", "/v2/models/kim-cnn-trec6/ready"), ("POST", "/v2/repository/index"), ("POST", "/lm/score"),
                         ("GET", "/static_assets/x"), ("GET", "/docs.json"), ("POST", "/no/such/route")):
        assert needed(method, path, settings, keyring) == KEY, path
    assert needed("GET", "/metrics", ServiceSettings(protect_metrics=True), keyring) == KEY
    assert needed("POST", "/v2/repository/models/kim-cnn-trec6/load", settings, keyring) == ADMIN
    assert needed("POST", "/v2/repository/models/kim-cnn-trec6/unload", settings, keyring) == ADMIN
    assert needed("POST", "/v2/repository/models/kim-cnn-trec6/load", settings, keys()) is None  # no keys: all open


def test_a_key_file_is_read_again_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(access, "RELOAD_CHECK_S", 0.0)
    key_file = tmp_path / "api-keys"
    key_file.write_text("old-key\n")
    keyring = Keys(KeySource(f"@{key_file}", "TEXTSERVE_API_KEYS"), KeySource("", "TEXTSERVE_ADMIN_KEYS"))
    keyring.check("Bearer old-key", admin=False)
    key_file.write_text("old-key\nnew-key\n")  # step 1 of a rotation: both valid
    os.utime(key_file, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    keyring.check("Bearer new-key", admin=False)
    keyring.check("Bearer old-key", admin=False)
    key_file.write_text("new-key\n")  # step 3: the old one goes
    os.utime(key_file, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    assert refusal(keyring, "Bearer old-key").status == 401
    keyring.check("Bearer new-key", admin=False)
    key_file.unlink()  # a Secret being replaced: the keys read last stay
    keyring.check("Bearer new-key", admin=False)


def test_an_unreadable_or_empty_key_setting_stops_the_start_with_a_message(tmp_path):
    with pytest.raises(ValueError, match="cannot read the key file"):
        KeySource(f"@{tmp_path / 'missing'}", "TEXTSERVE_API_KEYS")
    (tmp_path / "empty").write_text("\n , \n")
    with pytest.raises(ValueError, match="holds no key"):
        KeySource(f"@{tmp_path / 'empty'}", "TEXTSERVE_API_KEYS")
    assert not keys().enabled and keys("a").enabled and keys("", "b").enabled
