"""Open Inference Protocol v2 over gRPC: the KServe / Triton `inference.GRPCInferenceService`.

Served on TEXTSERVE_GRPC_PORT (default 8001, Triton's; 0 turns it off) by every HTTP worker,
beside its HTTP port, on the same event loop: the same TextService instance, batcher, models,
limits, admission, metrics and keys as HTTP (docs/errors.md has the gRPC status of each error).
The workers share the port (SO_REUSEPORT, which grpcio sets on Linux): the kernel spreads
connections over them as it spreads HTTP connections.

The protocol's messages and service stubs are Triton's `grpc_service.proto` (a superset of
KServe's `grpc_predict_v2.proto` with the repository calls), compiled as `tritonclient.grpc`
ships them: the exact messages `tritonclient.grpc` sends and reads.

Calls served: ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata, ModelInfer
(inputs as raw_input_contents or typed contents; outputs always as raw_output_contents, as
Triton answers), ModelConfig and ModelStatistics (Triton's extensions: model_config.py,
model_statistics.py), RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload. The others
(shared memory, streaming, trace and log settings) answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.json_format import ParseDict
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from services import metrics
from services.api.model_config import config_of
from services.api.model_statistics import statistics
from services.api.oip import (InferRequest, OIPError, check_element_count, decode_raw_tensor, encode_raw_tensor,
                              input_label, numpy_dtype, refuse_shared_memory_input, refuse_unsupported_output_parameters,
                              shaped)
from services.api.open_inference import (SERVER_NAME, SERVER_VERSION, checked_bundle, infer_outputs, metadata_of,
                                         model_version)
from services.config import ServiceSettings
from services.errors import ApiError, grpc_code, internal_error
from services.http import request_timing
from services.http.access import process_keys
from services.http.deadline import MODEL_CHANGE_VARIABLE, model_change_timeout_s, within_timeout
from services.http.routes import ADMIN, GRPC_ACCESS, KEY

logger = logging.getLogger("bentoml.textserve")
SERVICE = "inference.GRPCInferenceService"
# Typed contents field of each datatype (InferTensorContents), when raw_input_contents is absent.
CONTENTS_FIELDS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def decoded_request(request: service_pb2.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as the HTTP codec's InferRequest: inputs by name (numpy), the
    outputs asked for."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise OIPError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        label = input_label(index, tensor.name, inputs)  # the checks of the HTTP codec (oip.py)
        refuse_shared_memory_input(label, tensor.parameters)
        if raw and tensor.contents.ByteSize():
            raise OIPError(f"{label}: has both contents and raw_input_contents; send one of them")
        shape = tuple(tensor.shape)
        if any(dim < 0 for dim in shape):
            raise OIPError(f"{label}: 'shape' must be non-negative integers, got {list(shape)}")
        if raw:
            inputs[tensor.name] = decode_raw_tensor(raw[index], tensor.datatype, shape, label)
            continue
        field_name = CONTENTS_FIELDS.get(tensor.datatype)
        if field_name is None:
            raise OIPError(f"{label}: unsupported datatype {tensor.datatype!r}; expected one of {sorted(CONTENTS_FIELDS)}")
        values = list(getattr(tensor.contents, field_name))
        check_element_count(label, len(values), f"contents.{field_name}", shape)
        if tensor.datatype == "BYTES":
            array = np.empty(len(values), dtype=object)
            array[:] = values
        else:
            try:
                array = np.array(values, dtype=numpy_dtype(tensor.datatype))
            except OverflowError as error:  # int_contents carries int32: 300 does not fit INT8
                raise OIPError(f"{label}: value out of range for {tensor.datatype}: {error}") from None
        inputs[tensor.name] = shaped(array, shape, label)
    if not inputs:
        raise OIPError("'inputs' must be a non-empty list")
    requested: list[str] = []
    for index, output in enumerate(request.outputs):  # as the HTTP codec checks them (oip.py _parse_outputs)
        if not output.name:
            raise OIPError(f"outputs[{index}]: 'name' must be a non-empty string")
        label = f"output '{output.name}'"
        if output.name in requested:
            raise OIPError(f"{label} is requested more than once")
        refuse_unsupported_output_parameters(label, output.parameters)
        requested.append(output.name)
    return InferRequest(id=request.id or None, inputs=inputs, requested_outputs=requested or None)


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The gRPC calls, each answered through the HTTP worker's TextService instance."""

    def __init__(self, service, settings: ServiceSettings) -> None:
        self.service = service
        self.settings = settings
        self.keys = process_keys(settings)

    async def answer(self, call: str, context, work, model: str = ""):
        """Run `work()` for `call`: its key checked, the request timeout, the metrics, and any
        ApiError as the matching gRPC status with the same message as over HTTP."""
        started = time.perf_counter()
        status = 200
        token = request_timing.current_timing.set(request_timing.Timing())
        try:
            access = GRPC_ACCESS.get(call, KEY)  # the HTTP route table's access classes
            needed = self.keys.needed(access, self.settings)
            if needed is not None:
                authorization = dict(context.invocation_metadata()).get("authorization")
                self.keys.check(authorization, needed == ADMIN)
            if access == ADMIN:  # a prepare and a commit, each waited for with its own 504 that names who is late
                return await within_timeout(work(), model_change_timeout_s(self.settings.model_load_timeout_s), MODEL_CHANGE_VARIABLE)
            return await within_timeout(work(), self.settings.request_timeout_s)
        except ApiError as error:
            status = error.status
            await context.abort(grpc_code(error), error.message)
        except OIPError as error:
            status = 400
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except asyncio.CancelledError:
            status = 499  # the client cancelled the call (or the server is stopping): nobody to answer
            raise
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            status = 500
            logger.exception("unexpected error in gRPC %s", call)
            await context.abort(grpc.StatusCode.INTERNAL, internal_error(error).message)
        finally:
            request_timing.current_timing.reset(token)
            model = model if model in self.service.bundles else ""  # a client's name is a label only once it names a model
            metrics.count_request(model, f"/{SERVICE}/{call}", status, time.perf_counter() - started, call == "ModelInfer")

    async def ServerLive(self, request, context):
        return await self.answer("ServerLive", context, self.live)

    async def live(self):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        async def ready():
            return service_pb2.ServerReadyResponse(ready=not await self.service.models_not_ready())
        return await self.answer("ServerReady", context, ready)

    async def ServerMetadata(self, request, context):
        async def server_metadata():
            return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                                      extensions=["model_repository", "model_configuration", "statistics"])
        return await self.answer("ServerMetadata", context, server_metadata)

    async def ModelReady(self, request, context):
        async def model_ready():
            bundle = checked_bundle(self.service, request.name, request.version or None)
            return service_pb2.ModelReadyResponse(ready=bundle.name not in await self.service.models_not_ready())
        return await self.answer("ModelReady", context, model_ready, request.name)

    async def ModelMetadata(self, request, context):
        async def model_metadata():
            found = metadata_of(checked_bundle(self.service, request.name, request.version or None))
            tensors = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=found["name"], versions=found["versions"], platform=found["platform"],
                inputs=[tensors(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in found["inputs"]],
                outputs=[tensors(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in found["outputs"]])
        return await self.answer("ModelMetadata", context, model_metadata, request.name)

    async def ModelInfer(self, request, context):
        async def infer():
            bundle = checked_bundle(self.service, request.model_name, request.model_version or None)
            outputs = await infer_outputs(self.service, bundle, decoded_request(request))
            tensors = service_pb2.ModelInferResponse.InferOutputTensor
            return service_pb2.ModelInferResponse(
                model_name=bundle.name, model_version=model_version(bundle), id=request.id,
                outputs=[tensors(name=o.name, datatype=o.datatype, shape=list(np.shape(o.array))) for o in outputs],
                raw_output_contents=[encode_raw_tensor(o) for o in outputs])
        return await self.answer("ModelInfer", context, infer, request.model_name)

    async def ModelConfig(self, request, context):
        async def configuration():
            bundle = checked_bundle(self.service, request.name, request.version or None)
            return service_pb2.ModelConfigResponse(config=ParseDict(config_of(bundle, self.settings), model_config_pb2.ModelConfig()))
        return await self.answer("ModelConfig", context, configuration, request.name)

    async def ModelStatistics(self, request, context):
        async def model_statistics():
            if request.name:
                bundles = [checked_bundle(self.service, request.name, request.version or None)]
            else:
                bundles = list(self.service.bundles.values())
            figures = statistics([(bundle.name, model_version(bundle)) for bundle in bundles])
            return ParseDict(figures, service_pb2.ModelStatisticsResponse())
        return await self.answer("ModelStatistics", context, model_statistics, request.name)

    async def RepositoryIndex(self, request, context):
        async def index():
            entries = self.service.repository.index(self.service.model_set, request.ready)
            return service_pb2.RepositoryIndexResponse(models=[
                service_pb2.RepositoryIndexResponse.ModelIndex(name=e["name"], version=e.get("version", ""), state=e["state"],
                                                               reason=e.get("reason", "")) for e in entries])
        return await self.answer("RepositoryIndex", context, index)

    async def RepositoryModelLoad(self, request, context):
        async def load():
            if request.parameters:
                raise ApiError(400, f"load: parameters {sorted(request.parameters)} are not supported (a bundle is loaded "
                                    "as exported, from the zoo folder; no config or files can be sent with the call)")
            await self.service.repository.load(request.model_name)
            return service_pb2.RepositoryModelLoadResponse()
        return await self.answer("RepositoryModelLoad", context, load, request.model_name)

    async def RepositoryModelUnload(self, request, context):
        async def unload():
            await self.service.repository.unload(request.model_name, self.service.model_set)
            return service_pb2.RepositoryModelUnloadResponse()
        return await self.answer("RepositoryModelUnload", context, unload, request.model_name)


def unimplemented(call: str):
    """A call of Triton's service that textserve does not serve: UNIMPLEMENTED with a message and
    no traceback (the generated base class raises NotImplementedError, which grpc logs as an
    error with its traceback: 2,000 calls wrote 2 MB of log)."""

    async def refuse(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{call} is not served by textserve; its calls: {', '.join(SERVED_CALLS)}")

    refuse.__name__ = call
    return refuse


SERVED_CALLS = tuple(sorted(name for name, value in vars(InferenceServicer).items() if name[:1].isupper() and callable(value)))
for _call in dir(service_pb2_grpc.GRPCInferenceServiceServicer):
    if _call[:1].isupper() and _call not in SERVED_CALLS:
        setattr(InferenceServicer, _call, unimplemented(_call))


class PortTakenByAnotherServer(RuntimeError):
    pass


def claim_port(port: int, host: str) -> object:
    """The HTTP workers of one server share the gRPC port (SO_REUSEPORT), but so would a second
    server by the same user, silently splitting the traffic: a lock file per port names the
    server (its arbiter's pid) that holds it, and a worker of any other server refuses to start
    its gRPC listener. Returns the open lock file (held while this worker lives)."""
    path = Path(tempfile.gettempdir()) / f"textserve-grpc-{host.replace(':', '_')}-{port}.lock"
    lock = open(path, "a+")
    mine = str(os.getppid())
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.seek(0)
        lock.truncate()
        lock.write(mine)
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_SH)  # held shared from now on: siblings may hold it too
        return lock
    except BlockingIOError:
        pass
    fcntl.flock(lock, fcntl.LOCK_SH)  # a sibling holds it: wait until it has written its server's pid
    lock.seek(0)
    holder = lock.read().strip()
    if holder != mine:
        lock.close()
        raise PortTakenByAnotherServer(f"gRPC port {port} is in use by another textserve server (arbiter pid {holder}); "
                                       "set TEXTSERVE_GRPC_PORT to another port (make serve: GRPC_PORT=8002), or 0 to turn gRPC off")
    return lock


async def start(service, settings: ServiceSettings) -> tuple[grpc.aio.Server, object]:
    """Listen for gRPC on TEXTSERVE_GRPC_HOST:TEXTSERVE_GRPC_PORT in this worker."""
    host = settings.grpc_host
    lock = claim_port(settings.grpc_port, host)
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service, settings), server)
    address = f"{host}:{settings.grpc_port}"
    try:
        listening = server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises where older versions returned 0
        listening = 0
    if not listening:
        raise RuntimeError(f"could not listen for gRPC on {address} (is the port taken?); set TEXTSERVE_GRPC_PORT to "
                           "another port (make serve: GRPC_PORT=8002), or 0 to turn gRPC off")
    await server.start()
    logger.info("OIP v2 gRPC (inference.GRPCInferenceService) on %s", address)
    return server, lock
