"""deploy/k8s/training (distributed training as an Indexed Job of torchrun pods) and its image,
deploy/training, validated offline with the real tools: kubectl kustomize, the Kubernetes schemas
(kubernetes-validate, strict, at the oldest and newest versions test_deploy.py uses), checkov,
torchrun's own argument parser, the training CLI's own parser, and cross-resource checks, each of
which is shown to catch a broken manifest. One test runs torchrun with the manifest's options on
this machine and kills a node agent mid-run, as a preemption would. No cluster and no Docker
engine are needed (neither is here)."""

from __future__ import annotations

import argparse
import ast
import copy
import fnmatch
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest import mock

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPOSITORY
from tests.deploy_tools import DEPLOY, K8S, assert_policy_scan_clean, one, render_folder
from tests.test_deploy import NEWEST_KUBERNETES, OLDEST_KUBERNETES

TRAINING = K8S / "training"
FOLDERS = {"gpu": TRAINING, "cpu": TRAINING / "cpu", "data-loader": TRAINING / "data-loader"}
DOCKERFILE = DEPLOY / "training" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "training" / "Dockerfile.dockerignore"
REQUIREMENTS = DEPLOY / "training" / "requirements.txt"
DEPLOY_DOC = REPOSITORY / "docs" / "deploy.md"
# Findings of the policy scan left by choice; the reason is in the manifest's annotation.
JUSTIFIED_SKIPS = {"CKV_K8S_43"}  # image digest: the kustomizations pin a tag, a release pins the digest
GPU = "nvidia.com/gpu"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render_folder(folder) for name, folder in FOLDERS.items()}


# --- reading the rendered objects -------------------------------------------------------------

def job(objects: list[dict]) -> dict:
    return one(objects, "Job")


def pod_spec(objects: list[dict]) -> dict:
    return job(objects)["spec"]["template"]["spec"]


def trainer(objects: list[dict]) -> dict:
    (container,) = pod_spec(objects)["containers"]
    return container


def torchrun_arguments(container: dict) -> argparse.Namespace:
    """The container's command line as torchrun itself parses it (its module's arguments in
    training_script_args)."""
    from torch.distributed.run import get_args_parser

    assert container["command"][0] == "torchrun", container["command"]
    return get_args_parser().parse_args([*container["command"][1:], *container.get("args", [])])


class _Parsed(Exception):
    pass


def training_arguments(argv: list[str]) -> argparse.Namespace:
    """`python -m training ARGV` as the training CLI's own parser reads it, without running it;
    SystemExit if the CLI refuses the arguments."""
    from training.__main__ import main

    parsed = {}
    parse_args = argparse.ArgumentParser.parse_args

    def capture(parser, args=None, namespace=None):
        parsed["args"] = parse_args(parser, args, namespace)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            main(list(argv))
        except _Parsed:
            return parsed["args"]
    raise AssertionError("the training CLI ran without parsing its arguments")


