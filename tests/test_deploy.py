"""deploy/k8s and the rules, validated offline with the real tools: kubectl kustomize, the
Kubernetes schemas (kubernetes-validate, strict, at the oldest and newest versions), checkov,
promtool, promql-parser, and cross-resource checks. The live half (a running service scraped
by a real Prometheus) is test_deploy_monitoring.py."""

from __future__ import annotations

import copy
import json
import re
import subprocess

import kubernetes_validate
import promql_parser
import pytest

from tests.conftest import REPOSITORY
from tests.deploy_tools import (
    DASHBOARD, RENDERINGS, UNIT_TESTS, adapter_query, adapter_rule, alert_and_record_queries,
    assert_policy_scan_clean, dashboard_queries, one, render, rule_groups, selector_names, tool, write_rule_file,
)

# The oldest Kubernetes we support (HPA autoscaling/v2, PDB policy/v1 and every field used are
# there), and the newest schemas kubernetes-validate knows (catches removed APIs).
OLDEST_KUBERNETES = "1.27.0"
NEWEST_KUBERNETES = "1.37.0"
# Custom resources: the Kubernetes schemas do not cover them, and no CRD schema is available
# offline. Their content is checked by the tools that read it (promtool for the rules) and by
# the cross-resource checks below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PrometheusRule"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
                ("serving.kserve.io/v1beta1", "InferenceService")}
# Findings of the policy scan left by choice; the reason is in the manifest's annotation.
JUSTIFIED_SKIPS = {"CKV_K8S_43"}  # image digest: the overlays pin a tag, a release pins the digest


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(name) for name in RENDERINGS}


def pod_spec(objects: list[dict]) -> dict:
    return one(objects, "Deployment", "textserve")["spec"]["template"]["spec"]


def container(objects: list[dict]) -> dict:
    (server,) = pod_spec(objects)["containers"]
    return server


def environment(server: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in server.get("env", [])}


def test_every_rendering_has_the_objects_a_deployment_needs(rendered):
    for overlay in ("cpu", "gpu"):
        kinds = sorted(o["kind"] for o in rendered[overlay])
        assert kinds == sorted(["Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
                                "NetworkPolicy", "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"]), overlay
        assert {o["metadata"].get("namespace") for o in rendered[overlay] if o["kind"] != "Namespace"} == {"textserve"}
    assert [o["kind"] for o in rendered["kserve"]] == ["InferenceService"]
    assert sorted(o["kind"] for o in rendered["locust"]) == ["ConfigMap", "Deployment", "Deployment", "NetworkPolicy", "Service"]


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
def test_every_core_object_passes_strict_schema_validation(rendered, version):
    custom = set()
    for name, objects in rendered.items():
        for obj in objects:
            if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
                custom.add((obj["apiVersion"], obj["kind"]))
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version}: {error.message}")
    assert custom == CUSTOM_KINDS


def test_strict_validation_at_the_oldest_version_rejects_what_it_lacks(rendered):
    """The check can fail: a field added in 1.29 (preStop's sleep action) and a misspelt field
    are refused; the sleep action passes at the newest version."""
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"] = {"sleep": {"seconds": 10}}
    with pytest.raises(kubernetes_validate.ValidationError, match="'sleep' was unexpected"):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)
    kubernetes_validate.validate(deployment, NEWEST_KUBERNETES, strict=True)
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 60
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriodSecond"):
        kubernetes_validate.validate(deployment, NEWEST_KUBERNETES, strict=True)


def test_policy_scan_finds_nothing_but_the_justified_skips(rendered, tmp_path):
    assert_policy_scan_clean(rendered, tmp_path, JUSTIFIED_SKIPS, least_passed=50)


