"""Tests for services.api.oip, driven by the real tritonclient encoder and decoder.

Requests are built with ``tritonclient.http.InferInput`` /
``InferRequestedOutput`` and serialised by the client's own
``tritonclient.http._utils._get_inference_request`` (what
``InferenceServerClient.infer`` sends); responses are parsed with
``InferResult.from_response_body`` (what ``infer`` returns). That way a
passing test means the unmodified client interoperates, not merely that our
encoder agrees with our decoder.
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.http._utils import _get_inference_request

from services.api.oip import (
    InferRequest,
    OIPError,
    OutputTensor,
    decode_infer_request,
    encode_infer_response,
    parse_header_length,
    select_outputs,
)

TEXTS = np.array([b"I loved it", "¿Qué?".encode(), "naïve café 🤖👍".encode()], dtype=object)
TEXTS_WITH_EMPTY = np.array(["", "ok", "🙂"], dtype=object)
SCORES = np.arange(18, dtype=np.float32).reshape(3, 6) / 7.0
LABELS = np.array(["positive", "¿Qué?", "naïve 🤖"], dtype=object)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def client_request(inputs, outputs=None, request_id="", parameters=None):
    """Return (body, json_size) exactly as InferenceServerClient.infer sends them."""
    return _get_inference_request(
        inputs=inputs,
        request_id=request_id,
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=parameters,
    )


def make_input(name, array, datatype, binary):
    inp = httpclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


def roundtrip_response(outputs, binary, request_id=None):
    """Encode with our codec, parse with the client's InferResult."""
    body, headers = encode_infer_response("clf", "1", request_id, outputs, binary)
    length = headers.get("inference-header-content-length")
    result = httpclient.InferResult.from_response_body(
        body, verbose=False, header_length=None if length is None else int(length)
    )
    return result, body, headers


def assert_bytes_array_equal(actual, expected):
    assert actual.dtype == object
    assert actual.shape == expected.shape
    assert actual.tolist() == expected.tolist()


def json_body(request: dict) -> bytes:
    return json.dumps(request).encode()


def text_input(**overrides):
    entry = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}
    entry.update(overrides)
    return entry


# ----------------------------------------------------------------------------
# request decoding, via the client's request builder
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_decode_client_bytes_and_fp32_inputs(binary):
    inputs = [
        make_input("text", TEXTS, "BYTES", binary),
        make_input("features", SCORES, "FP32", binary),
    ]
    body, json_size = client_request(inputs, request_id="req-7")
    assert (json_size is not None) == binary  # binary data => header length sent

    req = decode_infer_request(body, json_size)

    assert req.id == "req-7"
    assert list(req.inputs) == ["text", "features"]
    assert_bytes_array_equal(req.inputs["text"], TEXTS)
    assert all(type(x) is bytes for x in req.inputs["text"].ravel())
    assert req.inputs["features"].dtype == np.float32
    np.testing.assert_array_equal(req.inputs["features"], SCORES)
    assert req.inputs["features"].flags.writeable
    # No outputs listed -> the client asks for binary_data_output.
    assert req.requested_outputs is None
    assert req.binary_default is True
    assert req.binary_outputs == set()


def test_decode_requested_outputs_binary_flags():
    inputs = [make_input("text", TEXTS, "BYTES", True)]
    outputs = [
        httpclient.InferRequestedOutput("probs", binary_data=False),
        httpclient.InferRequestedOutput("label", binary_data=True),
    ]
    body, json_size = client_request(inputs, outputs)
    req = decode_infer_request(body, json_size)
    assert req.id is None  # client omits "id" for request_id=""
    assert req.requested_outputs == ["probs", "label"]
    assert req.binary_outputs == {"label"}
    assert req.binary_default is False
    assert req.binary_output_names(["probs", "label"]) == {"label"}


def test_unflagged_output_follows_request_default():
    body = json_body(
        {
            "inputs": [text_input()],
            "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}],
            "parameters": {"binary_data_output": True},
        }
    )
    req = decode_infer_request(body, None)
    assert req.binary_outputs == {"a"}


def test_binary_output_names_when_none_listed():
    req = InferRequest(id=None, inputs={}, requested_outputs=None, binary_outputs=set(), binary_default=True)
    assert req.binary_output_names(["a", "b"]) == {"a", "b"}
    req = InferRequest(id=None, inputs={}, requested_outputs=None, binary_outputs=set(), binary_default=False)
    assert req.binary_output_names(["a", "b"]) == set()


