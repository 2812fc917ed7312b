"""Every knob of the service: a documented default, overridable by an environment variable.

| variable                         | default      | meaning                                                    |
|----------------------------------|--------------|------------------------------------------------------------|
| TEXTSERVE_ZOO                    | models/zoo   | folder of model bundles imported into the BentoML store    |
| TEXTSERVE_MODELS                 | (all)        | comma-separated bundle names to serve                      |
| TEXTSERVE_DEVICE                 | auto         | cpu, cuda (an error if CUDA cannot run), auto (CUDA if an NVIDIA GPU is present) |
| TEXTSERVE_INFERENCE              | auto         | inline: onnxruntime in each HTTP worker (no second hop); runner: one separate runner process that owns the models and batches every HTTP worker's texts together (shared_runner.py); auto: runner where TEXTSERVE_DEVICE resolves to cuda (one process must own a GPU), else inline |
| TEXTSERVE_RUNNER_BATCH_THREADS   | 0            | with the runner: batches one runner process runs at once, each in its own thread; 0 = cores / runner workers on a CPU (one onnxruntime thread each), 1 on a GPU |
| TEXTSERVE_RUNNER_SOCKET_DIR      | (temp dir)   | with the runner: the folder of the Unix sockets between the HTTP workers and the runner |
| TEXTSERVE_ORT_THREADS            | 0            | onnxruntime intra-op threads per process running sessions; 0 = cores / those processes |
| TEXTSERVE_RUNNER_WORKERS         | 1            | with TEXTSERVE_INFERENCE=runner: runner processes          |
| TEXTSERVE_HTTP_WORKERS           | cores        | processes answering HTTP; inline, each also runs its own sessions and batcher |
| TEXTSERVE_MAX_BATCH_TEXTS        | 64           | adaptive batching: most texts taken from the queue at once (one dispatch) |
| TEXTSERVE_BATCH_TOKENS           | 0            | a dispatch runs as groups of similar-length texts, each within this many padded tokens (rows x longest row; backends/cost_batching.py); 0 = measured per model as it loads, once per machine ($TMPDIR/textserve-token-budgets) |
| TEXTSERVE_MAX_LATENCY_MS         | 1000         | adaptive batching: a batch that cannot start in time is refused (503) |
| TEXTSERVE_MAX_TEXTS_PER_REQUEST  | 256          | more texts in one request -> 413                           |
| TEXTSERVE_MAX_TEXT_CHARS         | 2000         | a longer text -> 413                                       |
| TEXTSERVE_MAX_IMAGES_PER_REQUEST | 64           | /classify-image: more images in one request -> 413         |
| TEXTSERVE_MAX_IMAGE_PIXELS       | 4194304      | /classify-image: a picture with more pixels -> 413, before it is decoded |
| TEXTSERVE_MAX_BODY_BYTES         | 4194304      | a larger request body -> 413, refused before it is read; a compressed body that inflates past it -> 413 as it passes (http/body.py) |
| TEXTSERVE_MAX_PENDING_TEXTS      | 2048         | texts in flight per HTTP worker before new requests get 429 |
| TEXTSERVE_REQUESTS_PER_CONNECTION| 100          | a response closes its keep-alive connection with probability 1/N, so connections spread over the HTTP workers again (http/pipeline.py); 0 = never |
| TEXTSERVE_DEFAULT_TOP_K          | 3            | top-k when a request does not say                          |
| TEXTSERVE_REQUEST_TIMEOUT_S      | 30           | no answer started within this -> 504 (http/deadline.py)     |
| TEXTSERVE_HEADER_TIMEOUT_S       | 10           | a request's headers must arrive within this, from the connection's opening or the request's first byte, else 408 and the connection closes (http/connection_limits.py) |
| TEXTSERVE_MAX_HEADER_BYTES       | 16384        | a request line and headers of more bytes -> 431 and the connection closes, as soon as they pass it (http/connection_limits.py) |
| TEXTSERVE_MAX_HEADERS            | 100          | more header lines in one request -> 431 and the connection closes |
| TEXTSERVE_ACCESS_LOG             | 0            | 1: one access log line per request (client, method, path, route, status, time; never the body), logger bentoml.textserve.access |
| TEXTSERVE_TRACING                | 0            | 1: an OpenTelemetry span per request, with BentoML's configured tracer (set an exporter in BentoML's config) |
| TEXTSERVE_MAX_GENERATE_WORDS     | 200          | /lm/generate: the most words one request may ask for       |
| TEXTSERVE_MAX_NEIGHBORS          | 100          | /lm/neighbors: the most neighbours per word                |
| TEXTSERVE_MAX_WORD_CHARS         | 100          | /lm/vectors, /lm/neighbors: a longer word -> 413           |
| TEXTSERVE_MODEL_CONTROL          | none         | none: the model set is fixed at start (the repository index stays readable, load and unload answer 403); explicit: POST /v2/repository/models/{name}/load and /unload change it while the server runs (api/repository.py); poll: the same API, and a bundle that appears or changes in the zoo folder is loaded (one that leaves it, unloaded) with the same checks and swap |
| TEXTSERVE_MODEL_POLL_INTERVAL_S  | 5            | poll: seconds between two scans of the zoo folder          |
| TEXTSERVE_MODEL_STATE_DIR        | (temp dir)   | with model control: the folder where the server's processes agree on the model set |
| TEXTSERVE_MODEL_LOAD_TIMEOUT_S   | 120          | a load or unload that every process has not confirmed within this gets 504 |
| TEXTSERVE_API_KEYS               | (none)       | comma-separated keys, or @FILE (one per line or comma-separated, e.g. a mounted Secret): every inference and model-information route then needs `Authorization: Bearer KEY` (http/access.py) |
| TEXTSERVE_ADMIN_KEYS             | (none)       | the same form: keys that may also load and unload models; with keys configured, load and unload need one of these |
| TEXTSERVE_PROTECT_METRICS        | 0            | 1: /metrics needs a key too (probes stay open for the kubelet) |
| TEXTSERVE_GRPC_PORT              | 8001         | OIP v2 over gRPC (Triton's port); 0 turns it off           |
| TEXTSERVE_GRPC_HOST              | 0.0.0.0      | the address gRPC listens on (make serve passes its HOST)   |

"cores" are the CPUs this process may use: its cgroup's CPU limit when it has one (a Kubernetes
pod's `resources.limits.cpu`, rounded up), else the CPUs it is allowed to run on. os.cpu_count()
would be the node's, so a pod limited to 2 CPUs on a 64-core node would start 64 workers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field as dataclass_field, fields
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ServiceSettings:
    zoo: Path = REPOSITORY_ROOT / "models" / "zoo"
    models: tuple[str, ...] = ()  # empty: every bundle in the zoo
    device: str = "auto"
    inference: str = "auto"
    ort_threads: int = 0
    runner_workers: int = 1
    runner_batch_threads: int = 0
    http_workers: int = dataclass_field(default_factory=lambda: available_cores())
    max_batch_texts: int = 64
    batch_tokens: int = 0  # 0: each model's budget measured at warm-up
    max_latency_ms: int = 1000
    max_texts_per_request: int = 256
    max_text_chars: int = 2000
    max_images_per_request: int = 64
    max_image_pixels: int = 2048 * 2048
    max_body_bytes: int = 4 * 1024 * 1024  # 256 texts of 2000 characters, JSON-escaped, fit
    max_pending_texts: int = 2048
    requests_per_connection: int = 100
    default_top_k: int = 3
    request_timeout_s: int = 30
    header_timeout_s: int = 10
    max_header_bytes: int = 16 * 1024  # nginx's large_client_header_buffers and Node's --max-http-header-size: 16 KiB
    max_headers: int = 100
    access_log: bool = False
    tracing: bool = False
    runner_socket_dir: str = ""  # empty: the temporary folder
    max_generate_words: int = 200
    max_neighbors: int = 100
    max_word_chars: int = 100
    model_control: str = "none"
    model_state_dir: str = ""  # empty: the temporary folder
    model_load_timeout_s: int = 120
    model_poll_interval_s: int = 5
    api_keys: str = ""  # as written: comma-separated keys or @FILE (read by http/access.py, never logged)
    admin_keys: str = ""
    protect_metrics: bool = False
    grpc_port: int = 8001
    grpc_host: str = "0.0.0.0"

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> ServiceSettings:
        environ = dict(os.environ if environ is None else environ)
        values = {}
        for field in fields(cls):
            raw = environ.get(f"TEXTSERVE_{field.name.upper()}")
            if raw is None or raw == "":
                continue
            if field.name == "zoo":
                values[field.name] = Path(raw)
            elif field.name in ("runner_socket_dir", "model_state_dir", "api_keys", "admin_keys", "grpc_host"):
                values[field.name] = raw
            elif field.name == "models":
                values[field.name] = tuple(name.strip() for name in raw.split(",") if name.strip())
            elif field.name in ("access_log", "tracing", "protect_metrics"):
                if raw.strip().lower() not in ("0", "1", "true", "false"):
                    raise ValueError(f"TEXTSERVE_{field.name.upper()}={raw!r}; expected 0 or 1")
                values[field.name] = raw.strip().lower() in ("1", "true")
            elif field.name in ("device", "inference", "model_control"):
                values[field.name] = raw.strip().lower()
            else:
                try:
                    values[field.name] = int(raw)
                except ValueError:
                    raise ValueError(f"TEXTSERVE_{field.name.upper()}={raw!r} is not an integer") from None
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TEXTSERVE_DEVICE={self.device!r}; expected auto, cpu or cuda")
        if self.inference not in ("auto", "inline", "runner"):
            raise ValueError(f"TEXTSERVE_INFERENCE={self.inference!r}; expected auto, inline or runner")
        if self.model_control not in ("none", "explicit", "poll"):
            raise ValueError(f"TEXTSERVE_MODEL_CONTROL={self.model_control!r}; expected none, explicit or poll")
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"TEXTSERVE_GRPC_PORT={self.grpc_port}; expected a port number, or 0 to turn gRPC off")
        for name in ("runner_workers", "http_workers", "max_batch_texts", "max_texts_per_request",
                     "max_text_chars", "max_images_per_request", "max_image_pixels", "max_body_bytes", "max_pending_texts", "default_top_k", "max_latency_ms", "request_timeout_s", "header_timeout_s", "max_header_bytes", "max_headers", "max_generate_words", "max_neighbors",
                     "max_word_chars", "model_load_timeout_s", "model_poll_interval_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"TEXTSERVE_{name.upper()} must be at least 1")
        for name in ("ort_threads", "requests_per_connection", "runner_batch_threads", "batch_tokens"):
            if getattr(self, name) < 0:
                zero = {"requests_per_connection": "never", "batch_tokens": "measured"}.get(name, "automatic")
                raise ValueError(f"TEXTSERVE_{name.upper()} must be 0 ({zero}) or more")

    @property
    def inference_mode(self) -> str:
        """inline or runner: auto resolved by the device (a GPU gets the shared runner)."""
        if self.inference != "auto":
            return self.inference
        return "runner" if resolve_device(self.device) == "cuda" else "inline"

    def concurrent_batches(self) -> int:
        """Batches one runner process runs at once (TEXTSERVE_RUNNER_BATCH_THREADS)."""
        if self.runner_batch_threads:
            return self.runner_batch_threads
        if resolve_device(self.device) == "cuda":
            return 1
        return max(1, available_cores() // self.runner_workers)

    def session_threads(self) -> int:
        """Intra-op threads per batch that runs (an HTTP worker's one batch when inline, else
        each of a runner worker's concurrent batches): about cores / those batches, so that
        they do not fight."""
        if self.ort_threads:
            return self.ort_threads
        if self.inference_mode == "inline":
            return max(1, available_cores() // self.http_workers)
        return max(1, available_cores() // (self.runner_workers * self.concurrent_batches()))


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the cgroup CPU quota rounded up (v2 cpu.max, or v1
    cpu.cfs_quota_us / cpu.cfs_period_us), else the CPUs of its affinity mask."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = period = None
    try:
        if (cgroup_root / "cpu.max").is_file():
            quota_text, period_text = (cgroup_root / "cpu.max").read_text().split()[:2]
            if quota_text != "max":
                quota, period = int(quota_text), int(period_text)
        elif (cgroup_root / "cpu" / "cpu.cfs_quota_us").is_file():
            quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        quota = None
    if quota is None or quota <= 0 or not period:
        return max(1, allowed)
    return max(1, min(allowed, math.ceil(quota / period)))


SETTINGS = ServiceSettings.from_environment()  # read once per process, at import


def gpu_present() -> bool:
    """An NVIDIA device node exists; cheaper and quieter than letting onnxruntime try CUDA."""
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def resolve_device(requested: str) -> str:
    """auto -> cuda where an NVIDIA GPU is present, else cpu; cpu and cuda are taken as asked
    (make_session then refuses cuda that cannot run, rather than falling back)."""
    if requested == "auto":
        return "cuda" if gpu_present() else "cpu"
    return requested
