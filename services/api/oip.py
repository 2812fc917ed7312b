"""Codec for the Open Inference Protocol v2 (KServe v2 / Triton HTTP) infer API.

This module is deliberately pure: it turns request *bytes* into numpy arrays
and output arrays into response *bytes + headers*, with no web framework and
no model code, so it can be unit-tested against the real ``tritonclient``
encoder/decoder without starting a server.

It implements Triton's *binary tensor data extension*, which the standard
``tritonclient.http.InferenceServerClient`` uses by default:

* Request: when any input carries raw bytes, the client sends the header
  ``Inference-Header-Content-Length: N``. The first ``N`` bytes of the
  (decompressed) body are the JSON request; the raw bytes of every input whose
  ``parameters.binary_data_size`` is set follow, concatenated in input order.
  ``N`` is measured on the *uncompressed* body: the client compresses the whole
  body (JSON + blobs) after computing it, so the body is decompressed first
  (by the HTTP pipeline, services/http/body.py) and split second.
* BYTES tensors in binary form are, per element in row-major order, a 4-byte
  little-endian length followed by that many bytes.
* Response: an output goes binary when its request entry has
  ``parameters.binary_data: true`` or, absent an explicit flag, when the
  request-level ``parameters.binary_data_output`` is true (the client sets that
  whenever it lists no outputs). A binary output's JSON has
  ``parameters.binary_data_size`` and no ``data``; the blobs follow the JSON in
  output order and the response carries ``Inference-Header-Content-Length``.

``services`` must never import torch; this module only needs numpy.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "OIPError",
    "InferRequest",
    "OutputTensor",
    "DATATYPES",
    "parse_header_length",
    "decode_infer_request",
    "encode_infer_response",
    "select_outputs",
]


class OIPError(ValueError):
    """A request that violates the protocol, or asks for something we do not support.

    The message says exactly what was wrong (which input/output, which field)
    because the server returns it verbatim as HTTP 400 ``{"error": msg}``;
    ``tritonclient`` surfaces that string as ``InferenceServerException``.
    """


# v2 datatype name -> numpy dtype. Numeric dtypes are pinned little-endian
# because the binary extension is defined on little-endian bytes (the client
# just calls ``ndarray.tobytes()`` on x86/ARM hosts), independent of our host.
_NUMERIC_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

#: Every datatype this codec accepts. BF16 is a Triton type that newer clients
#: can send (via ml_dtypes), but numpy has no native bfloat16 and none of our
#: text classifiers take it, so it is rejected with a clear message instead.
DATATYPES: frozenset[str] = frozenset(_NUMERIC_DTYPES) | {"BYTES"}
_DATATYPES_LISTED = ", ".join(sorted(DATATYPES))

_INT_TYPES = frozenset(n for n in _NUMERIC_DTYPES if "INT" in n)
_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})

_LEN_PREFIX = struct.Struct("<I")


@dataclass(frozen=True)
class InferRequest:
    """A decoded v2 inference request.

    Attributes:
        id: the request ``id`` to echo back in the response (``None`` when the
            client sent none; ``tritonclient`` omits it for ``request_id=""``).
        inputs: input name -> array, in request order. BYTES inputs are numpy
            object arrays of ``bytes``; numeric inputs have the dtype of their
            declared datatype (native byte order); all are reshaped to the
            declared shape and own their memory (writable).
        requested_outputs: output names in the order listed, or ``None`` when
            the request lists no outputs (meaning: return all outputs).
        binary_outputs: listed output names to send in binary form, resolved
            from each entry's ``binary_data`` flag, falling back to
            ``binary_default`` when an entry has no flag.
        binary_default: the request-level ``parameters.binary_data_output``;
            decides the format of outputs the request did not list.
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    requested_outputs: list[str] | None
    binary_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False

    def binary_output_names(self, selected: Iterable[str]) -> set[str]:
        """Return which of ``selected`` (e.g. from :func:`select_outputs`) go binary.

        ``binary_outputs`` only covers outputs the request listed; when it
        listed none, every returned output follows ``binary_default``. This
        helper folds both cases so the server can pass the result straight to
        :func:`encode_infer_response`.
        """
        if self.requested_outputs is None:
            return set(selected) if self.binary_default else set()
        return {name for name in selected if name in self.binary_outputs}