def test_unicode_and_empty_string_binary_and_json():
    for binary in (True, False):
        body, size = client_request([make_input("text", TEXTS_WITH_EMPTY, "BYTES", binary)])
        req = decode_infer_request(body, size)
        assert req.inputs["text"].tolist() == [b"", b"ok", "🙂".encode()]


def test_empty_tensor_binary():
    empty = np.array([], dtype=object)
    body, size = client_request([make_input("text", empty, "BYTES", True)])
    req = decode_infer_request(body, size)
    assert req.inputs["text"].shape == (0,)


def test_two_dimensional_bytes_input_keeps_row_major_order():
    grid = np.array([[b"a", b"bb"], [b"", "é".encode()]], dtype=object)
    body, size = client_request([make_input("text", grid, "BYTES", True)])
    assert_bytes_array_equal(decode_infer_request(body, size).inputs["text"], grid)


@pytest.mark.parametrize(
    "datatype,array",
    [
        ("BOOL", np.array([True, False, True])),
        ("UINT8", np.array([0, 255], dtype=np.uint8)),
        ("UINT16", np.array([1, 65535], dtype=np.uint16)),
        ("UINT32", np.array([1, 2**32 - 1], dtype=np.uint32)),
        ("UINT64", np.array([1, 2**64 - 1], dtype=np.uint64)),
        ("INT8", np.array([-128, 127], dtype=np.int8)),
        ("INT16", np.array([[-3, 4]], dtype=np.int16)),
        ("INT32", np.array([-(2**31), 7], dtype=np.int32)),
        ("INT64", np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)),
        ("FP16", np.array([0.5, -2.0], dtype=np.float16)),
        ("FP32", np.array([1.25, -0.0], dtype=np.float32)),
        ("FP64", np.array([[1e300, -1e-300]], dtype=np.float64)),
    ],
)
@pytest.mark.parametrize("binary", [True, False])
def test_all_numeric_datatypes(datatype, array, binary):
    body, size = client_request([make_input("x", array, datatype, binary)])
    got = decode_infer_request(body, size).inputs["x"]
    assert got.dtype == array.dtype
    np.testing.assert_array_equal(got, array)


def test_pure_json_nested_data():
    body = json_body(
        {
            "id": "abc",
            "inputs": [
                {"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": [[1, 2, 3], [4, 5, 6]]},
                {"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["¿Qué?"], ["naïve"]]},
                {"name": "flat", "shape": [2, 2], "datatype": "FP32", "data": [1, 2.5, 3, 4]},
            ],
            "outputs": [{"name": "probs"}],
        }
    )
    req = decode_infer_request(body, None)
    assert req.id == "abc"
    np.testing.assert_array_equal(req.inputs["ids"], np.array([[1, 2, 3], [4, 5, 6]]))
    assert req.inputs["text"].tolist() == [["¿Qué?".encode()], ["naïve".encode()]]
    assert req.inputs["flat"].dtype == np.float32
    np.testing.assert_array_equal(req.inputs["flat"], [[1, 2.5], [3, 4]])
    assert req.requested_outputs == ["probs"]
    assert req.binary_outputs == set()


def test_scalar_shape():
    req = decode_infer_request(json_body({"inputs": [text_input(shape=[], data=["x"])]}), None)
    assert req.inputs["text"].shape == ()


# ----------------------------------------------------------------------------
# response encoding, parsed by the client's InferResult
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "binary",
    [set(), {"label"}, {"probs"}, {"label", "probs"}],
    ids=["json", "label-binary", "probs-binary", "all-binary"],
)
def test_response_roundtrip_through_client(binary):
    outputs = [
        OutputTensor("label", "BYTES", LABELS),
        OutputTensor("probs", "FP32", SCORES),
    ]
    result, body, headers = roundtrip_response(outputs, binary, request_id="req-1")

    if "label" in binary:
        # Binary BYTES come back as bytes (client's deserialize_bytes_tensor)...
        expected_labels = np.array([s.encode() for s in LABELS], dtype=object)
    else:
        # ...JSON BYTES as the str values of the JSON 'data' list.
        expected_labels = LABELS
    assert_bytes_array_equal(result.as_numpy("label"), expected_labels)
    probs = result.as_numpy("probs")
    assert probs.shape == (3, 6)
    assert probs.dtype == np.float32
    np.testing.assert_array_equal(probs, SCORES)

    response = result.get_response()
    assert response["model_name"] == "clf"
    assert response["model_version"] == "1"
    assert response["id"] == "req-1"
    if binary:
        assert headers["content-type"] == "application/octet-stream"
        header_len = int(headers["inference-header-content-length"])
        header = json.loads(body[:header_len])
        for out in header["outputs"]:
            if out["name"] in binary:
                assert "data" not in out and "binary_data_size" in out["parameters"]
            else:
                assert "parameters" not in out and "data" in out
    else:
        assert headers == {"content-type": "application/json"}
        assert json.loads(body)["outputs"][1]["data"] == SCORES.ravel().tolist()


