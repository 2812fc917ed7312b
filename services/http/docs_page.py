"""The service's own pages, in place of BentoML's template (which fetches badges and a tag
manager from the internet and lists no route of this service): `/` (and `/docs`) documents
every route of the OpenAPI document with a real example that runs from the page, and
`/playground` lets a person try the models (pages/*.html). Everything is in the one HTML
answer: no script, style or image is fetched from anywhere, so the pages work offline.
`/schema.json` lists the JSON API as BentoML's own clients read it.

The examples live here once: `add_examples` writes them into the OpenAPI document (what
clients and fuzzers read), and the page shows that document."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from pathlib import Path

from services.http.routes import NO_EXAMPLE

PAGES = Path(__file__).parent / "pages"
HTML = b"text/html; charset=utf-8"
# A page may run its own inline script and style and call this server, nothing else.
CONTENT_SECURITY_POLICY = (b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'")
PREFERRED = {"classifier": "kim-cnn-trec6", "language model": "char-lm-small-ptb", "image classifier": "digits-cnn"}
QUESTION = "How far is it from Denver to Aspen ?"
PREFIX = "the company said"
SEVEN = [[0, 0, 0, 0, 0, 0, 0, 0], [0, 2, 12, 16, 16, 16, 13, 0], [0, 0, 0, 0, 2, 15, 7, 0], [0, 0, 0, 0, 10, 12, 0, 0],
         [0, 0, 0, 4, 16, 3, 0, 0], [0, 0, 0, 12, 10, 0, 0, 0], [0, 0, 3, 16, 3, 0, 0, 0], [0, 0, 6, 12, 0, 0, 0, 0]]
SECTIONS = (("JSON API", ("/classify", "/explain", "/models", "/classify-image")),
            ("Language model", ("/lm/",)),
            ("Open Inference Protocol v2 (KServe, Triton's clients)", ("/v2/models", "/v2/health", "/v2")),
            ("Model repository (Triton's extension)", ("/v2/repository",)))


def service_version() -> str:
    from services import __version__

    return __version__


def pick(names_by_kind: dict[str, list[str]], kind: str) -> str | None:
    names = names_by_kind.get(kind, [])
    return PREFERRED[kind] if PREFERRED[kind] in names else (names[0] if names else None)


def examples(names_by_kind: dict[str, list[str]], versions: dict[str, str] | None = None) -> dict[tuple[str, str], dict]:
    """(method, OpenAPI path) -> {"path": the path to call, "body": the JSON body or None}, for
    the models this server has loaded (a route whose kind of model is not loaded has none)."""
    text, lm, image = (pick(names_by_kind, kind) for kind in ("classifier", "language model", "image classifier"))
    found: dict[tuple[str, str], dict] = {("get", "/models"): {"path": "/models", "body": None},
                                          ("get", "/v2"): {"path": "/v2", "body": None},
                                          ("get", "/v2/health/ready"): {"path": "/v2/health/ready", "body": None},
                                          ("get", "/v2/health/live"): {"path": "/v2/health/live", "body": None},
                                          ("get", "/v2/models/stats"): {"path": "/v2/models/stats", "body": None},
                                          ("post", "/v2/repository/index"): {"path": "/v2/repository/index", "body": {}}}
    if text:
        found[("post", "/classify")] = {"path": "/classify", "body": {"model": text, "texts": [QUESTION, "Who wrote Hamlet ?"]}}
        infer = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": [QUESTION, "Who wrote Hamlet ?"]}]}
        found[("post", "/v2/models/{name}/infer")] = {"path": f"/v2/models/{text}/infer", "body": infer}
        found[("get", "/v2/models/{name}")] = {"path": f"/v2/models/{text}", "body": None}
        found[("get", "/v2/models/{name}/ready")] = {"path": f"/v2/models/{text}/ready", "body": None}
        found[("get", "/v2/models/{name}/config")] = {"path": f"/v2/models/{text}/config", "body": None}
        found[("get", "/v2/models/{name}/stats")] = {"path": f"/v2/models/{text}/stats", "body": None}
        found[("post", "/v2/repository/models/{name}/load")] = {"path": f"/v2/repository/models/{text}/load", "body": {}}
        found[("post", "/v2/repository/models/{name}/unload")] = {"path": f"/v2/repository/models/{text}/unload", "body": {}}
        version = (versions or {}).get(text)
        if version:  # the same routes for the version loaded (GET /v2/models/{name} lists it)
            versioned = f"/v2/models/{text}/versions/{version}"
            found[("get", "/v2/models/{name}/versions/{version}")] = {"path": versioned, "body": None}
            found[("get", "/v2/models/{name}/versions/{version}/ready")] = {"path": f"{versioned}/ready", "body": None}
            found[("get", "/v2/models/{name}/versions/{version}/config")] = {"path": f"{versioned}/config", "body": None}
            found[("get", "/v2/models/{name}/versions/{version}/stats")] = {"path": f"{versioned}/stats", "body": None}
            found[("post", "/v2/models/{name}/versions/{version}/infer")] = {"path": f"{versioned}/infer", "body": infer}
    explainable = PREFERRED["classifier"] if PREFERRED["classifier"] in names_by_kind.get("classifier", []) else None
    if explainable:
        found[("post", "/explain")] = {"path": "/explain", "body": {"model": explainable, "texts": [QUESTION], "top_k": 3}}
    if lm:
        found[("post", "/lm/score")] = {"path": "/lm/score", "body": {"model": lm, "texts": ["the company said it expects higher profits"]}}
        found[("post", "/lm/next")] = {"path": "/lm/next", "body": {"model": lm, "prefix": PREFIX, "top_k": 5}}
        found[("post", "/lm/generate")] = {"path": "/lm/generate", "body": {"model": lm, "prefix": PREFIX, "max_words": 12, "seed": 1}}
        found[("post", "/lm/vectors")] = {"path": "/lm/vectors", "body": {"model": lm, "words": ["looooook"]}}
        found[("post", "/lm/neighbors")] = {"path": "/lm/neighbors", "body": {"model": lm, "words": ["looooook"], "top_k": 4}}
    if image:
        found[("post", "/classify-image")] = {"path": "/classify-image", "body": {"model": image, "images": [SEVEN]}}
    return found


def add_examples(document: dict, names_by_kind: dict[str, list[str]], versions: dict[str, str] | None = None) -> None:
    """Write the examples into the OpenAPI document: each request body's, and the model name
    (and version) as each path's `name` (and `version`) parameter example."""
    for (method, path), example in examples(names_by_kind, versions).items():
        operation = document.get("paths", {}).get(path, {}).get(method)
        if operation is None:
            continue
        if example["body"] is not None and "requestBody" in operation:
            operation["requestBody"].setdefault("content", {}).setdefault("application/json", {})["example"] = example["body"]
        parts = example["path"].split("/")
        values = {"name": parts[3] if "{name}" in path else None,
                  "version": parts[5] if "{version}" in path else None}
        for parameter in operation.get("parameters", []):
            if values.get(parameter.get("name")) and parameter.get("in") == "path":
                parameter["example"] = values[parameter["name"]]