@dataclass(frozen=True)
class OutputTensor:
    """One output to encode.

    ``array`` for BYTES may hold ``bytes`` or ``str`` elements (any numpy
    dtype: object, ``U``, ``S``); ``str`` is encoded as UTF-8. Numeric arrays
    are cast to the dtype of ``datatype``.
    """

    name: str
    datatype: str
    array: np.ndarray


# --------------------------------------------------------------------------
# Request decoding
# --------------------------------------------------------------------------


def parse_header_length(value: str | None) -> int | None:
    """Parse an ``Inference-Header-Content-Length`` header value.

    Kept here (not in the web layer) so a malformed header yields the same
    kind of 400 error as every other protocol violation.
    """
    if value is None:
        return None
    text = value.strip()
    # int() would also accept "+5", " 5", "5_0"; the header is a plain decimal.
    if not text.isdigit() or not text.isascii():
        raise OIPError(
            f"Inference-Header-Content-Length must be a non-negative integer, got {value!r}"
        )
    if len(text) > 18:  # past any body the limits admit (and past what int() parses by default)
        raise OIPError(f"Inference-Header-Content-Length has {len(text)} digits; no body is that long")
    return int(text)


def _refuse_lone_surrogates(value: Any, where: str) -> None:
    """Every string of the request but the inputs' data (checked as BYTES are encoded) must be
    encodable as UTF-8: JSON's \\ud800 escapes make strings that are not, and the answer,
    which may echo them (the id, a name in an error), could not be written."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise OIPError(f"{where} is not valid Unicode (a lone surrogate at character {exc.start})") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, f"a key of {where}")
            if key != "data":
                _refuse_lone_surrogates(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{where}[{index}]")


def _expect_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise OIPError(f"{what} must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    """Name a decoded JSON value's type the way a client author would."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _parse_shape(raw: Any, label: str) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise OIPError(f"{label}: 'shape' must be a list of non-negative integers, got {_json_type(raw)}")
    for i, dim in enumerate(raw):
        # bool is an int subclass in Python; true/false is not a dimension.
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise OIPError(
                f"{label}: 'shape' must be a list of non-negative integers, "
                f"got {dim!r} at position {i}"
            )
    return tuple(raw)


