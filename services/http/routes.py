"""Every HTTP route of the service, in one table: its name, who may call it, what it costs and
who answers it. The pipeline (pipeline.py) reads nothing else to decide a request's keys,
admission, body, timeout and metrics label; gRPC reads the same access classes (GRPC_ACCESS).

    name         the route's template, e.g. /v2/models/{name}/infer: the metrics' `endpoint`
                 label (never a raw path: unmatched paths share UNMATCHED)
    access       OPEN (probes, pages), KEY (an API or admin key once keys are set), ADMIN
                 (only an admin key), METRICS (open unless TEXTSERVE_PROTECT_METRICS=1)
    admits       an inference call: a full worker refuses it (429) before its body is read
    handler      FRONT: answered by the pipeline through the route's own function (the hot
                 routes: no FastAPI routing, request objects or dependency solving);
                 APP: the FastAPI app (services/api/); PAGE: the docs page, the playground, the
                 BentoML client schema; BENTOML: BentoML's own handler (probes, /metrics)
    timeout      REQUEST (TEXTSERVE_REQUEST_TIMEOUT_S) or MODEL_CHANGE (load and unload wait
                 for every process: TEXTSERVE_MODEL_LOAD_TIMEOUT_S for a prepare and a commit)

Every operation of the OpenAPI document (FastAPI's, from its routes) must be here and every
APP or FRONT route must be documented: `check_against_document` runs at every worker's start-up,
so what is served and what is documented cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OPEN, KEY, ADMIN, METRICS = "open", "key", "admin", "metrics"
FRONT, APP, PAGE, BENTOML = "front", "app", "page", "bentoml"
REQUEST, MODEL_CHANGE = "request", "model_change"
UNMATCHED = "unmatched"
NO_EXAMPLE = "x-textserve-no-example"  # an OpenAPI extension: a route the docs page offers no example of
PARAMETER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Route:
    name: str
    methods: tuple[str, ...]
    access: str = KEY
    handler: str = APP
    admits: bool = False
    timeout: str = REQUEST
    paths: tuple[str, ...] = ()  # the templates it answers, when more than its name (a versioned form)
    summary: str = ""  # what the OpenAPI document says of a route FastAPI does not document (PAGE, BENTOML)

    @property
    def templates(self) -> tuple[str, ...]:
        return self.paths or (self.name,)


V2_MODEL = "/v2/models/{name}"
VERSIONED = "/v2/models/{name}/versions/{version}"
ROUTES: tuple[Route, ...] = (
    # pages and documents: a browser fetches them without headers
    Route("/", ("GET", "HEAD"), OPEN, PAGE, summary="The docs page: every route, with a real example to send"),
    Route("/docs", ("GET", "HEAD"), OPEN, PAGE, summary="The docs page (as /)"),
    Route("/playground", ("GET", "HEAD"), OPEN, PAGE, summary="Try the models in a browser"),
    Route("/schema.json", ("GET",), OPEN, PAGE, summary="The JSON API as BentoML's clients read it"),
    Route("/openapi.json", ("GET",), OPEN, PAGE, summary="This document (model names and examples only with a key)"),
    # probes (the kubelet calls them) and metrics (Prometheus)
    Route("/livez", ("GET",), OPEN, BENTOML, summary="200 while the process runs (BentoML's probe)"),
    Route("/healthz", ("GET",), OPEN, BENTOML, summary="200 while the process runs (BentoML's probe)"),
    Route("/readyz", ("GET",), OPEN, BENTOML, summary="200 once the service is built (BentoML's probe)"),
    Route("/metrics", ("GET",), METRICS, BENTOML,
          summary="Prometheus metrics of every process (a key with TEXTSERVE_PROTECT_METRICS=1)"),
    Route("/v2/health/live", ("GET",), OPEN),
    Route("/v2/health/ready", ("GET",), OPEN),
    # the JSON API
    Route("/classify", ("POST",), KEY, FRONT, admits=True),
    Route("/explain", ("POST",), admits=True),
    Route("/models", ("GET",)),
    Route("/classify-image", ("POST",), admits=True),
    Route("/lm/score", ("POST",), KEY, FRONT, admits=True),
    Route("/lm/next", ("POST",), admits=True),
    Route("/lm/generate", ("POST",), admits=True),
    Route("/lm/vectors", ("POST",), admits=True),
    Route("/lm/neighbors", ("POST",), admits=True),
    # the Open Inference Protocol v2 and the model repository
    Route("/v2", ("GET",)),
    Route(V2_MODEL, ("GET",), paths=(V2_MODEL, VERSIONED)),
    Route(f"{V2_MODEL}/ready", ("GET",), paths=(f"{V2_MODEL}/ready", f"{VERSIONED}/ready")),
    Route(f"{V2_MODEL}/config", ("GET",), paths=(f"{V2_MODEL}/config", f"{VERSIONED}/config")),
    Route("/v2/models/stats", ("GET",), paths=("/v2/models/stats", f"{V2_MODEL}/stats", f"{VERSIONED}/stats")),
    Route(f"{V2_MODEL}/infer", ("POST",), KEY, FRONT, admits=True, paths=(f"{V2_MODEL}/infer", f"{VERSIONED}/infer")),
    Route("/v2/repository/index", ("POST",)),
    Route("/v2/repository/models/{name}/load", ("POST",), ADMIN, timeout=MODEL_CHANGE),
    Route("/v2/repository/models/{name}/unload", ("POST",), ADMIN, timeout=MODEL_CHANGE),
)

# gRPC's calls by the same access classes (services/api/grpc_inference.py).
GRPC_ACCESS = {"ServerLive": OPEN, "ServerReady": OPEN, "RepositoryModelLoad": ADMIN, "RepositoryModelUnload": ADMIN}


def pattern_of(template: str) -> re.Pattern:
    """/v2/models/{name}/infer -> a pattern whose groups are the parameters (one path segment each)."""
    parts = PARAMETER.split(template)
    regex = "".join(re.escape(part) if index % 2 == 0 else f"(?P<{part}>[^/]+)" for index, part in enumerate(parts))
    return re.compile(regex)


@dataclass(frozen=True)
class Match:
    route: Route | None  # None: no route has this path
    parameters: dict[str, str]
    allowed: tuple[str, ...] = ()  # the path's methods, when the route is None for want of the method


class RouteTable:
    """Path and method -> the route and its parameters. Literal paths by one dict lookup; the
    templated ones (a handful) by their patterns."""

    def __init__(self, routes: tuple[Route, ...] = ROUTES) -> None:
        self.routes = routes
        self.literal: dict[str, Route] = {}
        self.templated: list[tuple[re.Pattern, Route]] = []
        for route in routes:
            for template in route.templates:
                if PARAMETER.search(template):
                    self.templated.append((pattern_of(template), route))
                else:
                    self.literal[template] = route

    def match(self, method: str, path: str) -> Match:
        route, parameters = self.literal.get(path), {}
        if route is None:
            for pattern, candidate in self.templated:
                found = pattern.fullmatch(path)
                if found:
                    route, parameters = candidate, found.groupdict()
                    break
        if route is None:
            return Match(None, {})
        if method not in route.methods:
            return Match(None, {}, route.methods)
        return Match(route, parameters)


def document_the_others(document: dict, routes: tuple[Route, ...] = ROUTES) -> None:
    """Add to FastAPI's OpenAPI document the routes it does not know (the pages, the probes,
    /metrics), from the table, so that the document lists every route."""
    for route in routes:
        if route.handler in (PAGE, BENTOML):
            for method in route.methods:
                if method != "HEAD":
                    document.setdefault("paths", {}).setdefault(route.name, {})[method.lower()] = {
                        "summary": route.summary, "responses": {"200": {"description": route.summary}},
                        NO_EXAMPLE: True}  # the docs page shows no "Send" for these


TABLE = RouteTable()  # the one table every user shares (the pipeline, the OpenAPI document's error statuses)


def check_against_document(document: dict, routes: tuple[Route, ...] = ROUTES) -> None:
    """Raise RuntimeError naming every operation of the OpenAPI document missing from the table,
    and every route of the table the document lacks: what is served and what is documented are
    the same set."""
    served = {(path, method) for route in routes for path in route.templates for method in route.methods if method != "HEAD"}
    documented = {(path, method.upper()) for path, operations in document.get("paths", {}).items() for method in operations}
    missing = sorted(documented - served)
    absent = sorted(served - documented)
    if missing or absent:
        raise RuntimeError(f"the route table (services/http/routes.py) and the OpenAPI document disagree: "
                           f"not in the table {missing}; not documented {absent}")