def section_of(path: str) -> str:
    for title, prefixes in SECTIONS:
        if any(path == prefix or path.startswith(prefix) for prefix in prefixes):
            return title
    return "Other"


def fields_of(operation: dict, document: dict) -> list[tuple[str, str, bool, str]]:
    """(name, type, required, description) of a JSON request body's top-level fields."""
    schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    required = set(schema.get("required", []))
    rows = []
    for name, field in schema.get("properties", {}).items():
        kinds = [option.get("type", "") for option in field.get("anyOf", [field])]
        kind = " or ".join(k for k in kinds if k and k != "null") or "object"
        if field.get("type") == "array":
            kind = f"array of {field.get('items', {}).get('type', 'values')}"
        rows.append((name, kind, name in required, field.get("description", "")))
    return rows


def render(document: dict, names_by_kind: dict[str, list[str]], page: str = "docs", explainable: list[str] = (),
           versions: dict[str, str] | None = None) -> str:
    """The docs page: the service, its models, and every route with its fields and example."""
    info = document.get("info", {})
    found = examples(names_by_kind, versions)
    sections: dict[str, list[str]] = {title: [] for title, _ in SECTIONS}
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            example = found.get((method, path))
            rows = "".join(f"<tr><td><code>{html.escape(name)}</code></td><td>{html.escape(kind)}</td>"
                           f"<td>{'yes' if required else ''}</td><td>{html.escape(description)}</td></tr>"
                           for name, kind, required, description in fields_of(operation, document))
            table = f"<table class=fields><tr><th>field</th><th>type</th><th>required</th><th></th></tr>{rows}</table>" if rows else ""
            statuses = ", ".join(code for code in operation.get("responses", {}) if code != "200")
            identity = re.sub(r"[^a-z0-9]+", "-", f"{method} {path}".lower()).strip("-")  # post-v2-models-name-infer
            if example:
                body = "" if example["body"] is None else json.dumps(example["body"], ensure_ascii=False)
                shown = "" if example["body"] is None else json.dumps(example["body"], indent=1, ensure_ascii=False)
                curl = f"curl -s localhost:3000{example['path']}" + (
                    f" -d '{body}'" if method == "post" else "") + (" -X POST" if method == "post" and example["body"] == {} else "")
                trial = (f"<div class=example data-method={method.upper()} data-path='{html.escape(example['path'])}'>"
                         f"<textarea spellcheck=false rows={min(14, shown.count(chr(10)) + 1)}>{html.escape(shown)}</textarea>"
                         f"<pre class=curl>{html.escape(curl)}</pre><button type=button>Send</button>"
                         f"<pre class=response aria-live=polite></pre></div>")
            else:
                trial = "" if operation.get(NO_EXAMPLE) else "<p class=none>No example here: no model of its kind is loaded.</p>"
            sections.setdefault(section_of(path), []).append(
                f"<section class=route id='{identity}'><h3><span class='method {method}'>{method.upper()}</span> "
                f"<code>{html.escape(path)}</code></h3><p>{html.escape(operation.get('summary', ''))}</p>"
                f"{'<p>' + html.escape(operation['description']) + '</p>' if operation.get('description') else ''}"
                f"{table}<p class=statuses>Errors: {html.escape(statuses) or 'none'}; each is <code>{{\"error\": \"...\"}}</code>.</p>"
                f"{trial}</section>")
    models = "".join(f"<li><code>{html.escape(name)}</code> <span class=kind>{html.escape(kind)}</span></li>"
                     for kind, names in sorted(names_by_kind.items()) for name in names)
    body = "".join(f"<h2>{html.escape(title)}</h2>{''.join(entries)}" for title, entries in sections.items() if entries)
    template = (PAGES / f"{page}.html").read_text()
    return (template.replace("{{title}}", html.escape(info.get("title", "textserve")))
            .replace("{{version}}", html.escape(service_version()))
            .replace("{{description}}", html.escape(info.get("description", "")))
            .replace("{{models}}", models or "<li>none loaded</li>")
            .replace("{{routes}}", body)
            .replace("{{models_json}}", json.dumps({"kinds": names_by_kind, "explainable": list(explainable)}).replace("</", "<\\/")))


