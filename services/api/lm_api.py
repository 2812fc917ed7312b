"""The language model's JSON API: POST /lm/score, /lm/next, /lm/generate (optionally streamed
as server-sent events), /lm/vectors and /lm/neighbors. Validation happens here; scoring goes
through the runner's batched score_batch, the rest through one runner call per request."""

from __future__ import annotations

import json
import math

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

import bentoml
from services.errors import ApiError
from services.api.http_api import json_body, json_bytes, off_the_loop_if_large, parse_body, parsed, requested_bundle, top_k_or_default
from services.api.schemas import (
    GenerateRequest,
    GenerateResponse,
    NeighborsRequest,
    NeighborsResponse,
    NextRequest,
    NextResponse,
    ScoreRequest,
    ScoreResponse,
    VectorsResponse,
    WordsRequest,
)

router = APIRouter(prefix="/lm", tags=["Language model"])
LANGUAGE_MODEL = "language model"
DEFAULT_NEXT_WORDS = 10
MAX_NEXT_WORDS = 100
DEFAULT_NEIGHBORS = 10
MAX_TEMPERATURE = 10.0
MAX_SEED = 2**63 - 1


def vocabulary_size(bundle) -> int:
    return bundle.config["model"]["vocab_size"]


@router.post("/score", response_model=ScoreResponse, summary="Log-probability and perplexity of texts",
             openapi_extra=json_body(ScoreRequest))
async def score(request: Request, service=Depends(bentoml.get_current_service)) -> Response:
    return Response(await score_answer(request, service, await request.body()), media_type="application/json")


async def score_answer(request, service, raw: bytes) -> bytes:
    """POST /lm/score from the body's bytes to the answer's (a ScoreResponse, built as plain
    dicts): the route above and the pipeline (services/api/hot_routes.py) both run it."""
    body = await off_the_loop_if_large(raw, parsed, ScoreRequest)
    bundle = requested_bundle(request, service, body.model, LANGUAGE_MODEL)
    results = []
    for scored in await service.scores(bundle.name, body.texts):
        log_probs = scored["log_probs"]
        total = float(sum(log_probs))
        results.append({
            "tokens": [{"token": t, "log_prob": p, "in_vocabulary": v}
                       for t, p, v in zip(scored["tokens"], log_probs, scored["in_vocabulary"])],
            "log_prob": total,
            "perplexity": float(math.exp(-total / len(log_probs))),
        })
    return json_bytes({"model": bundle.name, "results": results})


def check_prefix(service, prefix: str) -> None:
    if len(prefix) > service.settings.max_text_chars:
        raise ApiError(413, f"prefix has {len(prefix)} characters; the limit is {service.settings.max_text_chars} (TEXTSERVE_MAX_TEXT_CHARS)")


@router.post("/next", response_model=NextResponse, summary="The most probable next words after a prefix",
             openapi_extra=json_body(NextRequest))
async def next_words(request: Request, service=Depends(bentoml.get_current_service)) -> NextResponse:
    body = await parse_body(request, NextRequest)
    bundle = requested_bundle(request, service, body.model, LANGUAGE_MODEL)
    check_prefix(service, body.prefix)
    k = top_k_or_default(body.top_k, DEFAULT_NEXT_WORDS, min(MAX_NEXT_WORDS, vocabulary_size(bundle)))
    answer = await service.unbatched("next_words", cost=1, model=bundle.name, prefix=body.prefix, k=k)
    return NextResponse(model=bundle.name, prefix_tokens=answer["tokens"], next=answer["next"])


def check_generation(service, bundle, body: GenerateRequest) -> None:
    check_prefix(service, body.prefix)
    limit = service.settings.max_generate_words
    if not 1 <= body.max_words <= limit:
        raise ApiError(400, f"max_words must be between 1 and {limit} (TEXTSERVE_MAX_GENERATE_WORDS), got {body.max_words}")
    if not (math.isfinite(body.temperature) and 0 <= body.temperature <= MAX_TEMPERATURE):
        raise ApiError(400, f"temperature must be a number from 0 (greedy) to {MAX_TEMPERATURE:g}, got {body.temperature}")
    if not 0 <= body.top_k <= vocabulary_size(bundle):
        raise ApiError(400, f"top_k must be between 0 (the whole vocabulary) and {vocabulary_size(bundle)}, got {body.top_k}")
    if not 0 <= body.seed <= MAX_SEED:
        raise ApiError(400, f"seed must be between 0 and {MAX_SEED}, got {body.seed}")