def test_service_monitor_service_pods_pdb_and_hpa_point_at_each_other(rendered):
    for overlay in ("cpu", "gpu"):
        objects = rendered[overlay]
        service, deployment = one(objects, "Service"), one(objects, "Deployment")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        selects_pods = lambda selector: all(pod_labels.get(k) == v for k, v in selector.items())  # noqa: E731
        assert selects_pods(deployment["spec"]["selector"]["matchLabels"])
        assert selects_pods(service["spec"]["selector"])
        assert selects_pods(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
        assert selects_pods(one(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
        monitor = one(objects, "ServiceMonitor")
        assert all(service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
        service_ports = {port["name"]: port for port in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in service_ports, f"ServiceMonitor port {endpoint['port']} is not a Service port name"
        server = container(objects)
        container_ports = {port["name"]: port["containerPort"] for port in server["ports"]}
        assert all(port["targetPort"] in container_ports for port in service_ports.values())
        assert container_ports["http"] == 3000 and "--port" in server["args"] and server["args"][server["args"].index("--port") + 1] == "3000"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert server[probe]["httpGet"]["port"] in container_ports
            assert server[probe]["httpGet"]["path"].startswith("/v2/health/")
        hpa = one(objects, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count; apply would reset it"


def test_hpa_metric_is_the_adapters_metric_read_from_a_recording_rule(rendered):
    rule = adapter_rule()
    recorded = {r["record"]: r["expr"] for g in rule_groups()["groups"] for r in g["rules"] if "record" in r}
    series = rule["seriesQuery"].split("{")[0]
    assert series in recorded
    assert re.fullmatch(rule["name"]["matches"], series)
    for overlay in ("cpu", "gpu"):
        hpa = one(rendered[overlay], "HorizontalPodAutoscaler")
        kinds = {metric["type"]: metric for metric in hpa["spec"]["metrics"]}
        assert kinds["Pods"]["pods"]["metric"]["name"] == rule["name"]["as"]
        assert kinds["Resource"]["resource"]["name"] == "cpu"  # the fallback
    query = adapter_query(rule, "textserve", ["textserve-a", "textserve-b"])
    assert query == 'sum by (pod) (textserve:requests_in_flight:rate1m{namespace="textserve",pod=~"textserve-a|textserve-b"})'
    promql_parser.parse(query)


def test_gpu_only_in_the_gpu_overlay_with_the_cuda_provider_requested(rendered):
    cpu, gpu = container(rendered["cpu"]), container(rendered["gpu"])
    assert "nvidia.com/gpu" not in json.dumps(rendered["cpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert environment(gpu)["TEXTSERVE_DEVICE"] == "cuda" and environment(cpu)["TEXTSERVE_DEVICE"] == "cpu"
    gpu_pod = pod_spec(rendered["gpu"])
    assert gpu_pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert "tolerations" not in pod_spec(rendered["cpu"])
    assert cpu["image"].startswith("registry.example.com/textserve:") and gpu["image"].startswith("registry.example.com/textserve-gpu:")


def test_termination_drains_and_the_pod_runs_locked_down(rendered):
    for overlay in ("cpu", "gpu"):
        pod, server = pod_spec(rendered[overlay]), container(rendered[overlay])
        pre_stop_sleep = int(server["lifecycle"]["preStop"]["exec"]["command"][1])
        request_timeout = int(environment(server)["TEXTSERVE_REQUEST_TIMEOUT_S"])
        # Endpoints drop the pod during preStop; in-flight requests then have their whole timeout.
        assert pod["terminationGracePeriodSeconds"] > pre_stop_sleep + request_timeout
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] >= 10000
        assert server["securityContext"]["readOnlyRootFilesystem"] is True
        assert server["securityContext"]["allowPrivilegeEscalation"] is False
        assert server["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert pod["automountServiceAccountToken"] is False
        writable = {mount["mountPath"] for mount in server["volumeMounts"]}
        assert environment(server)["BENTOML_HOME"] in writable and "/tmp" in writable
        assert server["resources"]["limits"]["cpu"] == server["resources"]["requests"]["cpu"]  # workers follow the limit


def test_grpc_has_its_named_port_service_port_and_network_policy_and_keys_come_from_a_secret(rendered):
    for overlay in ("cpu", "gpu"):
        objects, server = rendered[overlay], container(rendered[overlay])
        ports = {port["name"]: port["containerPort"] for port in server["ports"]}
        assert ports["grpc"] == int(environment(server)["TEXTSERVE_GRPC_PORT"])
        service_ports = {port["name"]: port for port in one(objects, "Service", "textserve")["spec"]["ports"]}
        assert service_ports["grpc"]["targetPort"] == "grpc" and service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
        admitted = {port["port"] for rule in one(objects, "NetworkPolicy", "textserve")["spec"]["ingress"] for port in rule["ports"]}
        assert {"http", "grpc"} <= admitted
        mounts = {mount["name"]: mount["mountPath"] for mount in server["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in pod_spec(objects)["volumes"]}
        assert volumes["keys"]["secret"]["secretName"] == "textserve-keys"
        for variable, file_name in (("TEXTSERVE_API_KEYS", "api-keys"), ("TEXTSERVE_ADMIN_KEYS", "admin-keys")):
            assert environment(server)[variable] == f"@{mounts['keys']}/{file_name}"
        # The kubelet's probes need no key (services/http/access.py keeps /v2/health/* open).
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert server[probe]["httpGet"]["path"].startswith("/v2/health/")


def test_kserve_runs_the_same_image_and_protocol(rendered):
    (service,) = rendered["kserve"]
    (predictor,) = service["spec"]["predictor"]["containers"]
    assert predictor["image"] == container(rendered["cpu"])["image"]
    port = predictor["ports"][0]["containerPort"]
    assert predictor["args"][predictor["args"].index("--port") + 1] == str(port)
    assert predictor["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}


def test_locust_runs_the_repositorys_scenarios_against_the_in_cluster_service(rendered):
    objects = rendered["locust"]
    config = one(objects, "ConfigMap")
    assert config["data"]["locustfile.py"] == (REPOSITORY / "loadtests" / "locustfile.py").read_text()
    pinned = re.search(r"^locust==(\S+)$", (REPOSITORY / "constraints.txt").read_text(), re.M).group(1)
    service = one(rendered["cpu"], "Service")
    target = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{service['spec']['ports'][0]['port']}"
    master, worker = one(objects, "Deployment", "locust-master"), one(objects, "Deployment", "locust-worker")
    for deployment in (master, worker):
        (locust,) = deployment["spec"]["template"]["spec"]["containers"]
        assert locust["image"] == f"locustio/locust:{pinned}"
        assert "/mnt/locust/locustfile.py" in locust["args"]
    (locust,) = master["spec"]["template"]["spec"]["containers"]
    assert locust["args"][locust["args"].index("--host") + 1] == target
    (locust,) = worker["spec"]["template"]["spec"]["containers"]
    assert locust["args"][locust["args"].index("--master-host") + 1] == one(objects, "Service", "locust-master")["metadata"]["name"]


def test_dashboard_ships_as_a_configmap_and_covers_what_users_watch(rendered):
    dashboard = json.loads(DASHBOARD.read_text())
    config = one(rendered["cpu"], "ConfigMap", "textserve-grafana-dashboard")
    assert json.loads(config["data"]["textserve-dashboard.json"]) == dashboard
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("requests per second", "latency quantiles", "batch", "queue time", "status code"):
        assert topic in titles
    assert any(variable["name"] == "model" for variable in dashboard["templating"]["list"])
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))


def test_every_query_of_the_dashboard_rules_and_adapter_parses():
    queries = dashboard_queries() + alert_and_record_queries() + [("adapter", adapter_query(adapter_rule(), "textserve", ["p"]))]
    for name, query in queries:
        try:
            promql_parser.parse(query)
        except ValueError as error:
            pytest.fail(f"{name}: {query!r} does not parse: {error}")
    with pytest.raises(ValueError):  # the parser does refuse bad PromQL
        promql_parser.parse("sum(rate(textserve_requests_total[1m])")
    names = set().union(*(selector_names(promql_parser.parse(q)) for _, q in queries))
    assert {"textserve_requests_total", "textserve_request_duration_seconds_bucket", "textserve_batch_texts_bucket",
            "textserve_queue_wait_seconds_bucket", "textserve_model_loaded"} <= names


def test_rules_pass_promtool_check_and_their_unit_tests(tmp_path):
    promtool = tool("promtool")
    rules = write_rule_file(tmp_path)
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 10 rules found" in checked.stdout
    (tmp_path / UNIT_TESTS.name).write_text(UNIT_TESTS.read_text())
    tested = subprocess.run([promtool, "test", "rules", str(tmp_path / UNIT_TESTS.name)], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_promtool_unit_tests_fail_when_a_threshold_changes(tmp_path):
    """The unit tests can fail: with the error alert at 5 % instead of 1 %, the 1.96 % case no
    longer fires and promtool says so."""
    promtool = tool("promtool")
    rules = write_rule_file(tmp_path)
    rules.write_text(rules.read_text().replace("textserve:errors:ratio_rate5m > 0.01", "textserve:errors:ratio_rate5m > 0.05"))
    (tmp_path / UNIT_TESTS.name).write_text(UNIT_TESTS.read_text())
    tested = subprocess.run([promtool, "test", "rules", str(tmp_path / UNIT_TESTS.name)], capture_output=True, text=True)
    assert tested.returncode != 0 and "TextserveErrorRatioHigh" in tested.stdout + tested.stderr