def environment(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


# --- the wiring: each check returns what is wrong, so that a test can break a manifest and see it caught

def wiring_problems(objects: list[dict]) -> list[str]:
    problems = []
    training_job = job(objects)
    spec, pod = training_job["spec"], pod_spec(objects)
    pod_labels = spec["template"]["metadata"]["labels"]
    container = trainer(objects)
    torchrun = torchrun_arguments(container)

    # Stable host names: an Indexed Job's pods are <job>-<index>, in the DNS through the headless Service.
    services = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == pod.get("subdomain")]
    if spec.get("completionMode") != "Indexed":
        problems.append("the Job is not Indexed: its pods get no stable host names")
    if not services:
        problems.append(f"the pods' subdomain {pod.get('subdomain')!r} is no Service of the rendering")
        return problems
    service = services[0]["spec"]
    if service.get("clusterIP") != "None":
        problems.append("the pods' Service is not headless (clusterIP: None)")
    if service.get("publishNotReadyAddresses") is not True:
        problems.append("the Service publishes no address before the pods are ready: the rendezvous would wait forever")
    if not selects(service.get("selector", {}), pod_labels):
        problems.append("the Service does not select the Job's pods")

    # The rendezvous: pod 0 through that Service, on the port the Service exposes and the container declares.
    host, _, port = torchrun.rdzv_endpoint.rpartition(":")
    expected_host = f"{training_job['metadata']['name']}-0.{services[0]['metadata']['name']}"
    if torchrun.rdzv_backend != "c10d":
        problems.append(f"rendezvous backend {torchrun.rdzv_backend}, not c10d")
    if host != expected_host:
        problems.append(f"the rendezvous endpoint's host {host!r} is not pod 0 through the Service ({expected_host!r})")
    container_ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    service_ports = {p["port"]: p for p in service["ports"]}
    if not port.isdigit() or int(port) not in service_ports:
        problems.append(f"the rendezvous port {port} is not a port of the Service")
    elif container_ports.get(service_ports[int(port)]["targetPort"]) != int(port):
        problems.append(f"the Service's rendezvous port does not lead to the container's port {port}")
    if torchrun.rdzv_id != training_job["metadata"]["name"]:
        problems.append(f"rdzv id {torchrun.rdzv_id!r} is not the Job's name")
    waits = [c for c in pod.get("initContainers", []) if expected_host in c.get("command", [])]
    if not waits:
        problems.append(f"no init container waits for {expected_host} to resolve (pod 0 would not know it hosts the store)")

    # One node per pod: completions == parallelism == --nnodes; one worker (and one GPU) per pod.
    nnodes = {int(n) for n in torchrun.nnodes.split(":")}
    if not (spec.get("completions") == spec.get("parallelism") and nnodes == {spec.get("completions")}):
        problems.append(f"completions {spec.get('completions')}, parallelism {spec.get('parallelism')} and "
                        f"--nnodes {torchrun.nnodes} differ")
    if torchrun.nproc_per_node != "1":
        problems.append(f"--nproc-per-node {torchrun.nproc_per_node}: one worker per pod (one GPU) was meant")

    # Preemption: ignored, replaced and resumed.
    rules = spec.get("podFailurePolicy", {}).get("rules", [])
    if pod.get("restartPolicy") != "Never":
        problems.append("restartPolicy is not Never (podFailurePolicy needs it)")
    if not any(rule["action"] == "Ignore" and {"type": "DisruptionTarget", "status": "True"} in rule.get("onPodConditions", [])
               for rule in rules):
        problems.append("no podFailurePolicy rule ignores DisruptionTarget: a preempted pod would count as a failure")
    if torchrun.max_restarts < 1:
        problems.append("torchrun --max-restarts is 0: survivors cannot re-rendezvous with a replacement pod")
    if environment(container).get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        problems.append("the agents share their store with the workers: a replacement pod would hang (pytorch#135712)")
    rdzv_conf = dict(item.split("=", 1) for item in torchrun.rdzv_conf.split(",") if item)
    if int(rdzv_conf.get("join_timeout", 600)) < 1200:
        problems.append("join_timeout under 20 minutes: too short for a replacement pod to be scheduled")
    if spec.get("backoffLimit", 6) < max(nnodes) - 1:
        problems.append("backoffLimit leaves no room for the failures that losing pod 0 (the store) causes")

    # The volume: --data read-only and --out's folder writable, both on the shared claim.
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod.get("volumes", [])}
    mounts = [(m["mountPath"], volumes.get(m["name"]), m.get("readOnly", False)) for m in container.get("volumeMounts", [])]
    try:
        arguments = training_arguments(torchrun.training_script_args)
    except SystemExit as error:
        problems.append(f"the training CLI refuses {torchrun.training_script_args}: exit {error.code}")
        return problems
    for what, path, writable in (("--data", str(arguments.data), False), ("--out's folder", str(Path(arguments.out).parent), True)):
        on_claim = [(claim, read_only) for mount_path, claim, read_only in mounts if under(path, mount_path) and claim]
        if not on_claim:
            problems.append(f"{what} {path} is on no mounted PersistentVolumeClaim")
        elif on_claim[0][0] not in claims:
            problems.append(f"{what} {path} is on claim {on_claim[0][0]}, which the rendering does not define")
        elif writable and on_claim[0][1]:
            problems.append(f"{what} {path} is mounted read-only")
    for claim in claims.values():
        if claim["spec"]["accessModes"] != ["ReadWriteMany"]:
            problems.append(f"claim {claim['metadata']['name']} is not ReadWriteMany: pods on several nodes share it")
    shm = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    if not shm or next(v for v in pod["volumes"] if v["name"] == shm[0]["name"]).get("emptyDir", {}).get("medium") != "Memory":
        problems.append("/dev/shm is not a memory-backed emptyDir (the runtime's 64 MiB is too little for NCCL)")

    # Only the Job's own pods reach each other, on every TCP port (NCCL and gloo pick theirs).
    policies = [o["spec"] for o in objects if o["kind"] == "NetworkPolicy" and selects(o["spec"]["podSelector"]["matchLabels"], pod_labels)]
    if not policies:
        problems.append("no NetworkPolicy selects the Job's pods")
    for policy in policies:
        for rule in policy.get("ingress", []):
            if not all("podSelector" in peer and "namespaceSelector" not in peer and selects(peer["podSelector"]["matchLabels"], pod_labels)
                       for peer in rule.get("from", [{}])):
                problems.append("the NetworkPolicy admits pods other than the Job's own")
            if any("port" in port or port.get("protocol", "TCP") != "TCP" for port in rule.get("ports", [])):
                problems.append("the NetworkPolicy admits only some ports: NCCL and gloo use ephemeral TCP ports")
    return problems


