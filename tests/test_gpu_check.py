"""The prepared GPU check, dry on this CPU (make gpu-check-dry; docs/gpu.md): what each call to the
lent machine carries, the wheel parts and the checkpoint parts with their checks, the zoo taken
out of the index and put back, step (a) with a tiny LM for a few steps through to a released
bundle, and step (b)'s serving check in short."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from deploy.gpu import parts, payload, wheels
from deploy.gpu.payload import CALL_LIMIT, MIB
from models.text_encoding import tokenize
from training.data.datasets import read_mr_dir

REPOSITORY = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPOSITORY / "training" / "sample_data"

# Import names of the packages the GPU machines' image holds (their documented list, read on
# 2026-11-17): step (a) runs on that Python before anything is installed there.
GPU_MACHINE_IMPORTS = {"google", "ml_dtypes", "numpy", "onnx", "onnxruntime", "pynvml", "torch", "torchgen", "tqdm",
                       "typing_extensions", "yaml", "PIL", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
                       "filelock", "fsspec", "psutil", "tokenizers", "packaging", "triton", "onnxscript", "onnx_ir"}


# --------------------------------------------------------------------------- parts


def test_a_file_cut_into_parts_joins_back_to_the_same_bytes(tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(bytes(range(256)) * 1000)  # 256,000 bytes
    manifest = parts.split(source, tmp_path / "parts", 100_000)
    listed = parts.read_manifest(manifest)["parts"]
    assert [p.size for p in listed] == [100_000, 100_000, 56_000]
    joined = parts.join(manifest, tmp_path / "joined.bin")
    assert joined.read_bytes() == source.read_bytes()


def test_a_missing_or_altered_part_is_refused_by_its_name(tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"x" * 250)
    manifest = parts.split(source, tmp_path / "parts", 100)
    part_1 = tmp_path / "parts" / "weights.bin.part-001"
    good = part_1.read_bytes()
    part_1.write_bytes(good[:-1] + b"y")
    with pytest.raises(parts.PartError, match=r"part weights.bin.part-001 does not match its sha256"):
        parts.join(manifest, tmp_path / "joined.bin")
    part_1.write_bytes(good[:50])
    with pytest.raises(parts.PartError, match=r"part weights.bin.part-001 is 50 bytes, the manifest says 100"):
        parts.join(manifest, tmp_path / "joined.bin")
    part_1.unlink()
    with pytest.raises(parts.PartError, match=r"part weights.bin.part-001 is missing"):
        parts.join(manifest, tmp_path / "joined.bin")
    assert not (tmp_path / "joined.bin").exists() and not list(tmp_path.glob("*.joining"))
    done = subprocess.run([sys.executable, "-m", "deploy.gpu.parts", "join", str(manifest), str(tmp_path / "j")],
                          capture_output=True, text=True, cwd=REPOSITORY)
    assert done.returncode == 2 and "refused: part weights.bin.part-001 is missing" in done.stderr


# --------------------------------------------------------------------------- what travels


def test_every_call_of_every_step_carries_under_60_mib_and_the_serving_step_carries_every_bundle():
    rows = payload.plan_rows()
    print("\n" + payload.plan_table(rows))
    assert all(row["payload_bytes"] < CALL_LIMIT for row in rows), payload.plan_table(rows)
    assert rows[0]["code_bytes"] > 1 * MIB  # the code is counted, not left out
    calls = payload.step_calls("serve")
    carried = [item.dest for call in calls for item in call.items]
    bundles = sorted(p.parent.name for p in (REPOSITORY / "models" / "zoo").glob("*/manifest.json"))
    assert sorted(d.split("/")[1] for d in carried if d.startswith("zoo/")) == bundles
    wheel_bytes = sum(item.size for call in calls for item in call.items if item.dest.startswith("wheels/"))
    assert wheel_bytes >= wheels.packed_size(wheels.read_lock())  # the whole wheelhouse travels
    assert "check_serving" in calls[-1].command and all("receive" in call.command for call in calls if call.items)
    lm = payload.step_calls("lm", data=SAMPLE_DATA)  # no PTB there: planned at PTB's sizes
    assert "check_lm train" in lm[0].command and "bring-back" in lm[1].command
    assert lm[0].items_size == sum(payload.PTB_SIZES.values())


def test_taking_the_zoo_out_of_the_index_refuses_commits_until_it_is_put_back(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-checkout", "--local", str(REPOSITORY), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "read-tree", "HEAD"], check=True)  # the index, no files on disk
    committed = len(payload.git(clone, "ls-tree", "-r", "--name-only", "HEAD", "--", "models/zoo").splitlines())
    assert committed > 50
    payload.take_zoo_out(clone)
    assert payload.git(clone, "ls-files", "--", "models/zoo") == ""
    assert "/models/zoo/" in (clone / ".git" / "info" / "exclude").read_text()
    refused = subprocess.run(["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                              "--allow-empty", "-m", "while out"], capture_output=True, text=True)
    assert refused.returncode != 0 and "models/zoo is out of the index" in refused.stderr
    with pytest.raises(payload.PayloadError, match="already out"):
        payload.take_zoo_out(clone)
    assert payload.put_zoo_back(clone) == committed
    assert "/models/zoo/" not in (clone / ".git" / "info" / "exclude").read_text()
    allowed = subprocess.run(["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                              "--allow-empty", "-m", "back"], capture_output=True, text=True)
    assert allowed.returncode == 0, allowed.stderr
    # A commit that bypasses the hook records the zoo's deletion; putting it back restores the
    # index from the commit the zoo was taken from, so that the next commit brings it back.
    payload.take_zoo_out(clone)
    subprocess.run(["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--no-verify",
                    "-m", "zoo deleted"], check=True)
    assert payload.put_zoo_back(clone) == committed
    subprocess.run(["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "zoo again"], check=True)
    assert len(payload.git(clone, "ls-tree", "-r", "--name-only", "HEAD", "--", "models/zoo").splitlines()) == committed


def test_wheel_parts_built_from_another_lock_are_not_sent(tmp_path):
    built = tmp_path / ".gpu-wheels" / "parts"
    built.mkdir(parents=True)
    (built / "payload.bin").write_bytes(b"wheels")
    manifest = parts.split(built / "payload.bin", built, 1024)
    manifest.rename(built / f"{wheels.PACK_NAME}.parts.json")
    (built / wheels.BUILT_FROM).write_text(json.dumps({"lock_sha256": "0" * 64}))
    with pytest.raises(payload.PayloadError, match="built from another wheels.json"):
        payload.wheel_items(tmp_path)
    (built / wheels.BUILT_FROM).write_text(json.dumps({"lock_sha256": wheels.lock_digest()}))
    assert [item.dest for item in payload.wheel_items(tmp_path)][0] == f"wheels/{wheels.PACK_NAME}.parts.json"


def test_this_checkouts_zoo_is_in_the_index():
    """The before-stop check: a zoo left out of the index after GPU calls fails the suite."""
    assert not payload.zoo_is_out(REPOSITORY), "python -m deploy.gpu.payload back"
    assert payload.git(REPOSITORY, "ls-files", "--", "models/zoo/kim-cnn-trec6/manifest.json").strip()


# --------------------------------------------------------------------------- the wheelhouse


def test_the_wheel_lock_is_the_serving_pins_for_cpython_3_12_and_a_changed_pin_is_caught():
    lock, pins = wheels.read_lock(), wheels.requirement_pins()
    assert wheels.check_lock(lock, pins) == []
    assert any(w["name"] == "onnxruntime-gpu" and "cp312" in w["file"] for w in lock)
    assert wheels.check_lock(lock, {**pins, "numpy": "1.0.0"}) == [f"numpy: pinned 1.0.0, locked {pins['numpy']}"]
    assert not wheels.fits_the_gpu_machine("numpy-2.4.6-cp311-cp311-manylinux_2_17_x86_64.whl")
    assert not wheels.fits_the_gpu_machine("numpy-2.4.6-cp312-cp312-macosx_11_0_arm64.whl")
    assert wheels.fits_the_gpu_machine("tzdata-2026.6-py2.py3-none-any.whl")


def tiny_wheel(folder: Path) -> Path:
    """A real (if small) wheel: one module, its metadata and RECORD."""
    path = folder / "gpucheckdemo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("gpucheckdemo.py", "ANSWER = 42\n")
        archive.writestr("gpucheckdemo-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: gpucheckdemo\nVersion: 1.0\n")
        archive.writestr("gpucheckdemo-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("gpucheckdemo-1.0.dist-info/RECORD", "")
    return path


def test_wheel_parts_install_there_and_a_missing_part_is_refused_by_name(tmp_path):
    house = tmp_path / "house"
    (house / "wheels").mkdir(parents=True)
    wheel = tiny_wheel(house / "wheels")
    (house / "wheels" / "padding-0.0-py3-none-any.whl").write_bytes(bytes(3000))  # in the tar, never installed
    lock = [{"name": "gpucheckdemo", "version": "1.0", "file": wheel.name, "size": wheel.stat().st_size,
             "sha256": parts.sha256_of(wheel)}]
    manifest = wheels.pack_into_parts([wheel], house, 1024)
    stash = tmp_path / "stash" / "wheels"
    stash.mkdir(parents=True)
    for path in sorted((house / "parts").iterdir()):
        (stash / path.name).write_bytes(path.read_bytes())
    (stash / parts.read_manifest(manifest)["parts"][1].name).unlink()
    with pytest.raises(parts.PartError, match=r"part serving-wheels.tar.part-001 is missing"):
        wheels.install(stash, tmp_path / "site", lock)
    (stash / "serving-wheels.tar.part-001").write_bytes((house / "parts" / "serving-wheels.tar.part-001").read_bytes())
    record = wheels.install(stash, tmp_path / "site", lock)
    assert record["wheels"] == 1
    answer = subprocess.run([sys.executable, "-c", "import gpucheckdemo; print(gpucheckdemo.ANSWER)"], capture_output=True,
                            text=True, env={"PYTHONPATH": str(tmp_path / "site")})
    assert answer.stdout.strip() == "42"
    assert wheels.install(stash, tmp_path / "site", lock) == record  # once per manifest


# --------------------------------------------------------------------------- step (a), dry


def test_step_a_imports_only_what_the_gpu_machine_has():
    code = ("import sys; import deploy.gpu.check_lm, deploy.gpu.payload, training.__main__, training.jobs.language_model, torch; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=REPOSITORY).stdout.split())
    ours = {"deploy", "training", "models", "services", "loadtests", "tests", "__main__"}
    third_party = {m for m in loaded - set(sys.stdlib_module_names) - ours if not m.startswith("_")}
    assert third_party <= GPU_MACHINE_IMPORTS, sorted(third_party - GPU_MACHINE_IMPORTS)


def write_ptb_like(folder: Path) -> Path:
    """PTB's layout (train.txt, valid.txt; space-separated lower-case tokens) from the committed MR sample."""
    lines = [" ".join(tokenize(example.text)) for example in read_mr_dir(SAMPLE_DATA / "mr")]
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("".join(f" {line} \n" for line in lines[:700]))
    (folder / "valid.txt").write_text("".join(f" {line} \n" for line in lines[-80:]))
    return folder