@router.post("/generate", response_model=GenerateResponse,
             summary="Continue a text; `stream: true` (or Accept: text/event-stream) sends each word as it comes",
             responses={200: {"content": {"text/event-stream": {"schema": {
                 "type": "object", "description": "server-sent events, each data a JSON object: start (the prefix's tokens), "
                                                   "one word per word (word, probability), then done (or error)"}}}}},
             openapi_extra=json_body(GenerateRequest))
async def generate(request: Request, service=Depends(bentoml.get_current_service)):
    body = await parse_body(request, GenerateRequest)
    bundle = requested_bundle(request, service, body.model, LANGUAGE_MODEL)
    check_generation(service, bundle, body)
    start, words = await service.generation(cost=body.max_words, model=bundle.name, prefix=body.prefix, max_words=body.max_words,
                                            temperature=float(body.temperature), top_k=body.top_k, seed=body.seed,
                                            stop_at_eos=body.stop_at_eos)
    if body.stream or "text/event-stream" in request.headers.get("accept", ""):
        # words.close as a background task too: a client that leaves before the stream starts
        # never runs server_sent_events' own finally
        return StreamingResponse(server_sent_events(bundle.name, start["prefix_tokens"], words),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(words.close))
    generated = [word async for word in words]
    return GenerateResponse(model=bundle.name, prefix_tokens=start["prefix_tokens"], words=generated,
                            text=" ".join(word["word"] for word in generated))


async def json_lines(chunks):
    """The runner's stream arrives in chunks that need not end at line ends; yield whole lines.
    Closed early (a client that left), it closes the runner's stream too."""
    pending = ""
    try:
        async for chunk in chunks:
            pending += chunk
            *whole, pending = pending.split("\n")
            for line in whole:
                if line:
                    yield json.loads(line)
    finally:
        if hasattr(chunks, "aclose"):
            await chunks.aclose()
    if pending:
        yield json.loads(pending)


async def server_sent_events(model: str, prefix_tokens: list[str], words):
    """event: start (the prefix's tokens), one event: word per word, then event: done with the
    whole answer; a failure mid-stream ends with event: error rather than a cut connection."""
    try:
        yield f"event: start\ndata: {json.dumps({'model': model, 'prefix_tokens': prefix_tokens})}\n\n"
        generated = []
        try:
            async for word in words:
                generated.append(word)
                yield f"event: word\ndata: {json.dumps(word)}\n\n"
        except Exception as error:  # noqa: BLE001 - the 200 status line is sent; the client learns of it here
            yield f"event: error\ndata: {json.dumps({'error': f'generation failed after {len(generated)} words: {error}'})}\n\n"
            return
    finally:
        words.close()  # the client left mid-stream: give back what the request held
    done = {"model": model, "prefix_tokens": prefix_tokens, "words": generated, "text": " ".join(w["word"] for w in generated)}
    yield f"event: done\ndata: {json.dumps(done)}\n\n"


def checked_words(service, words: list[str]) -> list[str]:
    """Words as the model reads them (lower case, like Penn Treebank), each non-empty and bounded."""
    service.check_texts(words, field="words", max_chars_setting="max_word_chars")
    return [word.strip().lower() for word in words]


@router.post("/vectors", response_model=VectorsResponse, summary="A vector for any word, built from its characters",
             openapi_extra=json_body(WordsRequest))
async def vectors(request: Request, service=Depends(bentoml.get_current_service)) -> VectorsResponse:
    body = await parse_body(request, WordsRequest)
    bundle = requested_bundle(request, service, body.model, LANGUAGE_MODEL)
    words = checked_words(service, body.words)
    results = await service.unbatched("word_vectors", cost=len(words), model=bundle.name, words=words, layer=body.layer)
    return VectorsResponse(model=bundle.name, layer=body.layer, results=results)


@router.post("/neighbors", response_model=NeighborsResponse,
             summary="Nearest in-vocabulary words (cosine) of any word, as in Table 6 of Kim et al. 2016",
             openapi_extra=json_body(NeighborsRequest))
async def neighbors(request: Request, service=Depends(bentoml.get_current_service)) -> NeighborsResponse:
    body = await parse_body(request, NeighborsRequest)
    bundle = requested_bundle(request, service, body.model, LANGUAGE_MODEL)
    words = checked_words(service, body.words)
    k = top_k_or_default(body.top_k, DEFAULT_NEIGHBORS, min(service.settings.max_neighbors, vocabulary_size(bundle) - 2))
    results = await service.unbatched("neighbors", cost=len(words), model=bundle.name, words=words, k=k, layer=body.layer)
    return NeighborsResponse(model=bundle.name, layer=body.layer, results=results)


