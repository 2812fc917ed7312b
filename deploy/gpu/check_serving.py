"""Step (b) of the GPU check: serving on CUDA, beside the same machine's CPU.

    there:  python3 -m deploy.gpu.check_serving --stash /tmp/gpu-stash --device cuda --out "$OUT"
    here:   python -m deploy.gpu.check_serving --device cpu --quick --out DIR      (make gpu-check-dry)

In order, each section timed and kept apart (a failure is recorded and the next one runs):
1. parity: every bundle in the stash (else models/zoo), its answers on DEVICE against the CPU's
   on the same texts: probabilities within PROBABILITY_ATOL, the same label for at least
   LABEL_AGREEMENT of them, perplexities within PERPLEXITY_RTOL (CUDA's kernels, TF32
   included, differ from the CPU's in the last digits; the tolerances allow that and no more);
2. onnxruntime by batch size on DEVICE for kim-cnn-trec6 and char-lm-small-ptb: with the
   encoding, the graph alone, and (CUDA) the graph with its inputs already on the GPU through IO
   binding, which is what the copies cost;
3. `python -m training predict` over TREC's sample on DEVICE, texts per second;
4. the service under wrk (loadtests/bench.py): the shared runner on DEVICE, then the service as it
   ships on the CPU and the runner on the CPU, at 1 text per request over 1 and 64 connections,
   16 texts per request, and /lm/score; the GPU's utilisation sampled during the CUDA run.

Before anything, with --stash holding the wheel parts, the serving stack is joined, checked and
installed into --site and the check runs again under it (deploy/gpu/wheels.py). What comes back
(at most 8 files): check-serving.json, check-serving.md, check-serving.log, bench-*.md."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPOSITORY_ROOT / "training" / "sample_data"
PROBABILITY_ATOL = 2e-3
LABEL_AGREEMENT = 0.99
PERPLEXITY_RTOL = 1e-3
PARITY_TEXTS = 256
BATCH_SIZES = (1, 8, 64, 256)
WORKLOADS = "classify/1@1,64;classify/16@64;lm/1@1,64"  # 1 text per request at 1 and 64 connections, 16 per request, /lm/score
QUICK_WORKLOADS = "classify/1@4;lm/1@4"
QUICK_BUNDLES = ("kim-cnn-trec6", "char-lm-small-ptb", "digits-cnn")  # one of each kind, for the dry run
SITE_MARK = "TEXTSERVE_GPU_SITE"  # set once the check runs under the installed stack


# --------------------------------------------------------------------------- where it runs


def nvidia_library_folders() -> list[str]:
    """The CUDA and cuDNN libraries of the nvidia-* wheels beside this Python's torch (the GPU
    machine's image), which onnxruntime's CUDA provider loads by name."""
    folders = []
    for entry in map(Path, sys.path):
        nvidia = entry / "nvidia"
        if nvidia.is_dir():
            folders += sorted({str(so.parent) for so in nvidia.rglob("lib*.so*")})
    return folders


def under_installed_stack(args: argparse.Namespace, argv: list[str]) -> None:
    """Install the carried stack and run this check again under it; returns only where nothing
    was carried (here, where .venv already holds the stack) or when already under it."""
    from deploy.gpu import wheels

    if os.environ.get(SITE_MARK) or args.stash is None or not (args.stash / "wheels").is_dir():
        return
    print(json.dumps(wheels.install(args.stash / "wheels", args.site)), flush=True)
    env = {**os.environ, **wheels.environment(args.site), SITE_MARK: str(args.site)}
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*nvidia_library_folders(), env["LD_LIBRARY_PATH"]])
    os.execve(sys.executable, [sys.executable, "-m", "deploy.gpu.check_serving", *argv], env)


def zoo_folder(stash: Path | None) -> Path:
    """The stash's bundles, linked in as models/zoo where the checkout there has none."""
    zoo = REPOSITORY_ROOT / "models" / "zoo"
    if stash is not None and (stash / "zoo").is_dir():
        if not any(zoo.glob("*/manifest.json")):
            shutil.rmtree(zoo, ignore_errors=True) if zoo.is_dir() and not zoo.is_symlink() else zoo.unlink(missing_ok=True)
            zoo.symlink_to(stash / "zoo")
    return zoo