TINY_LARGE = ["hidden_size=32", "filters=8,8,8,8,8,8,8", "highway_layers=1", "recipe.epochs=2"]


def check_lm(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "deploy.gpu.check_lm", *args], capture_output=True, text=True, cwd=REPOSITORY)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def release(folders: list[Path], bundle: Path, stash: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.gpu.check_lm", "release", *[a for f in folders for a in ("--parts", str(f))],
                           "--bundle", str(bundle), "--valid", str(stash / "ptb" / "valid.txt"), "--work", str(work), *extra],
                          capture_output=True, text=True, cwd=REPOSITORY)


def test_step_a_dry_trains_resumes_brings_the_weights_back_in_parts_and_releases_them(tmp_path):
    stash = tmp_path / "stash"
    write_ptb_like(stash / "ptb")
    first = tmp_path / "call-1"
    sets = [arg for item in TINY_LARGE for arg in ("--set", item)]
    # A budget of 6 ms stops after the first step with a checkpoint: the next call resumes it. The
    # best weights so far come back all the same, and release refuses them as unfinished.
    check_lm("train", "--stash", str(stash), "--out", str(first), "--device", "cpu", "--minutes", "0.0001", *sets)
    stopped = json.loads((first / "summary.json").read_text())
    assert not stopped["finished"] and stopped["steps"] >= 1 and stopped["brought"]
    refused = release([first], tmp_path / "zoo-early" / "char-lm-large-ptb", stash, tmp_path / "work-early")
    assert refused.returncode != 0 and "a run stopped after" in refused.stderr and "--unfinished" in refused.stderr
    second = tmp_path / "call-2"
    check_lm("train", "--stash", str(stash), "--out", str(second), "--device", "cpu", "--minutes", "5", "--part-mib", "0.05", *sets)
    done = json.loads((second / "summary.json").read_text())
    assert done["finished"] and done["epochs_run"] == 2 and done["steps"] > stopped["steps"]
    assert len(list(second.glob("*.part-*"))) == 3 and done["parts"] > 3  # three per call, the rest by bring-back
    folders = [second]
    while sum(len(list(folder.glob("*.part-*"))) for folder in folders) < done["parts"]:
        folders.append(tmp_path / f"call-{len(folders) + 2}")
        check_lm("bring-back", "--stash", str(stash), "--out", str(folders[-1]))
        assert 1 <= len(list(folders[-1].glob("*.part-*"))) <= 3
    bundle = tmp_path / "zoo" / "char-lm-large-ptb"
    released = release(folders, bundle, stash, tmp_path / "work")
    assert released.returncode == 0, released.stdout[-2000:] + released.stderr[-2000:]
    result = json.loads(released.stdout.strip().splitlines()[-1])
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["parity_perplexity_relative_delta"] < 1e-3
    # Through onnxruntime, from weights that travelled as float16: within 0.1 % of training's figure.
    assert result["valid_perplexity"] == pytest.approx(done["valid_perplexity"], rel=1e-3)
    assert "int8" in result


