"""POST /classify-image: image classifiers (models/image_cnn.py) over HTTP.

Two ways to send images, one answer per image in order (label, probabilities, top_k, as
/classify gives per text):
- JSON `{"model": "digits-cnn", "images": [...], "top_k"?}`, each image either a base64 string of
  PNG/JPEG/... bytes, or a nested array of ink amounts from 0 (paper) to 16 (full ink), as
  scikit-learn's digits are (8x8, or any size from 4x4 to 256x256: it is resized);
- multipart/form-data with a `model` field and one or more `images` files (`curl -F`).
Pictures are decoded, cropped to their ink and averaged down to 8x8 by the same torch-free
preprocessing the training used (models/image_encoding.py), in a worker thread.
OIP v2 takes the encoded tensor itself: open_inference.py.
"""

from __future__ import annotations

import base64
import binascii

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

import bentoml
from models.image_encoding import INK_SCALE, ImageError, ImageTooLarge, grid_from_picture
from services.errors import ApiError
from services.api.http_api import json_response, parse_body, requested_bundle, top_k_or_default, top_k_results
from services.api.schemas import ClassifyResponse

router = APIRouter()
IMAGE_CLASSIFIER = "image classifier"
MIN_SIDE, MAX_SIDE = 4, 256  # nested arrays


class ClassifyImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(description="an image classifier bundle, e.g. digits-cnn (see GET /models)")
    images: list[StrictStr | list[list[float]]] = Field(
        description="each a base64 string of PNG/JPEG bytes, or rows of ink amounts 0..16 (8x8 like scikit-learn's digits, or 4x4 to 256x256)")
    top_k: StrictInt | None = Field(default=None, description="how many top labels to list (default 3)")


def grid_from_json(index: int, image, max_pixels: int) -> np.ndarray:
    """One JSON image -> an ink grid in [0, 16]; a 4xx that names the image otherwise."""
    if isinstance(image, str):
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"images[{index}] is a string but not base64 (send PNG/JPEG bytes as base64, or an array of ink amounts)") from None
        return grid_from_bytes(index, data, max_pixels)
    rows = {len(row) for row in image}
    if len(rows) != 1:
        raise ApiError(400, f"images[{index}]: rows have different lengths {sorted(rows)}; send a rectangle of ink amounts")
    grid = np.asarray(image, dtype=np.float32)
    if not (MIN_SIDE <= grid.shape[0] <= MAX_SIDE and MIN_SIDE <= grid.shape[1] <= MAX_SIDE):
        raise ApiError(400, f"images[{index}] is {grid.shape[0]}x{grid.shape[1]}; an array must be {MIN_SIDE}x{MIN_SIDE} to {MAX_SIDE}x{MAX_SIDE}")
    if not np.isfinite(grid).all() or grid.min() < 0 or grid.max() > INK_SCALE:
        raise ApiError(400, f"images[{index}]: ink amounts must be finite numbers from 0 to {INK_SCALE:g}")
    if grid.max() == 0:
        raise ApiError(400, f"images[{index}] has no ink: it is blank")
    return grid


def grid_from_bytes(index: int, data: bytes, max_pixels: int) -> np.ndarray:
    try:
        return grid_from_picture(data, max_pixels)
    except ImageError as error:
        raise ApiError(413 if isinstance(error, ImageTooLarge) else 400, f"images[{index}]: {error}") from None


def encode_all(encoder, grids: list[np.ndarray]) -> np.ndarray:
    """Grids of any sizes -> (B, 1, S, S) float32 for the model."""
    return np.concatenate([encoder.encode(grid[None]) for grid in grids])


async def read_request(request: Request, settings) -> tuple[str, list, int | None]:
    """(model, images as JSON values or bytes, top_k) from a JSON or a multipart body."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=settings.max_images_per_request + 1, max_fields=8)
        model = form.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model: this field is required (a form field next to the images)")
        uploads = form.getlist("images")
        if any(isinstance(upload, str) for upload in uploads):
            raise ApiError(400, "images: send each image as a file (curl -F images=@digit.png)")
        top_k = form.get("top_k")
        # isdigit() alone would pass "²", which int() refuses; 9 digits is far past any label count
        if top_k is not None and not (isinstance(top_k, str) and top_k.isascii() and top_k.isdigit() and len(top_k) <= 9):
            raise ApiError(400, "top_k: must be a whole number")
        return model, [await upload.read() for upload in uploads], int(top_k) if top_k else None
    body = await parse_body(request, ClassifyImageRequest)
    return body.model, body.images, body.top_k


@router.post("/classify-image", response_model=ClassifyResponse, summary="Classify images with one image model",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": ClassifyImageRequest.model_json_schema()},
                 "multipart/form-data": {"schema": {"type": "object", "required": ["model", "images"], "properties": {
                     "model": {"type": "string"}, "top_k": {"type": "integer"},
                     "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
async def classify_image(request: Request, service=Depends(bentoml.get_current_service)) -> Response:
    settings = service.settings
    model, images, top_k = await read_request(request, settings)
    bundle = requested_bundle(request, service, model, IMAGE_CLASSIFIER)
    if not images:
        raise ApiError(400, "images is empty: send at least one image")
    service.check_image_count(len(images))  # before decoding them
    k = top_k_or_default(top_k, min(settings.default_top_k, len(bundle.labels)), len(bundle.labels), " (the model's label count)")

    def decode() -> np.ndarray:  # pictures are decoded off the event loop
        grids = [grid_from_bytes(i, image, settings.max_image_pixels) if isinstance(image, bytes)
                 else grid_from_json(i, image, settings.max_image_pixels) for i, image in enumerate(images)]
        return encode_all(service.image_encoder(bundle), grids)

    encoded = await anyio.to_thread.run_sync(decode)
    if service.bundle(bundle.name, IMAGE_CLASSIFIER) is not bundle:  # reloaded (or unloaded: 404) meanwhile
        raise ApiError(503, f"model {bundle.name!r} was reloaded while these images were decoded with its old version; "
                            "retry", {"Retry-After": "1"})
    probabilities = await service.image_probabilities(bundle.name, encoded)
    return json_response({"model": bundle.name, "results": top_k_results(bundle.labels, probabilities, k)})