def gpu_problems(objects: list[dict]) -> list[str]:
    container, pod = trainer(objects), pod_spec(objects)
    problems = []
    for kind in ("limits", "requests"):
        if kind in container["resources"] and container["resources"][kind].get(GPU, 1) != 1:
            problems.append(f"{kind}: {container['resources'][kind].get(GPU)} GPUs, one per pod was meant")
    if container["resources"]["limits"].get(GPU) != 1:
        problems.append("no GPU limit of 1")
    if pod.get("nodeSelector", {}).get("nvidia.com/gpu.present") != "true":
        problems.append("no GPU node selector")
    if {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} not in pod.get("tolerations", []):
        problems.append("no toleration of the GPU nodes' taint")
    return problems


def lockdown_problems(objects: list[dict]) -> list[str]:
    """What the serving pods' lockdown (test_deploy.py) would find wrong with the Job's pod, or the
    loader's."""
    pod = pod_spec(objects) if any(o["kind"] == "Job" for o in objects) else one(objects, "Pod")["spec"]
    context, problems = pod["securityContext"], []
    if not (context.get("runAsNonRoot") and context.get("runAsUser", 0) >= 10000):
        problems.append("the pod may run as root or as a low UID")
    if context.get("seccompProfile") != {"type": "RuntimeDefault"}:
        problems.append("no RuntimeDefault seccomp profile")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("a service-account token is mounted")
    if "serviceAccountName" in pod:
        account = one(objects, "ServiceAccount", pod["serviceAccountName"])
        if account.get("automountServiceAccountToken") is not False:
            problems.append("the ServiceAccount mounts its token by default")
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        security = container["securityContext"]
        if not (security.get("readOnlyRootFilesystem") is True and security.get("allowPrivilegeEscalation") is False
                and security.get("capabilities", {}).get("drop") == ["ALL"]):
            problems.append(f"container {container['name']} is not locked down")
        if not all(kind in container.get("resources", {}) for kind in ("requests", "limits")):
            problems.append(f"container {container['name']} has no requests and limits")
        home = environment(container).get("HOME")
        writable = {m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")}
        if home and home not in writable:
            problems.append(f"container {container['name']}: HOME {home} is on the read-only root filesystem")
    return problems


# --- the image: Dockerfile, requirements and what python -m training imports --------------------

def pinned(text: str) -> dict[str, str]:
    """name -> version of every `name==version` line (names normalised as pip does)."""
    return {re.sub(r"[-_.]+", "-", name).lower(): version
            for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)\s*$", text, re.M)}


def copied_sources(dockerfile: str) -> list[str]:
    sources = []
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            words = [word for word in line.split()[1:] if not word.startswith("--")]
            sources += words[:-1]
    return sources


def image_files(dockerfile: str, ignored: list[str]) -> set[Path]:
    """Repository files the Dockerfile's COPY lines put in the image, less what .dockerignore drops."""
    files = set()
    for source in copied_sources(dockerfile):
        for match in REPOSITORY.glob(source.rstrip("/")):
            files |= {match} if match.is_file() else {p for p in match.rglob("*") if p.is_file()}
    return {f for f in files if not any(fnmatch.fnmatch(str(f.relative_to(REPOSITORY)), pattern.replace("**/", "*"))
                                        or str(f.relative_to(REPOSITORY)).startswith(pattern + "/") for pattern in ignored)}


def import_closure(start: str = "training.__main__") -> tuple[set[Path], set[str]]:
    """The repository's modules `python -m training` can import (at the top or inside a function),
    and the top-level names of the other packages they import."""
    own = {"training", "models", "services", "loadtests"}
    files, others, stack, seen = set(), set(), [start], set()
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        base = REPOSITORY / module.replace(".", "/")
        path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
        if path is None:
            continue
        files.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for name in names:
                parts = name.split(".")
                if parts[0] in own:
                    stack += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
                elif parts[0] not in sys.stdlib_module_names and parts[0] != "__future__":
                    others.add(parts[0])
    return files, others


def image_problems(dockerfile: str, requirements: str, ignored: list[str]) -> list[str]:
    problems = []
    constraints = pinned((REPOSITORY / "constraints.txt").read_text())
    torch_pins = re.findall(r"pip install [^\n]*\btorch==(\S+)", dockerfile)
    if not torch_pins or set(torch_pins) != {constraints["torch"]}:
        problems.append(f"the Dockerfile installs torch {torch_pins or 'unpinned'}, constraints.txt pins {constraints['torch']}")
    if not re.search(r"pip install[^\n]*--index-url \"?\$\{?TORCH_INDEX_URL", dockerfile) or "ARG TORCH_INDEX_URL=" not in dockerfile:
        problems.append("torch is not installed from the TORCH_INDEX_URL build argument (its CUDA build)")
    if not re.search(r"pip install -r \S*requirements\.txt -c \S*constraints\.txt", dockerfile):
        problems.append("the requirements are not installed under constraints.txt")
    required = pinned(requirements)
    for name, version in required.items():
        if constraints.get(name) != version:
            problems.append(f"requirements.txt pins {name}=={version}, constraints.txt {constraints.get(name)}")
    python = re.search(r'requires-python = ">=(\d+\.\d+)', (REPOSITORY / "pyproject.toml").read_text()).group(1)
    if not re.search(rf"^FROM python:{re.escape(python)}[-.@]", dockerfile, re.M):
        problems.append(f"the base image is not Python {python} (pyproject.toml's requires-python)")
    for source in copied_sources(dockerfile):
        if not list(REPOSITORY.glob(source.rstrip("/"))):
            problems.append(f"COPY {source}: no such file in the repository")
    files = image_files(dockerfile, ignored)
    modules, others = import_closure()
    for module in sorted(modules - files):
        problems.append(f"{module.relative_to(REPOSITORY)} is imported by python -m training but not copied into the image")
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    for name in sorted(others):
        wanted = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(name, [name])}
        if not wanted & (set(required) | {"torch"}):
            problems.append(f"python -m training imports {name} ({', '.join(sorted(wanted))}), not in requirements.txt")
    if not re.search(r"^USER \S", dockerfile, re.M):
        problems.append("the image runs as root")
    return problems


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]


