"""What the deploy/ tests share: the real tools, the rendered manifests and the rules."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPOSITORY

DEPLOY = REPOSITORY / "deploy"
K8S = DEPLOY / "k8s"
TOOLS_BIN = REPOSITORY / ".venv-tools" / "bin"
# kustomize folder -> extra `kubectl kustomize` flags (Locust's ConfigMap reads loadtests/).
RENDERINGS = {
    "cpu": (K8S / "overlays" / "cpu", []),
    "gpu": (K8S / "overlays" / "gpu", []),
    "kserve": (K8S / "kserve", []),
    "locust": (K8S / "locust", ["--load-restrictor=LoadRestrictionsNone"]),
}
PROMETHEUS_RULE = K8S / "base" / "prometheusrule.yaml"
DASHBOARD = K8S / "base" / "grafana" / "textserve-dashboard.json"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
UNIT_TESTS = DEPLOY / "prometheus" / "alerts_test.yaml"


def tool(name: str) -> str:
    """The path of a command-line tool. Where it is missing: a skip that says how to get it;
    under .ci/run (TEXTSERVE_REQUIRE_DEPLOY_TOOLS=1, which installs them) a failure, except for
    kubectl, which no Debian package provides."""
    found = shutil.which(name) or (str(TOOLS_BIN / name) if (TOOLS_BIN / name).is_file() else None)
    if found:
        return found
    how = {
        "kubectl": "kubectl with kustomize is on this project's machine image; elsewhere install it from kubernetes.io",
        "promtool": "apt-get install --no-install-recommends prometheus (Debian's package; .ci/run does this)",
        "prometheus": "apt-get install --no-install-recommends prometheus (Debian's package; .ci/run does this)",
        "checkov": "make test builds .venv-tools with checkov (deploy/tools-constraints.txt)",
    }[name]
    if os.environ.get("TEXTSERVE_REQUIRE_DEPLOY_TOOLS") == "1" and name != "kubectl":
        pytest.fail(f"{name} is required here and missing: {how}")
    pytest.skip(f"{name} is not installed, so this deploy check cannot run: {how}")


def render(name: str) -> list[dict]:
    """`kubectl kustomize` of one of RENDERINGS, as objects."""
    folder, flags = RENDERINGS[name]
    return render_folder(folder, flags)


def render_folder(folder: Path, flags: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """`kubectl kustomize` of any kustomization folder, as objects."""
    result = subprocess.run([tool("kubectl"), "kustomize", *flags, str(folder)], capture_output=True, text=True)
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def policy_scan(renderings: dict[str, list[dict]], folder: Path) -> tuple[list, list, int]:
    """checkov's Kubernetes checks over rendered objects, offline (--skip-download: the built-in
    policies only): (failed (check, resource)), (skipped (check, resource, reason)), passed count."""
    import json

    files = []
    for name, objects in renderings.items():
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        files += ["--file", str(path)]
    result = subprocess.run([tool("checkov"), "--skip-download", "--framework", "kubernetes", "--output", "json", *files],
                            capture_output=True, text=True, cwd=folder)
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(check["check_id"], check["resource"]) for r in reports for check in r["results"]["failed_checks"]]
    skipped = [(check["check_id"], check["resource"], check.get("check_result", {}).get("suppress_comment", ""))
               for r in reports for check in r["results"]["skipped_checks"]]
    return failed, skipped, sum(len(r["results"]["passed_checks"]) for r in reports)


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def rule_groups() -> dict:
    """The PrometheusRule's spec: a plain Prometheus rule file (groups: ...)."""
    return yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]


def write_rule_file(folder: Path, interval: str | None = None) -> Path:
    """The rules as the file promtool and Prometheus read; `interval` overrides every group's."""
    groups = rule_groups()
    if interval is not None:
        for group in groups["groups"]:
            group["interval"] = interval
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump(groups, sort_keys=False))
    return path


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def adapter_query(rule: dict, namespace: str, pods: list[str]) -> str:
    """The PromQL prometheus-adapter sends for the HPA's metric, its template filled in as the
    adapter fills it for a pods query in one namespace."""
    series = rule["seriesQuery"].split("{")[0]
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers) \
        .replace("<<.GroupBy>>", "pod")


def dashboard_queries(model: str = ".*", rate_interval: str = "1m") -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target, Grafana's variables filled in."""
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"].replace("$__rate_interval", rate_interval).replace("$model", model))
            for panel in dashboard["panels"] for target in panel["targets"]]


def alert_and_record_queries() -> list[tuple[str, str]]:
    """(rule name, PromQL) of every recording rule and alert."""
    return [(rule.get("record") or rule["alert"], rule["expr"]) for group in rule_groups()["groups"] for rule in group["rules"]]


def selector_names(expression) -> set[str]:
    """Metric names of every vector selector in a promql_parser AST."""
    import promql_parser

    names: set[str] = set()
    stack = [expression]
    while stack:
        node = stack.pop()
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            continue
        for attribute in ("lhs", "rhs", "expr", "vector_selector", "param"):
            child = getattr(node, attribute, None)
            if child is not None and not isinstance(child, (str, int, float)):
                stack.append(child)
        if isinstance(node, promql_parser.Call):
            stack.extend(node.args)
    return names


def assert_policy_scan_clean(renderings: dict[str, list[dict]], folder: Path, justified_skips: set[str], least_passed: int) -> None:
    """checkov finds nothing, skips only `justified_skips` (each with a reason in the manifest) and
    ran at least `least_passed` checks (fewer: it did not parse the manifests)."""
    failed, skipped, passed = policy_scan(renderings, folder)
    assert failed == [], f"checkov findings: {failed}"
    assert passed > least_passed, "checkov ran few checks: did it parse the manifests?"
    assert {check for check, _, _ in skipped} == justified_skips
    assert all(len(reason) > 20 for _, _, reason in skipped), skipped
