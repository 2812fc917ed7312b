"""Access control: API keys for inference and model information, admin keys for load and unload.

    TEXTSERVE_API_KEYS=key1,key2        or  TEXTSERVE_API_KEYS=@/etc/textserve/api-keys
    TEXTSERVE_ADMIN_KEYS=admin1         or  TEXTSERVE_ADMIN_KEYS=@/etc/textserve/admin-keys

With either set, a request needs `Authorization: Bearer KEY` (gRPC: the `authorization`
metadata, same form), else 401 with `WWW-Authenticate: Bearer`. An admin key opens every route;
an API key every route but POST /v2/repository/models/{name}/load and /unload, which answer it
403. Which route needs what is the route table's `access` (routes.py): open without a key are the
probes (the kubelet calls them), /metrics unless TEXTSERVE_PROTECT_METRICS=1 (Prometheus), and
the docs page and the OpenAPI document, which a browser fetches without headers (they name the
models only to a caller with a key). With no keys set every route is open, and the service says
so at start-up. The pipeline (pipeline.py) checks the key before anything else of a request.

Keys are compared with hmac.compare_digest against every configured key (no early exit, so the
time does not tell how much of a key matched) and are never logged. An @FILE is read again
when its modification time changes (checked at most once a second), so rotating the keys of a
mounted Kubernetes Secret needs no restart: docs/deploy.md gives the two-key rotation.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import time
from dataclasses import dataclass

from services import metrics
from services.config import ServiceSettings
from services.errors import ApiError
from services.http.routes import ADMIN, KEY, METRICS

logger = logging.getLogger("bentoml.textserve")
RELOAD_CHECK_S = 1.0
CHALLENGE = "Bearer"


class KeySource:
    """Keys as TEXTSERVE_*_KEYS gives them: comma-separated, or @FILE (commas or lines)."""

    def __init__(self, value: str, variable: str) -> None:
        self.value = value.strip()
        self.variable = variable
        self.path = self.value[1:] if self.value.startswith("@") else None
        self.signature: tuple[int, int] | None = None
        self.checked = 0.0
        self.keys: tuple[bytes, ...] = ()
        self.load()

    def load(self) -> None:
        if self.path is None:
            text = self.value
        else:
            try:
                status = os.stat(self.path)
                text = open(self.path).read()
            except OSError as error:
                raise ValueError(f"{self.variable}=@{self.path}: cannot read the key file ({error.strerror})") from None
            self.signature = (status.st_mtime_ns, status.st_size)
        keys = tuple(key.strip().encode() for key in text.replace("\n", ",").split(",") if key.strip())
        if self.value and not keys:
            raise ValueError(f"{self.variable} is set but holds no key")
        self.keys = keys

    def current(self) -> tuple[bytes, ...]:
        """The keys, the file's read again if it changed (a rotated Secret)."""
        if self.path is not None and time.monotonic() - self.checked > RELOAD_CHECK_S:
            self.checked = time.monotonic()
            try:
                status = os.stat(self.path)
                if (status.st_mtime_ns, status.st_size) != self.signature:
                    self.load()
                    logger.info("%s: read %d keys again from its file", self.variable, len(self.keys))
            except (OSError, ValueError) as error:  # a Secret being replaced: keep the keys we have
                logger.warning("%s: kept the previous keys (%s)", self.variable, error)
        return self.keys


def matches(candidate: bytes, keys: tuple[bytes, ...]) -> bool:
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key)  # every key compared, in constant time each
    return found


@dataclass
class Keys:
    api: KeySource
    admin: KeySource

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> Keys:
        return cls(KeySource(settings.api_keys, "TEXTSERVE_API_KEYS"), KeySource(settings.admin_keys, "TEXTSERVE_ADMIN_KEYS"))

    @property
    def enabled(self) -> bool:
        return bool(self.api.value or self.admin.value)

    def check(self, authorization: str | None, admin: bool) -> None:
        """Nothing if `authorization` (the header's value) carries a key good for the route,
        else ApiError 401 (no key, a malformed header, an unknown key) or 403 (an API key on an
        admin route)."""
        if not authorization:
            raise unauthorized("this route needs an API key: send the header Authorization: Bearer KEY")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthorized("the Authorization header must be 'Bearer KEY'")
        candidate = key.strip().encode()
        if matches(candidate, self.admin.current()):
            return
        if not matches(candidate, self.api.current()):
            raise unauthorized("the API key is not valid", 'error="invalid_token"')
        if admin:
            metrics.auth_refusals_total.labels(status="403").inc()
            raise ApiError(403, "this key may not load or unload models: use one of TEXTSERVE_ADMIN_KEYS"
                           + ("" if self.admin.value else " (none is configured, so load and unload are closed)"))


    def accepts(self, authorization: str | None) -> bool:
        """Whether `authorization` carries a good key (of either kind); nothing is counted."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        candidate = key.strip().encode()
        return matches(candidate, self.admin.current()) | matches(candidate, self.api.current())

    def needed(self, access: str, settings: ServiceSettings) -> str | None:
        """What a route of `access` (routes.py) needs of this server: None (nothing), KEY or ADMIN."""
        if not self.enabled or access not in (KEY, ADMIN, METRICS):
            return None
        if access == METRICS:
            return KEY if settings.protect_metrics else None
        return access


def unauthorized(message: str, detail: str = "") -> ApiError:
    metrics.auth_refusals_total.labels(status="401").inc()
    return ApiError(401, message, {"WWW-Authenticate": f"{CHALLENGE} {detail}".strip()})


@functools.cache
def process_keys(settings: ServiceSettings) -> Keys:
    """This process's keys: one reading of the key files (and of their later changes) shared by
    the start-up message, the HTTP check and the gRPC check."""
    return Keys.from_settings(settings)


def announce(settings: ServiceSettings) -> None:
    """Say at start-up whether anyone who reaches the port may call the service."""
    keys = process_keys(settings)  # also fails the start on an unreadable key file
    if not keys.enabled:
        logger.warning("no API keys are set (TEXTSERVE_API_KEYS, TEXTSERVE_ADMIN_KEYS): every route is open, "
                       "unauthenticated, to anyone who can reach this port")
    else:
        logger.info("API keys required: %d API keys, %d admin keys; /metrics %s", len(keys.api.keys), len(keys.admin.keys),
                    "needs a key" if settings.protect_metrics else "is open")