# --------------------------------------------------------------------------- step (b), dry


def test_step_b_dry_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "deploy.gpu.check_serving", "--device", "cpu", "--quick", "--out", str(out),
                           "--seconds", "1", "--warm-up", "1"], capture_output=True, text=True, cwd=REPOSITORY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    results = json.loads((out / "check-serving.json").read_text())
    sections = results["sections"]
    assert set(sections) == {"parity", "by_batch", "predict", "service"} and not any("error" in s for s in sections.values())
    assert [row["bundle"] for row in sections["parity"]["result"]] == ["char-lm-small-ptb", "digits-cnn", "kim-cnn-trec6"]
    assert all(row["ok"] for row in sections["parity"]["result"])
    assert {row["model"] for row in sections["by_batch"]["result"]} == {"kim-cnn-trec6", "char-lm-small-ptb"}
    assert sections["predict"]["result"]["texts"] == 1500
    levels = sections["service"]["result"]["bench-cpu"]["levels"]
    assert [row["level"] for row in levels] == ["classify 1/req @4", "lm/score 1/req @4"]
    assert all(row["texts_per_s"] > 0 and row["refused"] == 0 for row in levels)
    assert (out / "bench-cpu.md").is_file() and (out / "check-serving.md").is_file()
    assert len(list(out.rglob("*"))) <= 8  # what the tool brings back from $OUT