def environment_facts(device: str) -> dict:
    import onnxruntime

    facts = {"device": device, "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
             "python": sys.version.split()[0], "cpus": os.cpu_count()}
    if device == "cuda":
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        facts["gpu"] = pynvml.nvmlDeviceGetName(handle)
        facts["driver"] = pynvml.nvmlSystemGetDriverVersion()
        # The CUDA libraries onnxruntime-gpu runs on there, beside the GPU image's pins
        # (deploy/requirements-serving-gpu.txt): the machine's own, from its torch's wheels.
        from importlib import metadata

        facts["nvidia_wheels"] = {d.metadata["Name"]: d.version for d in metadata.distributions()
                                  if (d.metadata["Name"] or "").lower().startswith("nvidia-")}
    return facts


# --------------------------------------------------------------------------- 1. parity


def sample_texts(count: int) -> list[str]:
    from training.data.datasets import read_mr_dir, read_trec

    questions = [example.text for example in read_trec(SAMPLE / "trec.txt")]
    reviews = [example.text for example in read_mr_dir(SAMPLE / "mr")]
    return [text for pair in zip(questions, reviews) for text in pair][:count]


def compared(bundle_dir: Path, device: str, texts: list[str]) -> dict:
    from services.backends.inference import (IMAGE_ARCHITECTURE, LANGUAGE_MODEL_ARCHITECTURE, ImageClassifier, TextClassifier,
                                             read_bundle)
    from services.backends.language_model import CharLanguageModel

    bundle = read_bundle(bundle_dir)
    row = {"bundle": bundle_dir.name, "architecture": bundle.architecture}
    if bundle.architecture == LANGUAGE_MODEL_ARCHITECTURE:
        cpu, there = (CharLanguageModel(bundle, device=d) for d in ("cpu", device))
        sentences = texts[:64]
        a = np.array([s.perplexity for s in cpu.score(sentences)])
        b = np.array([s.perplexity for s in there.score(sentences)])
        row["max_perplexity_rtol"] = float(np.max(np.abs(a - b) / a))
        row["ok"] = row["max_perplexity_rtol"] <= PERPLEXITY_RTOL
        return row
    if bundle.architecture == IMAGE_ARCHITECTURE:
        cpu, there = (ImageClassifier(bundle, device=d) for d in ("cpu", device))
        grids = np.random.default_rng(0).uniform(0, 16, size=(len(texts), 8, 8)).astype(np.float32)
        a, b = cpu.probabilities(grids), there.probabilities(grids)
    else:
        cpu, there = (TextClassifier(bundle, device=d) for d in ("cpu", device))
        a, b = cpu.probabilities(texts), there.probabilities(texts)
    row["max_probability_delta"] = float(np.max(np.abs(a - b)))
    row["label_agreement"] = float(np.mean(a.argmax(1) == b.argmax(1)))
    row["ok"] = row["max_probability_delta"] <= PROBABILITY_ATOL and row["label_agreement"] >= LABEL_AGREEMENT
    return row


def parity(zoo: Path, device: str, only: tuple[str, ...] = ()) -> list[dict]:
    texts = sample_texts(PARITY_TEXTS)
    rows = []
    for folder in sorted(p.parent for p in zoo.glob("*/manifest.json") if not only or p.parent.name in only):
        try:
            rows.append(compared(folder, device, texts))
        except Exception as error:  # one bundle's failure is a row, not the end of the check
            rows.append({"bundle": folder.name, "ok": False, "error": f"{type(error).__name__}: {error}"})
        print(f"  parity {json.dumps(rows[-1])}", flush=True)
    return rows


# --------------------------------------------------------------------------- 2. by batch size


def by_batch(zoo: Path, device: str, sizes: tuple[int, ...], min_seconds: float) -> list[dict]:
    from loadtests.bench import median_seconds
    from services.backends.inference import TextClassifier, read_bundle
    from services.backends.language_model import CharLanguageModel

    texts = sample_texts(max(sizes))
    rows = []
    classifier = TextClassifier(read_bundle(zoo / "kim-cnn-trec6"), device=device)
    for size in sizes:
        batch = texts[:size]
        feeds = classifier.feeds(*classifier.encoder.encode_batch(batch))
        row = {"model": "kim-cnn-trec6", "batch": size,
               "with_encoding_texts_per_s": size / median_seconds(lambda i: classifier.probabilities(batch), min_seconds=min_seconds),
               "graph_texts_per_s": size / median_seconds(lambda i: classifier.session.run([classifier.output_name], feeds),
                                                          min_seconds=min_seconds)}
        if device == "cuda":
            row["graph_inputs_on_gpu_texts_per_s"] = size / median_seconds(bound_run(classifier.session, feeds, classifier.output_name), min_seconds=min_seconds)
        rows.append(row)
        print(f"  by batch {json.dumps(row)}", flush=True)
    language_model = CharLanguageModel(read_bundle(zoo / "char-lm-small-ptb"), device=device)
    for size in sizes:
        batch = texts[:size]
        rows.append({"model": "char-lm-small-ptb", "batch": size,
                     "with_encoding_texts_per_s": size / median_seconds(lambda i: language_model.score(batch), min_calls=5,
                                                                        min_seconds=min_seconds)})
        print(f"  by batch {json.dumps(rows[-1])}", flush=True)
    return rows


