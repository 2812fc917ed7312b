"""One server's life across its processes: a folder of its own, and a start-up failure that
stops the whole server instead of a crash loop.

`bentoml serve` runs an arbiter process that imports this service, then starts the HTTP
workers (and the runner) as its children. Two things BentoML does not give:

- **A folder per server.** BentoML keeps every server's Prometheus files in one
  `$BENTOML_HOME/prometheus_multiproc_dir`, wiped by each server's start: a second server on
  the machine showed the first one's /lm traffic and wiped its counts. Each server here writes
  them to `$TMPDIR/textserve-<arbiter pid>/metrics` instead (PROMETHEUS_MULTIPROC_DIR, set in
  every process before it creates a metric), removed when the server ends.
- **Failing fast.** A worker whose start-up fails (its gRPC port taken, a zoo it cannot read,
  the pipeline not in place) used to be restarted by BentoML's arbiter for ever, with the HTTP
  port accepting connections that nobody answered. `fail_start(reason)` writes the reason in
  the server's folder and asks the arbiter to stop (SIGTERM, its graceful stop); the arbiter,
  as it exits, prints the reason and exits with status 3 instead of 0.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("bentoml.textserve")
SERVER_VARIABLE = "TEXTSERVE_SERVER_PID"  # the arbiter's pid, inherited by every process of the server
START_FAILED_EXIT = 3


def role() -> str:
    """"arbiter" in `bentoml serve`'s own process, "worker" in a process it started (an HTTP
    worker, a runner), "other" anywhere else (a test or a script importing the service)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.startswith(("_bentoml_impl.worker", "bentoml_cli.worker")):
        return "worker"
    if len(sys.argv) > 1 and sys.argv[1] == "serve" and Path(sys.argv[0]).name in ("bentoml", "__main__.py"):
        return "arbiter"
    return "other"


def server_pid() -> int:
    return int(os.environ.get(SERVER_VARIABLE) or os.getppid())


def server_folder(pid: int | None = None) -> Path:
    return Path(tempfile.gettempdir()) / f"textserve-{pid or server_pid()}"


def failure_file() -> Path:
    return server_folder() / "start-failed"


def enter() -> None:
    """Called at import in every process: the arbiter names the server (its pid, inherited by
    the processes it starts) and makes its folder; each process of a server points its metrics
    at that folder. Elsewhere (a test importing the service) nothing changes."""
    current = role()
    if current == "other":
        return
    if current == "arbiter":
        os.environ[SERVER_VARIABLE] = str(os.getpid())
        clear_folders_of_dead_servers()
        shutil.rmtree(server_folder(), ignore_errors=True)
        (server_folder() / "metrics").mkdir(parents=True)
        atexit.register(leave)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(server_folder() / "metrics")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_folders_of_dead_servers() -> None:
    for folder in Path(tempfile.gettempdir()).glob("textserve-[0-9]*"):
        with contextlib.suppress(ValueError, OSError):
            if folder.is_dir() and not pid_alive(int(folder.name.removeprefix("textserve-"))):
                shutil.rmtree(folder, ignore_errors=True)


def leave() -> None:
    """The arbiter's exit: the folder goes; a failed start is said and exits non-zero."""
    reason = None
    with contextlib.suppress(OSError):
        reason = failure_file().read_text()
    shutil.rmtree(server_folder(), ignore_errors=True)
    if reason:
        print(f"textserve did not start: {reason}", file=sys.stderr, flush=True)
        os._exit(START_FAILED_EXIT)


def fail_start(reason: str) -> None:
    """A process of the server cannot start: stop the whole server, saying why."""
    logger.error("textserve cannot start: %s; stopping the server", reason)
    with contextlib.suppress(OSError):
        if not failure_file().exists():  # the first reason is the one that counts
            failure_file().write_text(reason)
    if role() == "worker" and os.getppid() == server_pid():  # never signal a process that is not this server's arbiter
        os.kill(server_pid(), signal.SIGTERM)


def stops_server_on_failure(step):
    """Decorate a start-up step (sync or async): an exception in it stops the server."""

    def reason_of(error: BaseException) -> str:
        return f"{step.__qualname__}: {error}" if str(error) else f"{step.__qualname__}: {type(error).__name__}"

    if inspect.iscoroutinefunction(step):
        @functools.wraps(step)
        async def guarded(*args, **kwargs):
            try:
                return await step(*args, **kwargs)
            except Exception as error:
                fail_start(reason_of(error))
                raise
    else:
        @functools.wraps(step)
        def guarded(*args, **kwargs):
            try:
                return step(*args, **kwargs)
            except Exception as error:
                fail_start(reason_of(error))
                raise
    return guarded