def test_response_bytes_json_is_text():
    # In JSON, BYTES go out as strings; the client turns them into str objects.
    result, body, _ = roundtrip_response([OutputTensor("label", "BYTES", LABELS)], set())
    assert json.loads(body)["outputs"][0]["data"] == ["positive", "¿Qué?", "naïve 🤖"]
    assert result.as_numpy("label").tolist() == ["positive", "¿Qué?", "naïve 🤖"]


def test_response_bytes_from_bytes_and_numpy_str():
    for array in (
        np.array([s.encode() for s in LABELS], dtype=object),
        np.array(list(LABELS)),  # numpy '<U' dtype
    ):
        result, _, _ = roundtrip_response([OutputTensor("label", "BYTES", array)], {"label"})
        assert result.as_numpy("label").tolist() == [s.encode() for s in LABELS]


def test_response_empty_string_and_empty_tensor():
    outputs = [
        OutputTensor("label", "BYTES", np.array(["", "x", ""], dtype=object)),
        OutputTensor("none", "BYTES", np.array([], dtype=object)),
        OutputTensor("probs", "FP32", np.zeros((0, 6), dtype=np.float32)),
    ]
    result, _, _ = roundtrip_response(outputs, {"label", "none", "probs"})
    assert result.as_numpy("label").tolist() == [b"", b"x", b""]
    assert result.as_numpy("none").shape == (0,)
    assert result.as_numpy("probs").shape == (0, 6)


def test_response_casts_to_declared_dtype():
    probs64 = SCORES.astype(np.float64)
    result, _, _ = roundtrip_response([OutputTensor("probs", "FP32", probs64)], {"probs"})
    np.testing.assert_array_equal(result.as_numpy("probs"), SCORES)


def test_response_without_version_or_id():
    body, _ = encode_infer_response("clf", None, None, [OutputTensor("p", "INT64", np.array([1]))], set())
    assert json.loads(body) == {
        "model_name": "clf",
        "outputs": [{"name": "p", "datatype": "INT64", "shape": [1], "data": [1]}],
    }


def test_response_non_utf8_bytes_in_json_is_rejected():
    with pytest.raises(OIPError, match="output 'raw'.*not valid UTF-8.*binary_data"):
        encode_infer_response("clf", "1", None, [OutputTensor("raw", "BYTES", np.array([b"\xff"], dtype=object))], set())
    # ...but binary transports it intact.
    result, _, _ = roundtrip_response([OutputTensor("raw", "BYTES", np.array([b"\xff"], dtype=object))], {"raw"})
    assert result.as_numpy("raw").tolist() == [b"\xff"]


def test_full_client_roundtrip_with_selected_outputs():
    """Client request -> decode -> select -> encode -> client result."""
    inputs = [make_input("text", TEXTS, "BYTES", True)]
    outputs = [
        httpclient.InferRequestedOutput("probs", binary_data=True),
        httpclient.InferRequestedOutput("label", binary_data=False),
    ]
    body, size = client_request(inputs, outputs, request_id="r9")
    req = decode_infer_request(body, size)
    available = {"label": LABELS, "probs": SCORES}
    names = select_outputs(req, ["label", "probs"])
    assert names == ["probs", "label"]
    tensors = [
        OutputTensor(n, "BYTES" if n == "label" else "FP32", available[n]) for n in names
    ]
    resp, headers = encode_infer_response("clf", "1", req.id, tensors, req.binary_output_names(names))
    result = httpclient.InferResult.from_response_body(
        resp, verbose=False, header_length=int(headers["inference-header-content-length"])
    )
    np.testing.assert_array_equal(result.as_numpy("probs"), SCORES)
    assert result.as_numpy("label").tolist() == list(LABELS)
    assert result.get_response()["id"] == "r9"