# --- tests ----------------------------------------------------------------------------------------

def test_renderings_have_the_objects_distributed_training_needs(rendered):
    assert sorted(o["kind"] for o in rendered["gpu"]) == sorted(
        ["Namespace", "PersistentVolumeClaim", "ServiceAccount", "Service", "NetworkPolicy", "Job"])
    assert sorted(o["kind"] for o in rendered["cpu"]) == sorted(o["kind"] for o in rendered["gpu"])
    assert sorted(o["kind"] for o in rendered["data-loader"]) == ["Namespace", "NetworkPolicy", "PersistentVolumeClaim", "Pod"]
    for objects in rendered.values():
        assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"textserve-training"}
        assert one(objects, "Namespace")["metadata"]["name"] == "textserve-training"
        assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "textserve" for o in objects)
    # The loader fills the very claim the Job mounts, and runs the same image as the same user.
    assert one(rendered["data-loader"], "PersistentVolumeClaim") == one(rendered["gpu"], "PersistentVolumeClaim")
    loader = one(rendered["data-loader"], "Pod")["spec"]
    assert loader["volumes"][0]["persistentVolumeClaim"]["claimName"] == one(rendered["gpu"], "PersistentVolumeClaim")["metadata"]["name"]
    assert loader["containers"][0]["image"] == trainer(rendered["gpu"])["image"]
    assert loader["securityContext"]["runAsUser"] == pod_spec(rendered["gpu"])["securityContext"]["runAsUser"]


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
def test_every_object_passes_strict_schema_validation(rendered, version):
    for name, objects in rendered.items():
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version}: {error.message}")


