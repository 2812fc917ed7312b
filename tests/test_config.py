"""Service settings: every knob from the environment, bad values refused with the variable's name."""

import os
from pathlib import Path

import pytest

from services.config import ServiceSettings, resolve_device
from services.backends.inference import BundleError
from services.backends.model_store import zoo_bundles

from tests.conftest import ZOO


def test_defaults_and_overrides_from_the_environment():
    assert ServiceSettings.from_environment({}) == ServiceSettings()
    settings = ServiceSettings.from_environment(
        {"TEXTSERVE_MODELS": "kim-cnn-mr, kim-cnn-trec6", "TEXTSERVE_MAX_TEXTS_PER_REQUEST": "10", "TEXTSERVE_ZOO": "/z", "TEXTSERVE_DEVICE": "CPU"}
    )
    assert settings.models == ("kim-cnn-mr", "kim-cnn-trec6")
    assert settings.max_texts_per_request == 10 and settings.zoo == Path("/z") and settings.device == "cpu"
    control = ServiceSettings.from_environment({"TEXTSERVE_MODEL_CONTROL": "Explicit", "TEXTSERVE_GRPC_PORT": "0",
                                                "TEXTSERVE_API_KEYS": "@/run/keys", "TEXTSERVE_PROTECT_METRICS": "1"})
    assert control.model_control == "explicit" and control.grpc_port == 0 and control.api_keys == "@/run/keys"
    assert control.protect_metrics and ServiceSettings().grpc_port == 8001 and ServiceSettings().model_control == "none"


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"TEXTSERVE_MAX_BATCH_TEXTS": "many"}, "TEXTSERVE_MAX_BATCH_TEXTS='many' is not an integer"),
        ({"TEXTSERVE_HTTP_WORKERS": "0"}, "TEXTSERVE_HTTP_WORKERS must be at least 1"),
        ({"TEXTSERVE_DEVICE": "tpu"}, "TEXTSERVE_DEVICE='tpu'"),
        ({"TEXTSERVE_INFERENCE": "remote"}, "TEXTSERVE_INFERENCE='remote'; expected auto, inline or runner"),
        ({"TEXTSERVE_MODEL_CONTROL": "sometimes"}, "TEXTSERVE_MODEL_CONTROL='sometimes'; expected none, explicit or poll"),
        ({"TEXTSERVE_GRPC_PORT": "70000"}, "TEXTSERVE_GRPC_PORT=70000; expected a port number, or 0"),
        ({"TEXTSERVE_PROTECT_METRICS": "yes"}, "TEXTSERVE_PROTECT_METRICS='yes'; expected 0 or 1"),
        ({"TEXTSERVE_MODEL_LOAD_TIMEOUT_S": "0"}, "TEXTSERVE_MODEL_LOAD_TIMEOUT_S must be at least 1"),
        ({"TEXTSERVE_ACCESS_LOG": "yes"}, "TEXTSERVE_ACCESS_LOG='yes'; expected 0 or 1"),
        ({"TEXTSERVE_ORT_THREADS": "-1"}, "TEXTSERVE_ORT_THREADS"),
        ({"TEXTSERVE_BATCH_TOKENS": "-8"}, "TEXTSERVE_BATCH_TOKENS must be 0 (measured) or more"),
    ],
)
def test_bad_values_are_refused_with_the_variable_name(environ, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServiceSettings.from_environment(environ)


def test_session_threads_split_the_cores_between_the_processes_that_run_sessions(monkeypatch):
    monkeypatch.setattr("services.config.available_cores", lambda: 16)
    # inline (the default): every HTTP worker runs sessions, one per core by default
    assert ServiceSettings().http_workers == 16 and ServiceSettings().session_threads() == 1
    assert ServiceSettings(http_workers=4).session_threads() == 4
    # the shared runner on a CPU: its workers share the cores, whatever the HTTP workers, and each
    # runs one batch per core it has, one onnxruntime thread each
    runner = ServiceSettings(inference="runner", device="cpu", http_workers=16, runner_workers=4)
    assert runner.concurrent_batches() == 4 and runner.session_threads() == 1
    assert ServiceSettings(inference="runner", device="cpu", runner_workers=32).session_threads() == 1
    # one batch at a time (TEXTSERVE_RUNNER_BATCH_THREADS=1, or a GPU): it gets the worker's cores
    assert ServiceSettings(inference="runner", device="cpu", runner_workers=4, runner_batch_threads=1).session_threads() == 4
    assert ServiceSettings(inference="runner", device="cuda", runner_workers=2).concurrent_batches() == 1
    assert ServiceSettings(ort_threads=3).session_threads() == 3


def test_the_inference_mode_follows_the_device_unless_it_is_set():
    assert ServiceSettings(device="cpu").inference_mode == "inline"
    assert ServiceSettings(device="cuda").inference_mode == "runner"  # one process owns the GPU
    assert ServiceSettings(device="cuda", inference="inline").inference_mode == "inline"
    assert ServiceSettings(device="cpu", inference="runner").inference_mode == "runner"


def test_explicit_devices_are_kept():
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda") == "cuda"


def test_zoo_ignores_hidden_staging_folders(tmp_path):
    (tmp_path / ".half.staging").mkdir()
    (tmp_path / ".half.staging" / "manifest.json").write_text("{}")
    with pytest.raises(BundleError, match="holds no bundles"):
        zoo_bundles(ServiceSettings(zoo=tmp_path))


def test_zoo_selection_names_unknown_models():
    assert {p.name for p in zoo_bundles(ServiceSettings(zoo=ZOO))} >= {"kim-cnn-trec6", "kim-cnn-mr"}
    assert [p.name for p in zoo_bundles(ServiceSettings(zoo=ZOO, models=("kim-cnn-mr",)))] == ["kim-cnn-mr"]
    with pytest.raises(BundleError, match="not-there"):
        zoo_bundles(ServiceSettings(zoo=ZOO, models=("not-there",)))
    with pytest.raises(BundleError, match="does not exist"):
        zoo_bundles(ServiceSettings(zoo=ZOO / "missing"))



def test_cores_follow_the_cgroup_cpu_limit_of_a_pod(tmp_path):
    """A pod limited to 1.5 CPUs on a bigger node gets 2 workers' worth, not the node's cores."""
    from services.config import available_cores

    allowed = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2: 1.5 CPUs
    assert available_cores(tmp_path) == min(allowed, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no limit
    assert available_cores(tmp_path) == allowed
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")  # cgroup v1: half a CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cores(tmp_path) == allowed