# ----------------------------------------------------------------------------
# select_outputs
# ----------------------------------------------------------------------------


def test_select_outputs_all_and_order():
    req = InferRequest(id=None, inputs={}, requested_outputs=None, binary_outputs=set(), binary_default=False)
    assert select_outputs(req, ["label", "probs"]) == ["label", "probs"]
    req = InferRequest(id=None, inputs={}, requested_outputs=["probs"], binary_outputs=set(), binary_default=False)
    assert select_outputs(req, ["label", "probs"]) == ["probs"]


def test_select_outputs_unknown():
    body, size = client_request(
        [make_input("text", TEXTS, "BYTES", True)], [httpclient.InferRequestedOutput("logits")]
    )
    req = decode_infer_request(body, size)
    with pytest.raises(OIPError, match=r"unknown output 'logits'.*available outputs: label, probs"):
        select_outputs(req, ["label", "probs"])


# ----------------------------------------------------------------------------
# validation errors
# ----------------------------------------------------------------------------


def bad(body: bytes, header_length=None, match=""):
    with pytest.raises(OIPError, match=match):
        decode_infer_request(body, header_length)


def test_error_bad_json():
    bad(b"{not json", match="not valid JSON")
    bad(b"[1, 2]", match="request must be a JSON object, got array")
    bad(b"[" * 100_000, match="not valid JSON")


def test_error_non_utf8_json():
    bad(b'{"inputs": "\xff"}', match="not valid UTF-8")


def test_error_missing_or_empty_inputs():
    bad(json_body({}), match="'inputs' must be a non-empty list")
    bad(json_body({"inputs": []}), match="'inputs' must be a non-empty list")
    bad(json_body({"inputs": {"name": "x"}}), match="'inputs' must be a non-empty list")
    bad(json_body({"inputs": ["x"]}), match=r"inputs\[0\] must be a JSON object")


def test_error_input_fields():
    bad(json_body({"inputs": [text_input(name=5)]}), match=r"inputs\[0\]: 'name' must be a non-empty string")
    entry = text_input()
    del entry["shape"]
    bad(json_body({"inputs": [entry]}), match="input 'text': missing 'shape'")
    bad(json_body({"inputs": [text_input(shape=[-1])]}), match="input 'text': 'shape'.*-1")
    bad(json_body({"inputs": [text_input(shape="1")]}), match="input 'text': 'shape' must be a list")
    bad(json_body({"inputs": [text_input(shape=[True])]}), match="input 'text': 'shape'")
    entry = text_input()
    del entry["data"]
    bad(json_body({"inputs": [entry]}), match="input 'text': has neither 'data' nor")
    bad(json_body({"inputs": [text_input(data="hi")]}), match="input 'text': 'data' must be a list")
    bad(json_body({"id": 3, "inputs": [text_input()]}), match="'id' must be a string")


def test_error_wrong_datatype_name():
    bad(json_body({"inputs": [text_input(datatype="STRING")]}), match="input 'text': unsupported datatype 'STRING'.*BYTES")
    bad(json_body({"inputs": [text_input(datatype="fp32")]}), match="unsupported datatype 'fp32'")
    bad(json_body({"inputs": [text_input(datatype="BF16")]}), match="unsupported datatype 'BF16'")


def test_error_shape_data_count_mismatch():
    bad(json_body({"inputs": [text_input(shape=[2])]}), match=r"input 'text': 'data' has 1 element\(s\) but shape \[2\] requires 2")
    bad(
        json_body({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3]]}]}),
        match=r"input 'x': 'data' has 3 element\(s\) but shape \[2, 2\] requires 4",
    )


