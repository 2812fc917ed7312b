"""`make bento` builds, offline, a bento with the service, every zoo model and the pinned serving
packages (no torch); the bento, exported as `bentoml containerize` would lay it out, serves
without the zoo folder and answers as the zoo's bundle does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import yaml

from services.backends.inference import TextClassifier, read_bundle, sha256_file
from tests.conftest import REPOSITORY, ZOO
from tests.serving import free_port, start_server, stop_server

SERVING_REQUIREMENTS = REPOSITORY / "deploy" / "requirements-serving.txt"
TRAINING_ONLY = ("torch", "onnx", "onnxscript", "locust")  # tqdm now comes with tokenizers (huggingface_hub)
BENTOML = str(Path(sys.executable).parent / "bentoml")


def make(target: str, home: Path) -> str:
    """Run a make target with BENTOML_HOME=home; the built bento's tag."""
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("TEXTSERVE_ZOO", None)
    result = subprocess.run(["make", "--no-print-directory", target], cwd=REPOSITORY, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return re.search(r'Successfully built Bento\(tag="([^"]+)"\)', result.stdout + result.stderr).group(1)


def bento_folder(home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    return home / "bentos" / name / version


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("bentoml_home")
    return home, make("bento", home)


def zoo_store_tags() -> set[str]:
    return {f"{path.name}:{sha256_file(path / 'manifest.json')[:16]}" for path in ZOO.iterdir() if (path / "manifest.json").is_file()}


def test_bento_holds_the_service_every_zoo_model_and_pinned_packages_without_torch(built):
    home, tag = built
    folder = bento_folder(home, tag)
    info = yaml.safe_load((folder / "bento.yaml").read_text())
    assert info["service"] == "services.service:TextService" and info["entry_service"] == "textserve"
    (service,) = info["services"]
    assert {model["tag"] for model in service["models"]} == zoo_store_tags()
    requirements = (folder / "env" / "python" / "requirements.txt").read_text()
    # BentoML appends its own pin, which deploy/requirements-serving.txt already holds.
    assert set(requirements.splitlines()) == set(SERVING_REQUIREMENTS.read_text().splitlines())
    pinned = [line for line in requirements.splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9._-]+==[^=\s]+", line) for line in pinned), "every package pinned exactly"
    names = {line.split("==")[0] for line in pinned}
    assert {"bentoml", "onnxruntime-gpu", "numpy", "prometheus-client"} <= names
    assert not names & set(TRAINING_ONLY), names & set(TRAINING_ONLY)
    source = folder / "src"
    assert (source / "services" / "service.py").is_file() and (source / "models" / "text_encoding.py").is_file()
    assert not (source / "models" / "zoo").exists() and not (source / "training").exists()
    dockerfile = (folder / "env" / "docker" / "Dockerfile").read_text()
    assert dockerfile.startswith("# ===") or "FROM python:3.11-slim" in dockerfile
    assert "ENV TEXTSERVE_DEVICE=$TEXTSERVE_DEVICE" in dockerfile and "ARG TEXTSERVE_DEVICE=cpu" in dockerfile


def test_gpu_bento_carries_cuda_13_and_cudnn_as_wheels_and_asks_for_cuda(tmp_path):
    """onnxruntime-gpu 1.31.1's CUDA provider links CUDA 13 (libcudart.so.13), which no base image
    BentoML offers has: the GPU bento carries CUDA 13's runtime and cuDNN 9 as the nvidia-* wheels
    of onnxruntime-gpu's cuda and cudnn extras, on the CPU image's Python base."""
    home = tmp_path / "home"
    tag = make("bento-gpu", home)
    folder = bento_folder(home, tag)
    dockerfile = (folder / "env" / "docker" / "Dockerfile").read_text()
    assert "nvidia/cuda:12" not in dockerfile and "ARG TEXTSERVE_DEVICE=cuda" in dockerfile
    requirements = set((folder / "env" / "python" / "requirements.txt").read_text().splitlines())
    assert {line for line in SERVING_REQUIREMENTS.read_text().splitlines() if "==" in line} <= requirements  # the serving closure
    nvidia = {line.split("==")[0]: line.split("==")[1] for line in requirements if line.startswith("nvidia-") and "==" in line}
    assert {"nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-curand", "nvidia-cufft", "nvidia-cuda-nvrtc"} <= set(nvidia)
    assert nvidia["nvidia-cuda-runtime"].startswith("13.") and nvidia["nvidia-cublas"].startswith("13.")


def test_serving_requirements_are_the_generators_output():
    for flags, committed in (([], SERVING_REQUIREMENTS), (["--gpu"], REPOSITORY / "deploy" / "requirements-serving-gpu.txt")):
        generated = subprocess.run([sys.executable, str(REPOSITORY / "deploy" / "pin_serving_requirements.py"), *flags],
                                   capture_output=True, text=True, check=True).stdout
        assert generated == committed.read_text(), "run make serving-requirements"


def test_exported_bento_serves_without_the_zoo_and_answers_as_the_bundle_does(built, tmp_path):
    """The layout of the image: the bento with its models inside, a fresh BENTOML_HOME, no
    checkout around it."""
    home, tag = built
    archive = tmp_path / "textserve.tar"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    subprocess.run([BENTOML, "export", tag, str(archive)], env=env, check=True, capture_output=True)
    bento = tmp_path / "bento"
    with tarfile.open(archive) as tar:
        tar.extractall(bento, filter="data")
    assert {path.name for path in (bento / "models").iterdir()} == {t.split(":")[0] for t in zoo_store_tags()}
    assert not (bento / "src" / "models" / "zoo").exists()
    runtime_home = tmp_path / "runtime_home"
    runtime_home.mkdir()
    grpc_port = free_port()
    process, url = start_server(runtime_home, None, target=str(bento), cwd=tmp_path, http_workers="1",
                                models="kim-cnn-trec6,lstm-mr", grpc_port=str(grpc_port), model_control="explicit")
    try:
        texts = ["How far is the moon from the earth ?", "Who wrote Hamlet ?"]
        answer = requests.post(f"{url}/classify", json={"model": "kim-cnn-trec6", "texts": texts}, timeout=30)
        assert answer.status_code == 200, answer.text
        served = np.array([[r["probabilities"][label] for label in sorted(r["probabilities"])] for r in answer.json()["results"]])
        bundle = read_bundle(ZOO / "kim-cnn-trec6")
        expected = TextClassifier(bundle, device="cpu").probabilities(texts)
        order = np.argsort(bundle.labels)
        np.testing.assert_allclose(served, np.asarray(expected)[:, order], atol=1e-6)
        listed = {m["name"]: m["store_tag"] for m in requests.get(f"{url}/models", timeout=10).json()["models"]}
        assert set(listed) == {"kim-cnn-trec6", "lstm-mr"} and set(listed.values()) <= zoo_store_tags()
        assert requests.get(f"{url}/v2/models/lstm-mr/ready", timeout=10).status_code == 200
        for page, title in (("/", "textserve 0.1.0: API"), ("/playground", "textserve 0.1.0: playground")):
            assert f"<title>{title}</title>" in requests.get(f"{url}{page}", timeout=10).text  # the pages are packed
        unknown = requests.post(f"{url}/classify", json={"model": "gru-mr", "texts": ["x"]}, timeout=10)
        assert unknown.status_code == 404 and "kim-cnn-trec6" in unknown.json()["error"]  # TEXTSERVE_MODELS limits the bento's models
        # The bento serves gRPC too, and its repository index is the bento's models
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        text = triton_grpc.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        np.testing.assert_allclose(client.infer("kim-cnn-trec6", [text]).as_numpy("probabilities"), expected, atol=1e-6)
        index = {m["name"]: m["state"] for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["kim-cnn-trec6"] == "READY" and index["gru-mr"] == "UNAVAILABLE"
        client.load_model("gru-mr")  # from the bento's own store copy
        assert requests.post(f"{url}/classify", json={"model": "gru-mr", "texts": ["a fine film"]}, timeout=30).status_code == 200
    finally:
        stop_server(process)
    assert not (runtime_home / "models").exists() or not any((runtime_home / "models").iterdir()), \
        "the models came from the bento, not from a store in BENTOML_HOME"