def bound_run(session, feeds: dict, output_name: str):
    """session.run with the inputs copied to the GPU once, before the clock (IO binding), and the
    output left there: the graph's own time on the device."""
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    binding.bind_output(output_name, "cuda")
    return lambda i: session.run_with_iobinding(binding)


# --------------------------------------------------------------------------- 3. predict


def predict_throughput(zoo: Path, device: str, work: Path, copies: int = 20) -> dict:
    from training.data.datasets import read_trec

    texts, out = work / "trec-questions.txt", work / "predictions.jsonl"
    out.unlink(missing_ok=True)  # predict resumes an existing file: a rerun would time nothing
    questions = [example.text for example in read_trec(SAMPLE / "trec.txt")]
    texts.write_text("".join(f"{question}\n" for question in questions * copies))  # 20 copies, 30,000: start-up is then a small share
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "training", "predict", "--bundle", str(zoo / "kim-cnn-trec6"),
                           "--data", str(texts), "--format", "text", "--device", device, "--out", str(out)],
                          capture_output=True, text=True, cwd=REPOSITORY_ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"predict exited with {done.returncode}: {done.stderr[-500:]}")
    lines = sum(1 for _ in out.open())
    return {"texts": lines, "seconds": round(seconds, 2), "texts_per_s": round(lines / seconds, 1),
            "note": "the whole command, start-up included"}


# --------------------------------------------------------------------------- 4. the service


