"""The FRONT routes of the route table (services/http/routes.py): answered by the pipeline
through these functions, with no FastAPI routing, request object or dependency solving on the
way (a third of a one-text /classify's CPU in a profile, docs/performance-history.md).

Each takes the pipeline's exchange (its `.headers` and `.state`), the service, the decoded body
and the path's parameters, and returns (body, content type, extra headers). The answer itself is
the same function the documented FastAPI route calls (`classify_answer`, `score_answer`,
`infer_answer`), so the OpenAPI document describes exactly what is answered.
"""

from __future__ import annotations

from services.api.http_api import classify_answer
from services.api.lm_api import score_answer
from services.api.open_inference import infer_answer

JSON = b"application/json"


async def classify(exchange, service, body: bytes, parameters: dict[str, str]):
    return await classify_answer(exchange, service, body), JSON, []


async def score(exchange, service, body: bytes, parameters: dict[str, str]):
    return await score_answer(exchange, service, body), JSON, []


async def infer(exchange, service, body: bytes, parameters: dict[str, str]):
    header_length = exchange.headers.get(b"inference-header-content-length")
    answer, headers = await infer_answer(exchange, service, body, parameters["name"], parameters.get("version"),
                                         header_length.decode("latin-1") if header_length is not None else None)
    content_type = headers.pop("content-type").encode()
    return answer, content_type, [(name.encode(), value.encode()) for name, value in headers.items()]


ANSWERS = {"/classify": classify, "/lm/score": score, "/v2/models/{name}/infer": infer}