def test_the_oldest_version_refuses_the_newer_job_fields_left_out(rendered):
    """Why there is no backoffLimitPerIndex: 1.27's Job has no such field (the strict schema says
    so), while 1.37's has; and 1.27 requires a status in each onPodConditions pattern."""
    training_job = copy.deepcopy(job(rendered["gpu"]))
    training_job["spec"]["backoffLimitPerIndex"] = 2
    with pytest.raises(kubernetes_validate.ValidationError, match="backoffLimitPerIndex"):
        kubernetes_validate.validate(training_job, OLDEST_KUBERNETES, strict=True)
    kubernetes_validate.validate(training_job, NEWEST_KUBERNETES, strict=True)
    training_job = copy.deepcopy(job(rendered["gpu"]))
    del training_job["spec"]["podFailurePolicy"]["rules"][0]["onPodConditions"][0]["status"]
    with pytest.raises(kubernetes_validate.ValidationError, match="status"):
        kubernetes_validate.validate(training_job, OLDEST_KUBERNETES, strict=True)


def test_policy_scan_finds_nothing_but_the_justified_skips(rendered, tmp_path):
    assert_policy_scan_clean(rendered, tmp_path, JUSTIFIED_SKIPS, least_passed=100)


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_the_job_its_service_volume_and_policy_are_wired_together(rendered, name):
    assert wiring_problems(rendered[name]) == []


def test_the_flagship_command_trains_the_large_lm_on_ptb_under_torchrun(rendered):
    container = trainer(rendered["gpu"])
    torchrun = torchrun_arguments(container)
    assert torchrun.module and torchrun.training_script == "training"
    assert torchrun.training_script_args == ["train-lm", "--data", "/data/ptb", "--preset", "large",
                                             "--out", "/checkpoints/char-lm-large-ptb.pt"]
    # torch's own launcher turns the options into its launch configuration without complaint.
    from torch.distributed.run import config_from_args

    config, _, module_args = config_from_args(torchrun)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 1)
    assert config.rdzv_configs["join_timeout"] == "1800" and config.max_restarts == 3
    assert module_args[-len(torchrun.training_script_args):] == torchrun.training_script_args


# Each mutation breaks one piece of the wiring; the check must name it.
MUTATIONS = {
    "subdomain": (lambda o: pod_spec(o).update(subdomain="elsewhere"), "subdomain"),
    "service selector": (lambda o: one(o, "Service")["spec"]["selector"].update({"app.kubernetes.io/instance": "other"}),
                         "does not select"),
    "not headless": (lambda o: one(o, "Service")["spec"].update(clusterIP="10.0.0.1"), "headless"),
    "not ready addresses": (lambda o: one(o, "Service")["spec"].pop("publishNotReadyAddresses"), "publishes no address"),
    "endpoint index": (lambda o: replace_in_command(o, "textserve-train-0.", "textserve-train-1."), "not pod 0"),
    "endpoint port": (lambda o: replace_in_command(o, ":29400", ":29500"), "not a port of the Service"),
    "nnodes": (lambda o: replace_in_command(o, "--nnodes=2", "--nnodes=3"), "differ"),
    "parallelism": (lambda o: job(o)["spec"].update(parallelism=1), "differ"),
    "not indexed": (lambda o: job(o)["spec"].update(completionMode="NonIndexed"), "not Indexed"),
    "restart policy": (lambda o: pod_spec(o).update(restartPolicy="OnFailure"), "restartPolicy"),
    "disruption rule": (lambda o: job(o)["spec"]["podFailurePolicy"]["rules"][0].update(action="FailJob"), "DisruptionTarget"),
    "no restarts": (lambda o: replace_in_command(o, "--max-restarts=3", "--max-restarts=0"), "max-restarts"),
    "data elsewhere": (lambda o: trainer(o).update(args=["train-lm", "--data", "/srv/ptb", "--out", "/checkpoints/x.pt"]),
                       "--data /srv/ptb"),
    "checkpoints read-only": (lambda o: trainer(o)["volumeMounts"][1].update(readOnly=True), "read-only"),
    "bad training args": (lambda o: trainer(o).update(args=["train-lm", "--preset", "huge", "--data", "/data/ptb",
                                                            "--out", "/checkpoints/x.pt"]), "refuses"),
    "read-write-once": (lambda o: one(o, "PersistentVolumeClaim")["spec"].update(accessModes=["ReadWriteOnce"]), "ReadWriteMany"),
    "no shm": (lambda o: trainer(o)["volumeMounts"].pop(2), "/dev/shm"),
    "policy ports": (lambda o: one(o, "NetworkPolicy")["spec"]["ingress"][0].update(ports=[{"port": 29400, "protocol": "TCP"}]),
                     "ephemeral"),
    "policy peers": (lambda o: one(o, "NetworkPolicy")["spec"]["ingress"][0].update({"from": [{"namespaceSelector": {}}]}),
                     "other than"),
    "no dns wait": (lambda o: pod_spec(o).pop("initContainers"), "resolve"),
    "shared store": (lambda o: trainer(o).update(env=[e for e in trainer(o)["env"] if e["name"] != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]),
                     "replacement pod would hang"),
}