class GpuSampler:
    """The GPU's utilisation and memory, sampled every 0.2 s while the service is measured."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.samples: list[tuple[int, int]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stopped.wait(0.2):
            rates = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            self.samples.append((rates.gpu, memory.used >> 20))

    def __enter__(self) -> "GpuSampler":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopped.set()
        self.thread.join()

    def summary(self) -> dict:
        busy = [gpu for gpu, _ in self.samples]
        return {"samples": len(busy), "mean_utilisation_pct": round(float(np.mean(busy)), 1) if busy else None,
                "max_utilisation_pct": max(busy, default=None), "max_memory_mib": max((m for _, m in self.samples), default=None)}


def service_runs(device: str, seconds: float, warm_up: float, work: Path, out: Path, workloads: str = WORKLOADS) -> dict:
    """loadtests/bench.py against the service: on DEVICE with the shared runner, then on the CPU."""
    runs = {}
    plans = [(device, "service-runner")] + ([("cpu", "service,service-runner")] if device == "cuda" else [])
    for run_device, systems in plans:
        label = f"bench-{run_device}"
        command = [sys.executable, "-m", "loadtests.bench", "--systems", systems, "--rounds", "1", "--seconds", f"{seconds:g}",
                   "--warm-up", f"{warm_up:g}", "--workloads", workloads, "--out", str(work / label)]
        env = {**os.environ, "TEXTSERVE_DEVICE": run_device}
        sampler = GpuSampler() if run_device == "cuda" else None
        started = time.perf_counter()
        with sampler or contextlib.nullcontext():
            done = subprocess.run(command, cwd=REPOSITORY_ROOT, env=env, capture_output=True, text=True)
        (out / f"{label}.log").write_text(done.stdout[-200_000:] + done.stderr[-50_000:])
        if done.returncode != 0:  # recorded; the CPU's run still comes
            runs[label] = {"seconds": round(time.perf_counter() - started, 1),
                           "levels": [{"system": systems, "level": "failed", "texts_per_s": f"exit {done.returncode}: {done.stderr[-600:]}"}]}
            continue
        shutil.copy2(work / label / "bench.md", out / f"{label}.md")
        report = json.loads((work / label / "bench.json").read_text())
        runs[label] = {"seconds": round(time.perf_counter() - started, 1), "levels": service_levels(report),
                       **({"gpu": sampler.summary()} if sampler else {})}
    return runs


def service_levels(report: dict) -> list[dict]:
    rows = []
    for label, system in report["rounds"][0]["systems"].items():
        if system.get("failed"):
            rows.append({"system": label, "level": "failed", "texts_per_s": system["failed"]})
        for level in system.get("levels", []):
            rows.append({"system": label, "level": level["level"], "texts_per_s": round(level["texts_per_s"], 1),
                         "p50_ms": round(level["p50_ms"], 2), "p99_ms": round(level["p99_ms"], 2),
                         "refused": level.get("refused"), "server_cpu_share": round(level["server_cpu_share"], 3)})
    return rows


# --------------------------------------------------------------------------- the check


def sections(args: argparse.Namespace, zoo: Path, work: Path) -> dict:
    quick = args.quick
    return {
        "parity": lambda: parity(zoo, args.device, QUICK_BUNDLES if quick else ()),
        "by_batch": lambda: by_batch(zoo, args.device, (1, 8) if quick else BATCH_SIZES, 0.2 if quick else 1.0),
        "predict": lambda: predict_throughput(zoo, args.device, work, 1 if quick else 20),
        "service": lambda: service_runs(args.device, args.seconds, args.warm_up, work, args.out,
                                        QUICK_WORKLOADS if quick else WORKLOADS),
    }


def markdown(results: dict) -> str:
    lines = [f"# GPU check (b): serving on {results['environment'].get('gpu', results['environment']['device'])}", "",
             f"`{results['command']}`, {results['date']}; {json.dumps(results['environment'])}", ""]
    for name, section in results["sections"].items():
        lines.append(f"## {name} ({section['seconds']} s)")
        value = section.get("result", section.get("error"))
        rows = value if isinstance(value, list) else value.get("levels") if isinstance(value, dict) and "levels" in value else None
        if isinstance(value, dict) and all(isinstance(v, dict) and "levels" in v for v in value.values()):
            for label, run in value.items():
                lines += [f"### {label} ({run['seconds']} s){' GPU ' + json.dumps(run['gpu']) if 'gpu' in run else ''}", *table(run["levels"]), ""]
        elif rows:
            lines += [*table(rows), ""]
        else:
            lines += [f"    {json.dumps(value)}", ""]
    return "\n".join(lines) + "\n"


def table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m deploy.gpu.check_serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stash", type=Path, default=None, help="the payload's stash there (wheels/, zoo/)")
    parser.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where the carried stack is installed")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=5.0, help="per load level of the service")
    parser.add_argument("--warm-up", type=float, default=2.0, help="seconds, whole (wrk's -d)")
    parser.add_argument("--quick", action="store_true", help="the dry run: three bundles, two batch sizes, short timings")
    parser.add_argument("--only", default="parity,by_batch,predict,service", help="sections to run, comma-separated")
    args = parser.parse_args(argv)
    under_installed_stack(args, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.stash / "check-serving-work" if args.stash else Path(tempfile.mkdtemp(prefix="check-serving-"))
    work.mkdir(parents=True, exist_ok=True)  # bench folders, predictions: kept out of --out, which comes back
    zoo = zoo_folder(args.stash)
    results = {"command": "python -m deploy.gpu.check_serving " + " ".join(argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "environment": environment_facts(args.device), "sections": {}}
    print(json.dumps(results["environment"]), flush=True)
    chosen = [name.strip() for name in args.only.split(",")]
    for name, run in sections(args, zoo, work).items():
        if name not in chosen:
            continue
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            section = {"result": run()}
        except Exception as error:  # recorded; the next section still runs on the lent machine's minutes
            section = {"error": f"{type(error).__name__}: {error}"}
        section["seconds"] = round(time.perf_counter() - started, 1)
        results["sections"][name] = section
        (args.out / "check-serving.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "check-serving.md").write_text(markdown(results))
    print(markdown(results))
    failed = [name for name, s in results["sections"].items() if "error" in s]
    failed += [row["bundle"] for row in results["sections"].get("parity", {}).get("result", []) if not row.get("ok")]
    failed += [f"{label} {row['system']}" for label, run in results["sections"].get("service", {}).get("result", {}).items()
               for row in run["levels"] if row["level"] == "failed"]
    print(f"failed: {', '.join(failed)}" if failed else "every section ran; every bundle within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
