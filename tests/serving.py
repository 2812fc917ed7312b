"""A real `bentoml serve` on a free port, for the tests that need a running service."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from tests.conftest import REPOSITORY

STARTUP_SECONDS = 180
SERVICE = "services.service:TextService"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(process: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or still starting up
            pass
        if time.monotonic() > deadline:
            kill_server(process)
            raise RuntimeError(f"not ready in {STARTUP_SECONDS} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def start_server(home: Path, zoo: Path | None, target: str = SERVICE, cwd: Path = REPOSITORY,
                 import_zoo: bool = True, **settings: str) -> tuple[subprocess.Popen, str]:
    """Start `bentoml serve target` (the service of this checkout, or a bento folder) on a free
    port with the TEXTSERVE_* `settings`, and wait until it is ready: (process, URL). With a
    zoo, it is imported into the store first, as `make serve` does; without one (a bento),
    TEXTSERVE_ZOO is left unset."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "TEXTSERVE_DEVICE": "cpu",
        "BENTOML_DO_NOT_TRACK": "True",
        "TEXTSERVE_GRPC_HOST": "127.0.0.1",
        "TEXTSERVE_GRPC_PORT": str(free_port()),  # never Triton's 8001: servers of the suite may overlap
        **{f"TEXTSERVE_{name.upper()}": value for name, value in settings.items()},
    }
    env.pop("TEXTSERVE_ZOO", None)
    if zoo is not None:
        env["TEXTSERVE_ZOO"] = str(zoo)
        if import_zoo:
            subprocess.run([sys.executable, "-m", "services.backends.model_store"], cwd=REPOSITORY, env=env, check=True)
    bentoml = str(Path(sys.executable).parent / "bentoml")
    log_path = home / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [bentoml, "serve", target, "--host", "127.0.0.1", "--port", str(port), "--timeout-keep-alive", "30"],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, url, log_path)
    return process, url


def server_processes(process: subprocess.Popen) -> list[psutil.Process]:
    """The `bentoml serve` process and every process under it. BentoML's workers run in
    sessions of their own, so its process group does not reach them, and once it is gone they
    are no longer its children: list them before signalling."""
    try:
        arbiter = psutil.Process(process.pid)
        return [arbiter, *arbiter.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_server(process: subprocess.Popen) -> None:
    """SIGKILL the server and everything under it (a test that failed half-way)."""
    for member in server_processes(process):
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait(timeout=30)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM, as the kubelet sends it; whatever is still there 20 s later is killed."""
    members = server_processes(process)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    _, left = psutil.wait_procs(members, timeout=20)
    for member in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait(timeout=30)


@contextlib.contextmanager
def running_server(home: Path, zoo: Path | None, import_zoo: bool = True, **settings: str):
    """`bentoml serve` on a free port with the TEXTSERVE_* `settings`; its URL once ready."""
    process, url = start_server(home, zoo, import_zoo=import_zoo, **settings)
    try:
        yield url
    finally:
        stop_server(process)


def read_connections(port: int) -> int:
    """How many of the server's established TCP connections on `port` have nothing left unread
    (/proc/net/tcp's rx_queue is 0): a request whose bytes were all taken up by a worker."""
    read = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            next(rows)  # the header
            for row in rows:
                fields = row.split()  # sl local_address rem_address st tx_queue:rx_queue ...
                local_port, state, rx_queue = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[4].split(":")[1]
                read += local_port == port and state == "01" and int(rx_queue, 16) == 0
    return read


def wait_until_requests_are_read(url: str, count: int, seconds: float = 30) -> None:
    """Wait until `count` connections to the server at `url` have been accepted and read (so a
    signal sent now finds them in flight, however busy the machine is), then a moment more for
    the last bytes to be parsed."""
    port, deadline = int(url.rsplit(":", 1)[1].split("/")[0]), time.monotonic() + seconds
    while read_connections(port) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {read_connections(port)} of {count} requests were read within {seconds} s")
        time.sleep(0.02)
    time.sleep(0.2)


def padding_figures(url: str, model: str) -> tuple[float, float, float, float]:
    """(token budget, padded tokens' sum, batches counted, padding shares' sum) of `model`, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"textserve_batch_token_budget": 0.0, "textserve_batch_padded_tokens_sum": 0.0,
              "textserve_batch_padded_tokens_count": 0.0, "textserve_batch_padding_ratio_sum": 0.0}
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("model") == model:
                wanted[sample.name] += sample.value
    return tuple(wanted.values())


def check_a_batch_runs_in_length_groups(url: str, model: str, texts: list[str], budget_set: int | None = None) -> None:
    """One request of `texts` (alone in its batch: nothing else is in flight) runs in the
    length groups that the model's budget gives (`budget_set`: TEXTSERVE_BATCH_TOKENS, else
    the one measured), every answer in its text's place, and /metrics counts their padded
    tokens."""
    import numpy as np

    from services.backends.cost_batching import length_groups, padded_tokens
    from services.backends.inference import TextClassifier, read_bundle

    budget, padded_before, batches_before, share_before = padding_figures(url, model)
    assert budget >= 1, f"no token budget for {model} in /metrics"
    assert budget_set is None or budget == budget_set
    answer = requests.post(f"{url}/classify", json={"model": model, "texts": texts}, timeout=30)
    assert answer.status_code == 200, answer.text
    classifier = TextClassifier(read_bundle(REPOSITORY / "models" / "zoo" / model))
    # Each answer is its own text's, in the request's order (one padded batch in this process).
    served = np.array([[result["probabilities"][label] for label in classifier.labels] for result in answer.json()["results"]])
    assert np.abs(served - classifier.probabilities(texts)).max() <= 1e-5
    classifier.token_budget = int(budget)
    _, lengths = classifier.encoder.encode_batch(texts)
    expected = padded_tokens(lengths, length_groups(lengths, classifier.token_budget, classifier.budget_rows))
    assert expected < len(texts) * lengths.max()  # the groups ran less padding than one padded batch would
    deadline = time.monotonic() + 10
    while (figures := padding_figures(url, model))[2] == batches_before and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker counts the batch as it finishes it, just before the answer goes
    _, padded_after, batches_after, share_after = figures
    assert (batches_after - batches_before, padded_after - padded_before) == (1, expected)
    assert np.isclose(share_after - share_before, 1 - lengths.sum() / expected)