def _flatten(data: list[Any]) -> list[Any]:
    """Flatten (possibly nested) row-major JSON ``data`` into one list.

    Iterative rather than recursive so a hostile, deeply nested array cannot
    blow the interpreter stack.
    """
    flat: list[Any] = []
    stack: list[Iterable[Any]] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_to_array(flat: list[Any], datatype: str, label: str) -> np.ndarray:
    """Convert flattened JSON elements to a 1-D array, checking element types.

    We check types ourselves instead of trusting ``np.array(..., dtype)``,
    which would silently truncate 1.7 -> 1 for INT32 or accept "3" for FP32.
    """
    if datatype == "BYTES":
        out = np.empty(len(flat), dtype=object)
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise OIPError(
                    f"{label}: BYTES data in JSON must be strings, "
                    f"element {i} is a {_json_type(item)}"
                )
            try:
                out[i] = item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise OIPError(f"{label}: BYTES element {i} is not valid Unicode "
                               f"(a lone surrogate at character {exc.start})") from None
        return out

    if datatype == "BOOL":
        def ok(v: Any) -> bool:
            return isinstance(v, bool)
        expected = "booleans"
    elif datatype in _INT_TYPES:
        def ok(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)
        expected = "integers"
    else:  # FP16/FP32/FP64
        def ok(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        expected = "numbers"
    for i, item in enumerate(flat):
        if not ok(item):
            raise OIPError(
                f"{label}: {datatype} data must be {expected}, element {i} is {item!r}"
            )
    try:
        return np.array(flat, dtype=_NUMERIC_DTYPES[datatype])
    except OverflowError as exc:
        raise OIPError(f"{label}: value out of range for {datatype}: {exc}") from None


def _binary_to_array(
    raw: memoryview, datatype: str, count: int, label: str
) -> np.ndarray:
    """Convert one input's raw blob to a 1-D array of ``count`` elements."""
    if datatype == "BYTES":
        elements: list[bytes] = []
        offset = 0
        size = len(raw)
        while offset < size:
            if len(elements) == count:
                raise OIPError(
                    f"{label}: binary BYTES data holds more than the {count} element(s) "
                    f"the shape declares ({size - offset} extra byte(s))"
                )
            if size - offset < 4:
                raise OIPError(
                    f"{label}: binary BYTES element {len(elements)} is truncated: "
                    f"needs a 4-byte length prefix, only {size - offset} byte(s) left"
                )
            (length,) = _LEN_PREFIX.unpack_from(raw, offset)
            offset += 4
            if length > size - offset:
                raise OIPError(
                    f"{label}: binary BYTES element {len(elements)} declares {length} byte(s) "
                    f"but only {size - offset} remain"
                )
            elements.append(bytes(raw[offset : offset + length]))
            offset += length
        if len(elements) != count:
            raise OIPError(
                f"{label}: binary BYTES data holds {len(elements)} element(s) "
                f"but the shape declares {count}"
            )
        out = np.empty(count, dtype=object)
        out[:] = elements
        return out

    dtype = _NUMERIC_DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise OIPError(
            f"{label}: binary_data_size is {len(raw)} byte(s) but shape and {datatype} "
            f"require {count} x {dtype.itemsize} = {expected}"
        )
    # Copy so the array owns writable memory (frombuffer views of the request
    # body are read-only and would pin the whole body in memory) and is in
    # native byte order for onnxruntime.
    return np.frombuffer(raw, dtype=dtype, count=count).astype(dtype.newbyteorder("="))


def refuse_unsupported_output_parameters(label: str, names: Iterable[str]) -> None:
    """An output's parameters this server does not offer (HTTP and gRPC alike)."""
    names = set(names)
    if "classification" in names:
        # InferRequestedOutput(name, class_count=k) sends this; it asks
        # Triton to return top-k "score:index:label" strings instead of
        # the tensor. Our models already return labels/scores explicitly.
        raise OIPError(
            f"{label}: the 'classification' parameter (class_count) is not supported; "
            "request the output without class_count"
        )
    if any(k.startswith("shared_memory") for k in names):
        raise OIPError(f"{label}: shared-memory outputs are not supported")


def refuse_shared_memory_input(label: str, names: Iterable[str]) -> None:
    if any(k.startswith("shared_memory") for k in names):
        raise OIPError(f"{label}: shared-memory inputs are not supported")


def _parse_outputs(
    raw: Any, binary_default: bool
) -> tuple[list[str] | None, set[str]]:
    """Validate the request's ``outputs`` list; resolve which go binary."""
    if raw is None:
        return None, set()
    if not isinstance(raw, list):
        raise OIPError(f"'outputs' must be a list, got {_json_type(raw)}")
    if not raw:
        # An empty list carries no selection; treat it like an absent one
        # (tritonclient never sends it: it omits 'outputs' when empty).
        return None, set()
    names: list[str] = []
    binary: set[str] = set()
    for i, entry in enumerate(raw):
        entry = _expect_object(entry, f"outputs[{i}]")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise OIPError(f"outputs[{i}]: 'name' must be a non-empty string")
        label = f"output '{name}'"
        if name in names:
            raise OIPError(f"{label} is requested more than once")
        params = _expect_object(entry.get("parameters", {}), f"{label}: 'parameters'")
        refuse_unsupported_output_parameters(label, params)
        flag = params.get("binary_data")
        if flag is None:
            # Triton semantics: an unflagged output follows the request default.
            flag = binary_default
        elif not isinstance(flag, bool):
            raise OIPError(f"{label}: parameters.binary_data must be a boolean, got {flag!r}")
        if flag:
            binary.add(name)
        names.append(name)
    return names, binary


def input_label(index: int, name: Any, seen: Iterable[str]) -> str:
    """`input 'NAME'` for messages, once NAME is checked: a non-empty string not seen before in
    the request. Both codecs (this one and gRPC's, services/api/grpc_inference.py) ask it."""
    if not isinstance(name, str) or not name:
        raise OIPError(f"inputs[{index}]: 'name' must be a non-empty string")
    label = f"input '{name}'"
    if name in seen:
        raise OIPError(f"{label} appears more than once in 'inputs'")
    return label


def check_datatype(label: str, datatype: Any) -> str:
    if datatype not in DATATYPES:
        raise OIPError(f"{label}: unsupported datatype {datatype!r}; expected one of {_DATATYPES_LISTED}")
    return datatype


def check_element_count(label: str, found: int, field: str, shape: tuple[int, ...]) -> None:
    """A tensor's values as many as its shape holds (Python integers: a huge shape cannot wrap around)."""
    if found != math.prod(shape):
        raise OIPError(f"{label}: {field} has {found} element(s) but shape {list(shape)} requires {math.prod(shape)}")


def decode_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Decode a v2 inference request body (JSON, or JSON followed by binary tensor data).

    `body` is the HTTP request body as received (decompressed by the pipeline,
    services/http/body.py: the header length counts those bytes); `header_length` the
    `Inference-Header-Content-Length` header as an int (parse_header_length), or None when the
    whole body is JSON. Raises OIPError with a message naming the offending input or field."""
    body = bytes(body)
    header_length = checked_header_length(header_length, len(body))
    request = request_json(body[:header_length])
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OIPError(f"'id' must be a string, got {_json_type(request_id)}")
    params = _expect_object(request.get("parameters", {}), "request 'parameters'")
    # Other request parameters tritonclient may send (sequence_id, priority,
    # timeout, custom ones) are scheduling hints with no meaning for a
    # stateless classifier, so they are ignored rather than rejected.
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise OIPError(f"parameters.binary_data_output must be a boolean, got {binary_default!r}")
    inputs = decoded_inputs(request.get("inputs"), BinaryData(memoryview(body)[header_length:], header_length))
    requested, binary_outputs = _parse_outputs(request.get("outputs"), binary_default)
    return InferRequest(id=request_id, inputs=inputs, requested_outputs=requested, binary_outputs=binary_outputs,
                        binary_default=binary_default)


def checked_header_length(header_length: int | None, body_length: int) -> int:
    if header_length is None:
        return body_length
    if isinstance(header_length, bool) or not isinstance(header_length, int) or header_length < 0:
        raise OIPError(f"Inference-Header-Content-Length must be a non-negative integer, got {header_length!r}")
    if header_length > body_length:
        raise OIPError(f"Inference-Header-Content-Length is {header_length} but the "
                       f"(decompressed) body is only {body_length} byte(s)")
    return header_length


def request_json(header: bytes) -> dict[str, Any]:
    """The request's JSON object: UTF-8, valid, an object, no lone surrogates."""
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OIPError(f"request JSON is not valid UTF-8: {exc}") from None
    try:
        request = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise OIPError(f"request is not valid JSON: {exc}") from None
    except RecursionError:
        raise OIPError("request is not valid JSON: nesting too deep") from None
    request = _expect_object(request, "request")
    _refuse_lone_surrogates(request, "request")
    return request


class BinaryData:
    """The bytes after the JSON header, handed out in order to the inputs that claim them; every
    byte must be claimed (a short header length, or blobs nobody claimed, mean guessing)."""

    def __init__(self, data: memoryview, header_length: int) -> None:
        self.data, self.header_length, self.offset = data, header_length, 0

    def take(self, size: Any, label: str) -> memoryview:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise OIPError(f"{label}: parameters.binary_data_size must be a non-negative integer, got {size!r}")
        if self.offset + size > len(self.data):
            raise OIPError(f"{label}: binary_data_size {size} overruns the body: only {len(self.data) - self.offset} "
                           f"byte(s) of binary data remain after the {self.header_length}-byte JSON header")
        self.offset += size
        return self.data[self.offset - size : self.offset]

    def check_all_claimed(self) -> None:
        if self.offset != len(self.data):
            raise OIPError(f"{len(self.data) - self.offset} byte(s) of binary data after the JSON header "
                           f"are not claimed by any input's binary_data_size (claimed {self.offset})")


def decoded_inputs(raw_inputs: Any, binary: BinaryData) -> dict[str, np.ndarray]:
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise OIPError("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    for index, entry in enumerate(raw_inputs):
        entry = _expect_object(entry, f"inputs[{index}]")
        label = input_label(index, entry.get("name"), inputs)
        inputs[entry["name"]] = decoded_input(entry, label, binary)
    binary.check_all_claimed()
    return inputs


def decoded_input(entry: dict[str, Any], label: str, binary: BinaryData) -> np.ndarray:
    """One input's tensor, from its JSON `data` or its share of the binary data."""
    if "shape" not in entry:
        raise OIPError(f"{label}: missing 'shape'")
    shape = _parse_shape(entry["shape"], label)
    datatype = check_datatype(label, entry.get("datatype"))
    in_params = _expect_object(entry.get("parameters", {}), f"{label}: 'parameters'")
    refuse_shared_memory_input(label, in_params)
    size = in_params.get("binary_data_size")
    if size is not None:
        if "data" in entry:
            raise OIPError(f"{label}: has both 'data' and parameters.binary_data_size")
        flat = _binary_to_array(binary.take(size, label), datatype, math.prod(shape), label)
    elif "data" in entry:
        data = entry["data"]
        if not isinstance(data, list):
            raise OIPError(f"{label}: 'data' must be a list, got {_json_type(data)}")
        elements = _flatten(data)
        check_element_count(label, len(elements), "'data'", shape)
        flat = _json_to_array(elements, datatype, label)
    else:
        raise OIPError(f"{label}: has neither 'data' nor parameters.binary_data_size")
    return shaped(flat, shape, label)


# --------------------------------------------------------------------------
# Output selection and response encoding
# --------------------------------------------------------------------------


def decode_raw_tensor(raw: bytes, datatype: str, shape: tuple[int, ...], label: str) -> np.ndarray:
    """One tensor from its raw bytes, as the binary extension and gRPC's raw_input_contents
    carry them (BYTES: a 4-byte little-endian length before each element)."""
    check_datatype(label, datatype)
    return shaped(_binary_to_array(memoryview(raw), datatype, math.prod(shape), label), shape, label)


def shaped(flat: np.ndarray, shape: tuple[int, ...], label: str) -> np.ndarray:
    """`flat` (whose length matches the shape's element count) in `shape`; a shape numpy cannot
    make is the client's error: over 64 dimensions, or a zero beside dimensions whose product
    is past its limits ([0, 2**62] has no elements, yet no array has that shape)."""
    try:
        return flat.reshape(shape)
    except ValueError as exc:
        raise OIPError(f"{label}: shape {list(shape)} is not a shape a tensor can have: {exc}") from None


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a numeric v2 datatype (little-endian)."""
    return _NUMERIC_DTYPES[datatype]


def encode_raw_tensor(out: OutputTensor) -> bytes:
    """An output's raw bytes (the binary extension's blob, gRPC's raw_output_contents)."""
    array = np.asarray(out.array)
    if out.datatype == "BYTES":
        return b"".join(_LEN_PREFIX.pack(len(e)) + e for e in _bytes_elements(array, out.name))
    return np.ascontiguousarray(array, dtype=_NUMERIC_DTYPES[out.datatype]).tobytes(order="C")


def select_outputs(request: InferRequest, available: list[str]) -> list[str]:
    """Return the output names to compute/send, in the order the client asked.

    With no outputs listed, all of ``available`` (in that order). An unknown
    name is a client error, reported with the list of valid names.
    """
    if request.requested_outputs is None:
        return list(available)
    known = set(available)
    for name in request.requested_outputs:
        if name not in known:
            raise OIPError(
                f"unknown output '{name}' requested; available outputs: {', '.join(available)}"
            )
    return list(request.requested_outputs)


def _bytes_element(item: Any, name: str) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    raise ValueError(f"output '{name}': BYTES element must be bytes or str, got {type(item).__name__}")


def _bytes_elements(array: np.ndarray, name: str) -> list[bytes]:
    # ravel(order="C") is the row-major order both JSON 'data' and the binary
    # layout use. tolist() turns numpy str_/bytes_ scalars into str/bytes.
    return [_bytes_element(item, name) for item in np.asarray(array).ravel(order="C").tolist()]


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: list[OutputTensor],
    binary_outputs: set[str],
) -> tuple[bytes, dict[str, str]]:
    """Encode a v2 inference response.

    Outputs named in ``binary_outputs`` are sent as blobs after the JSON
    header (``parameters.binary_data_size``, no ``data``); the rest carry a
    flattened row-major ``data`` list (BYTES as UTF-8 strings).

    Returns:
        ``(body, headers)``; headers always has ``content-type`` and, when any
        output is binary, ``inference-header-content-length`` (JSON byte size).

    Raises:
        OIPError: a BYTES output asked for in JSON is not valid UTF-8 (the
            client can fix this by requesting ``binary_data``).
        ValueError: outputs themselves are malformed (a server bug).
    """
    json_outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    seen: set[str] = set()
    for out in outputs:
        if out.name in seen:
            raise ValueError(f"output '{out.name}' given more than once")
        seen.add(out.name)
        if out.datatype not in DATATYPES:
            raise ValueError(f"output '{out.name}': unknown datatype {out.datatype!r}")
        array = np.asarray(out.array)
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": [int(d) for d in array.shape],
        }
        if out.datatype == "BYTES":
            elements = _bytes_elements(array, out.name)
            if out.name in binary_outputs:
                blob = encode_raw_tensor(out)
            else:
                try:
                    entry["data"] = [e.decode("utf-8") for e in elements]
                except UnicodeDecodeError:
                    raise OIPError(
                        f"output '{out.name}' contains bytes that are not valid UTF-8 and "
                        "cannot be sent as JSON; request it with binary_data=true"
                    ) from None
        else:
            # Cast to the declared type so the bytes match what the client
            # will np.frombuffer() them as (e.g. a float64 array for FP32).
            if out.name in binary_outputs:
                blob = encode_raw_tensor(out)
            else:
                typed = np.ascontiguousarray(array, dtype=_NUMERIC_DTYPES[out.datatype])
                entry["data"] = typed.ravel(order="C").tolist()
        if out.name in binary_outputs:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        json_outputs.append(entry)

    response: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        response["model_version"] = model_version
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = json_outputs

    # ensure_ascii=False + UTF-8 keeps texts readable and compact; the header
    # length below is measured in bytes *after* encoding, as the client slices
    # bytes. NaN/Infinity are emitted as-is: the client's rapidjson accepts them.
    header = json.dumps(response, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if not any(o.name in binary_outputs for o in outputs):
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