def test_error_json_element_types():
    bad(json_body({"inputs": [text_input(data=[5])]}), match="input 'text': BYTES data in JSON must be strings, element 0")
    bad(json_body({"inputs": [{"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 1.5]}]}),
        match="input 'x': INT32 data must be integers, element 1 is 1.5")
    bad(json_body({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["3"]}]}),
        match="input 'x': FP32 data must be numbers")
    bad(json_body({"inputs": [{"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}]}),
        match="input 'x': BOOL data must be booleans")
    bad(json_body({"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}]}),
        match="input 'x': value out of range for UINT8")


def test_error_duplicate_input_names():
    body, size = client_request(
        [make_input("text", TEXTS, "BYTES", True), make_input("text", TEXTS, "BYTES", True)]
    )
    bad(body, size, match="input 'text' appears more than once")


def test_error_duplicate_output_names():
    body, size = client_request(
        [make_input("text", TEXTS, "BYTES", True)],
        [httpclient.InferRequestedOutput("probs"), httpclient.InferRequestedOutput("probs")],
    )
    bad(body, size, match="output 'probs' is requested more than once")


def test_error_classification_rejected():
    body, size = client_request(
        [make_input("text", TEXTS, "BYTES", True)], [httpclient.InferRequestedOutput("probs", class_count=2)]
    )
    bad(body, size, match="output 'probs': the 'classification' parameter")


def test_error_shared_memory_rejected():
    inp = httpclient.InferInput("text", [3], "BYTES")
    inp.set_shared_memory("region", 64)
    body, size = client_request([inp])
    bad(body, size, match="input 'text': shared-memory inputs are not supported")


def test_error_binary_overrun():
    body, size = client_request([make_input("features", SCORES, "FP32", True)])
    bad(body[:-4], size, match=r"input 'features': binary_data_size 72 overruns the body: only 68 byte\(s\)")


def test_error_binary_underrun_trailing_bytes():
    body, size = client_request([make_input("features", SCORES, "FP32", True)])
    bad(body + b"\0\0", size, match=r"2 byte\(s\) of binary data after the JSON header are not claimed")


def test_error_binary_size_wrong_for_shape():
    request = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}
    header = json_body(request)
    bad(header + b"\0" * 8, len(header), match=r"input 'x': binary_data_size is 8 byte\(s\) but shape and FP32 require 3 x 4 = 12")


def test_error_binary_bytes_elements():
    def request(blob, count):
        header = json_body(
            {"inputs": [{"name": "t", "shape": [count], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}]}
        )
        return header + blob, len(header)

    one = struct.pack("<I", 2) + b"hi"
    bad(*request(one, 2), match=r"input 't': binary BYTES data holds 1 element\(s\) but the shape declares 2")
    bad(*request(one + one, 1), match=r"input 't': binary BYTES data holds more than the 1 element")
    bad(*request(struct.pack("<I", 9) + b"hi", 1), match=r"element 0 declares 9 byte\(s\) but only 2 remain")
    bad(*request(one + b"\x01", 2), match="element 1 is truncated")


def test_error_header_length():
    body, size = client_request([make_input("text", TEXTS, "BYTES", True)])
    bad(body, len(body) + 1, match=f"Inference-Header-Content-Length is {len(body) + 1} but")
    bad(body, -1, match="non-negative integer")
    bad(body, size - 1, match="not valid JSON")
    # Binary blobs present but the client claims none: everything is JSON.
    bad(body, None, match="not valid JSON")


def test_error_binary_size_and_data_both():
    header = json_body({"inputs": [text_input(parameters={"binary_data_size": 0})]})
    bad(header, len(header), match="input 'text': has both 'data' and parameters.binary_data_size")


def test_error_bad_binary_data_size_value():
    header = json_body({"inputs": [{"name": "t", "shape": [0], "datatype": "BYTES", "parameters": {"binary_data_size": "0"}}]})
    bad(header, len(header), match="input 't': parameters.binary_data_size must be a non-negative integer")


def test_error_bad_output_entries():
    bad(json_body({"inputs": [text_input()], "outputs": "probs"}), match="'outputs' must be a list")
    bad(json_body({"inputs": [text_input()], "outputs": [{}]}), match=r"outputs\[0\]: 'name'")
    bad(json_body({"inputs": [text_input()], "outputs": [{"name": "p", "parameters": {"binary_data": "yes"}}]}),
        match="output 'p': parameters.binary_data must be a boolean")
    bad(json_body({"inputs": [text_input()], "parameters": {"binary_data_output": 1}}),
        match="binary_data_output must be a boolean")


def test_parse_header_length():
    assert parse_header_length(None) is None
    assert parse_header_length("123") == 123
    for value in ("", "-1", "1.5", "abc", "+5"):
        with pytest.raises(OIPError, match="Inference-Header-Content-Length must be a non-negative integer"):
            parse_header_length(value)


def test_services_do_not_import_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, services.api.oip; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