def resolved(schema: dict, document: dict, depth: int = 0) -> dict:
    """`schema` with every $ref replaced by the component it names (BentoML's client reads
    `properties` and `required` of the top level)."""
    if depth > 20:
        return {}
    if "$ref" in schema:
        return resolved(document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]], document, depth + 1)
    return {key: ([resolved(v, document, depth + 1) if isinstance(v, dict) else v for v in value] if isinstance(value, list)
                  else resolved(value, document, depth + 1) if isinstance(value, dict) else value)
            for key, value in schema.items()}


def bentoml_schema(document: dict) -> dict:
    """/schema.json as BentoML's clients read it (bentoml.SyncHTTPClient and AsyncHTTPClient
    fetch it to make one method per route): every POST route of the JSON API that takes a JSON
    object and no path parameter, named by its path (/classify -> classify, /lm/score ->
    lm_score). BentoML's own document lists only @bentoml.api methods, and this service's
    routes are FastAPI's."""
    routes = []
    for path, operations in document.get("paths", {}).items():
        operation = operations.get("post")
        schema = (operation or {}).get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        if schema is None or "{" in path:
            continue
        body = resolved(schema, document)
        if body.get("type") != "object" or "properties" not in body:
            continue
        output = operation.get("responses", {}).get("200", {}).get("content", {}).get("application/json", {}).get("schema", {})
        routes.append({"name": path.strip("/").replace("/", "_").replace("-", "_"), "route": path,
                       "doc": operation.get("summary", ""), "input": body,
                       "output": {**resolved(output, document), "media_type": "application/json"} if output else
                                 {"type": "object", "media_type": "application/json"}})
    info = document.get("info", {})
    return {"name": info.get("title", "textserve"), "type": "service", "description": info.get("description", ""),
            "routes": routes}


class Pages:
    """ASGI middleware: GET (or HEAD) /, /docs and /playground answered with the pages, and
    /schema.json with bentoml_schema; every other request passes to `app`. `page_of(name)`
    renders one once the models are known (None before: BentoML's answers)."""

    ROUTES = {"/": "docs", "/docs": "docs", "/playground": "playground", "/schema.json": "schema"}

    def __init__(self, app, page_of: Callable[[str], str | None]) -> None:
        self.app = app
        self.page_of = page_of

    async def __call__(self, scope, receive, send) -> None:
        page = self.ROUTES.get(scope.get("path")) if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") else None
        content = self.page_of(page) if page else None
        if content is None:
            return await self.app(scope, receive, send)
        body = content.encode()
        kind = [(b"content-type", b"application/json")] if page == "schema" else [
            (b"content-type", HTML), (b"content-security-policy", CONTENT_SECURITY_POLICY)]
        await send({"type": "http.response.start", "status": 200, "headers": [
            *kind, (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-cache")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