def replace_in_command(objects: list[dict], old: str, new: str) -> None:
    container = trainer(objects)
    assert any(old in word for word in container["command"]), old
    container["command"] = [word.replace(old, new) for word in container["command"]]


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_wiring_check_catches_a_broken_manifest(rendered, mutation):
    objects = copy.deepcopy(rendered["gpu"])
    mutate, expected = MUTATIONS[mutation]
    mutate(objects)
    problems = wiring_problems(objects)
    assert any(expected in problem for problem in problems), problems


def test_one_gpu_per_pod_on_gpu_nodes_and_none_in_the_cpu_variant(rendered):
    assert gpu_problems(rendered["gpu"]) == []
    assert trainer(rendered["gpu"])["resources"]["limits"][GPU] == 1
    assert GPU not in yaml.safe_dump_all(rendered["cpu"]) and "tolerations" not in pod_spec(rendered["cpu"])
    # The cpu variant is the same Job otherwise: command, arguments, volumes, policy.
    for key in ("command", "args", "volumeMounts", "securityContext"):
        assert trainer(rendered["cpu"])[key] == trainer(rendered["gpu"])[key]
    cpu_env = environment(trainer(rendered["cpu"]))
    assert cpu_env["OMP_NUM_THREADS"] == trainer(rendered["cpu"])["resources"]["limits"]["cpu"]
    broken = copy.deepcopy(rendered["gpu"])
    trainer(broken)["resources"]["limits"][GPU] = 2
    assert any("GPUs, one per pod" in p for p in gpu_problems(broken))
    del pod_spec(broken)["tolerations"]
    assert any("toleration" in p for p in gpu_problems(broken))


