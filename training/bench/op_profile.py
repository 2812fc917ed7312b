"""Where a classifier bundle's inference time goes, by operator, from onnxruntime's own profiler.

    python -m training.bench.op_profile --bundle models/zoo/char-cnn-small-trec6 \\
                                  --bundle models/zoo/char-cnn-small-trec6-int8 [--batch 64] [--runs 20]

Runs each bundle's graph `--runs` times on a batch of `--batch` copies of one question (the
same encoding the service uses), with onnxruntime's profiling on, and prints the kernel time
per run and each operator type's share of it. docs/performance-history.md uses it to show why some int8
CNNs gain less than others (the layout transposes around QLinearConv).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import onnxruntime as ort

from services.backends.inference import TextClassifier, read_bundle

QUESTION = "what is the name of the longest river in the world and how long is it ?"


def operator_times(bundle_dir: Path, batch: int, runs: int, threads: int) -> tuple[float, Counter]:
    """(kernel ms per run, microseconds by operator type over all runs)."""
    classifier = TextClassifier(read_bundle(bundle_dir))
    token_ids, lengths = classifier.encoder.encode_batch([QUESTION] * batch)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(bundle_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
        feeds = {"token_ids": token_ids, "lengths": lengths}
        feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
        session.run(None, feeds)  # the first run allocates; profiled with the rest, a small share
        for _ in range(runs - 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_operator: Counter = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_operator[event["args"]["op_name"]] += event["dur"]
    return sum(by_operator.values()) / runs / 1000, by_operator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads; 0 = one per core")
    args = parser.parse_args(argv)
    print(f"| bundle | kernel ms per batch of {args.batch} | operators by share of kernel time |")
    print("|---|---|---|")
    for bundle_dir in args.bundle:
        per_run_ms, by_operator = operator_times(bundle_dir, args.batch, args.runs, args.threads)
        total = sum(by_operator.values())
        shares = ", ".join(f"{op} {100 * t / total:.0f} %" for op, t in by_operator.most_common(6))
        print(f"| `{bundle_dir.name}` | {per_run_ms:.2f} | {shares} |")


if __name__ == "__main__":
    main()