def test_every_pod_runs_locked_down(rendered):
    for name in ("gpu", "cpu", "data-loader"):
        assert lockdown_problems(rendered[name]) == [], name
    env = environment(trainer(rendered["gpu"]))
    assert env["OMP_NUM_THREADS"] == trainer(rendered["gpu"])["resources"]["limits"]["cpu"]
    broken = copy.deepcopy(rendered["gpu"])
    pod_spec(broken)["initContainers"][0]["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    pod_spec(broken)["securityContext"]["runAsUser"] = 1000
    assert len(lockdown_problems(broken)) == 2


def test_the_dns_wait_of_the_init_container_works(rendered, tmp_path):
    """The init container's script, run here: a name that resolves passes at once, one that never
    does fails with its reason when the deadline passes."""
    (wait,) = pod_spec(rendered["gpu"])["initContainers"]
    assert wait["image"] == trainer(rendered["gpu"])["image"]
    python, flag, script, host, deadline = wait["command"]
    assert (python, flag, float(deadline)) == ("python", "-c", 1800.0)
    passed = subprocess.run([sys.executable, "-c", script, "localhost", "5"], capture_output=True, text=True, timeout=30)
    assert passed.returncode == 0 and passed.stdout.startswith("localhost is 127."), passed.stderr
    failed = subprocess.run([sys.executable, "-c", script, "no-such-pod.invalid", "1"], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "no-such-pod.invalid did not resolve within 1 s" in failed.stderr


def test_the_image_pins_torch_as_constraints_do_and_holds_what_the_cli_imports(rendered):
    dockerfile = DOCKERFILE.read_text()
    assert image_problems(dockerfile, REQUIREMENTS.read_text(), dockerignore_patterns()) == []
    constraints = pinned((REPOSITORY / "constraints.txt").read_text())
    assert f"torch=={constraints['torch']}" in dockerfile
    user = int(re.search(r"^ARG TRAINER_UID=(\d+)$", dockerfile, re.M).group(1))
    assert user == pod_spec(rendered["gpu"])["securityContext"]["runAsUser"]


# Each mutation of the Dockerfile (d) or requirements.txt (r) breaks the image; the check must name it.
IMAGE_MUTATIONS = {
    "other torch": (lambda d, r: (d.replace("torch==2.13.0", "torch==2.12.1"), r), "constraints.txt pins"),
    "unpinned torch": (lambda d, r: (d.replace("torch==2.13.0", "torch"), r), "unpinned"),
    "missing source": (lambda d, r: (d.replace("COPY models/*.py models/", "COPY model/*.py models/"), r), "no such file"),
    "module left out": (lambda d, r: (d.replace("COPY services/backends/ services/backends/\n", ""), r),
                        "services/backends/inference.py"),
    "other numpy": (lambda d, r: (d, r.replace("numpy==", "numpy==1.")), "numpy"),
    "package left out": (lambda d, r: (d, r.replace("tqdm==4.70.1\n", "")), "imports tqdm"),
    "other python": (lambda d, r: (d.replace("FROM python:3.11-", "FROM python:3.12-"), r), "Python 3.11"),
    "no constraints": (lambda d, r: (d.replace(" -c /tmp/requirements/constraints.txt", ""), r), "under constraints"),
    "root": (lambda d, r: (d.replace("USER ${TRAINER_UID}", "# USER"), r), "as root"),
}


@pytest.mark.parametrize("mutation", sorted(IMAGE_MUTATIONS))
def test_the_image_check_catches_a_broken_dockerfile(mutation):
    mutate, expected = IMAGE_MUTATIONS[mutation]
    dockerfile, requirements = mutate(DOCKERFILE.read_text(), REQUIREMENTS.read_text())
    problems = image_problems(dockerfile, requirements, dockerignore_patterns())
    assert any(expected in problem for problem in problems), problems


def documented_overlays() -> list[str]:
    """The kustomization overlays the "Training on Kubernetes" section of docs/deploy.md shows."""
    section = DEPLOY_DOC.read_text().split("## Training on Kubernetes", 1)[1]
    return [textwrap.dedent(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.S) if "kind: Kustomization" in block]


def test_the_documented_overlays_render_a_sound_job(tmp_path):
    """The overlays that docs/deploy.md shows (a storage class; train on TREC, cv on MR) render,
    pass the wiring checks and the 1.27 schema, and the training CLI accepts their commands."""
    overlays = documented_overlays()
    assert len(overlays) == 3
    commands, storage_classes = set(), set()
    for number, text in enumerate(overlays):
        folder = tmp_path / f"overlay{number}"
        folder.mkdir()
        # The docs put the overlay beside deploy/k8s/training; here it lives in tmp_path.
        (folder / "kustomization.yaml").write_text(text.replace("../training", os.path.relpath(TRAINING, folder)))
        objects = render_folder(folder)
        assert wiring_problems(objects) == [], number
        for obj in objects:
            kubernetes_validate.validate(obj, OLDEST_KUBERNETES, strict=True)
        commands.add(torchrun_arguments(trainer(objects)).training_script_args[0])
        storage_classes.add(one(objects, "PersistentVolumeClaim")["spec"].get("storageClassName"))
    assert commands == {"train-lm", "train", "cv"} and storage_classes == {None, "nfs-client"}


# --- torchrun with the manifest's options, a node lost and replaced -----------------------------

PROBE = '''
"""A stand-in for the training module: steps of an all-reduce over gloo, the step count kept in a
file by rank 0 and read back on every start (as train-lm resumes its checkpoint)."""
import os, sys, time
from pathlib import Path
import torch
import torch.distributed as dist

state, steps = Path(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
step = int(state.read_text()) if state.exists() else 0
print(f"rank {rank} of {world} starts at step {step}", flush=True)
while step < steps:
    total = torch.ones(1)
    dist.all_reduce(total)
    assert total.item() == world
    step += 1
    if rank == 0:
        state.with_suffix(".tmp").write_text(str(step))
        os.replace(state.with_suffix(".tmp"), state)
    time.sleep(0.1)
dist.barrier()
print(f"rank {rank} done at step {step}", flush=True)
dist.destroy_process_group()
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts its workers in sessions of their own, so a
    process group is not enough: a lost pod loses every process of its container)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, stack = [], [pid]
    while stack:
        tree.append(stack.pop())
        stack += children.get(tree[-1], [])
    return tree


def kill_tree(pid: int) -> None:
    for member in process_tree(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def listening(port: int) -> bool:
    with socket.socket() as client:
        return client.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("as_in_the_manifest", [True, False], ids=["manifest-environment", "shared-store"])
def test_torchrun_with_the_manifests_options_survives_a_lost_node(rendered, tmp_path, as_in_the_manifest):
    """Two torchrun agents with the Job's options and torch settings (the endpoint on this machine
    instead of pod 0's name) run a gloo all-reduce loop; the second agent and its worker are
    killed mid-run, as a lost pod's processes are, and a new agent started, as the Job's
    replacement pod would be. The survivor restarts its worker (--max-restarts), both meet in a
    new rendezvous round, resume from the saved step and finish. Without
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (torchrun's default), the same run makes no progress
    after the loss: the replacement waits for a bootstrap address the survivor never publishes."""
    container = trainer(rendered["gpu"])
    torchrun = container["command"]
    port, steps, state = free_port(), 100, tmp_path / "step.txt"
    (tmp_path / "elastic_probe.py").write_text(PROBE)
    options = [f"--rdzv-endpoint=127.0.0.1:{port}" if option.startswith("--rdzv-endpoint=") else option
               for option in torchrun[1:torchrun.index("-m")]]
    command = [sys.executable, "-m", "torch.distributed.run", *options, "-m", "elastic_probe", str(state), str(steps)]
    torch_settings = {name: value for name, value in environment(container).items() if name.startswith("TORCH")}
    assert torch_settings == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if not as_in_the_manifest:
        torch_settings = {}
    variables = {name: value for name, value in os.environ.items() if not name.startswith("TORCH")}
    variables |= {**torch_settings, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", "LOGLEVEL": "WARNING"}

    def start(name: str) -> subprocess.Popen:
        with open(tmp_path / f"{name}.log", "w") as log:
            return subprocess.Popen(command, cwd=tmp_path, env=variables, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))

    def wait_until(condition, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not happen within {seconds} s\n{logs()}")
            time.sleep(0.2)

    def step() -> int:
        try:
            return int(state.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    agents = [start("node0")]
    try:
        # Node 0 first, so that it hosts the store (as pod 0 does); then node 1.
        wait_until(lambda: listening(port), 60, "node 0 hosting the store")
        agents.append(start("node1"))
        wait_until(lambda: step() >= 10, 120, "ten steps on two nodes")
        kill_tree(agents[1].pid)  # node 1 is lost: its agent and its worker die at once
        agents[1].wait(timeout=30)
        lost_at = step()
        assert lost_at < steps, "the run ended before node 1 was lost"
        agents.append(start("node1-replacement"))
        if not as_in_the_manifest:
            # Recovery takes about 15 s here (the lost node's heartbeats expire); give it three times that.
            time.sleep(45)
            # At most the step node 0 was writing when node 1 died: its next all-reduce needs node 1.
            assert step() <= lost_at + 1 and agents[0].poll() is None and agents[2].poll() is None, logs()
            return
        for agent in (agents[0], agents[2]):
            assert agent.wait(timeout=240) == 0, logs()
    finally:
        for agent in agents:
            kill_tree(agent.pid)
            agent.wait(timeout=30)
    assert step() == steps
    survivor, replacement = (tmp_path / "node0.log").read_text(), (tmp_path / "node1-replacement.log").read_text()
    resumed = [int(n) for n in re.findall(r"starts at step (\d+)", survivor + replacement) if int(n) > 0]
    assert len(resumed) >= 2 and min(resumed) >= lost_at - 1, logs()
    assert f"done at step {steps}" in survivor and f"done at step {steps}" in replacement, logs()
