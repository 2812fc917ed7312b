"""The monitoring half of deploy/, live: the running service's /metrics through `promtool check
metrics`, and a real Prometheus server (Debian's) on 127.0.0.1 scraping it, evaluating the
PrometheusRule's recording rules and alerts and answering the exact PromQL of the HPA's
adapter, the alerts and the dashboard."""

from __future__ import annotations

import concurrent.futures
import subprocess
import time

import promql_parser
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ZOO
from tests.deploy_tools import (
    adapter_query, adapter_rule, alert_and_record_queries, dashboard_queries, one, render, selector_names, tool,
    write_rule_file,
)
from tests.serving import free_port, running_server

NAMESPACE, POD = "textserve", "textserve-local-0"  # what Kubernetes service discovery would label
CLIENTS = 4
TRAFFIC_SECONDS = 6.0
# Not exported by the service, and meant that way: Prometheus's own per-target `up`, and
# kube-state-metrics' Deployment availability (the no-ready-replica alert, with `up` as its fallback).
NOT_FROM_THE_SERVICE = {"up", "kube_deployment_status_replicas_available"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("bentoml_home"), ZOO, http_workers="2",
                        models="kim-cnn-trec6,char-lm-small-ptb") as url:
        yield url


def send_traffic(url: str) -> dict[int, int]:
    """CLIENTS closed-loop clients for TRAFFIC_SECONDS: classifications, LM scores, and some
    bad requests (400, 404) so that the error series exist. Returns the count per status."""
    bodies = [
        ("/classify", {"model": "kim-cnn-trec6", "texts": ["How far is the moon from the earth ?"] * 4}),
        ("/lm/score", {"model": "char-lm-small-ptb", "texts": ["the market fell sharply on monday"]}),
        ("/classify", {"model": "no-such-model", "texts": ["x"]}),
        ("/classify", {"model": "kim-cnn-trec6", "texts": []}),
    ]
    deadline = time.monotonic() + TRAFFIC_SECONDS

    def client(index: int) -> list[int]:
        statuses = []
        with requests.Session() as session:
            while time.monotonic() < deadline:
                path, body = bodies[len(statuses) % len(bodies)] if index == 0 else bodies[len(statuses) % 2]
                statuses.append(session.post(url + path, json=body, timeout=30).status_code)
        return statuses

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        statuses = [s for result in pool.map(client, range(CLIENTS)) for s in result]
    return {status: statuses.count(status) for status in set(statuses)}


@pytest.fixture(scope="module")
def traffic(server):
    counts = send_traffic(server)
    assert counts.get(200, 0) > 20 and counts.get(404, 0) > 0 and counts.get(400, 0) > 0, counts
    return counts


@pytest.fixture(scope="module")
def prometheus(server, traffic, tmp_path_factory):
    """Debian's Prometheus scraping the service every second, with the PrometheusRule's rules
    (their group interval set to 1 s here so that the test need not wait 15 s per evaluation;
    the expressions are the shipped ones). Its URL once the recording rules have data."""
    binary = tool("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    rules = write_rule_file(folder, interval="1s")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{
            "job_name": "textserve",  # the job the ServiceMonitor gives: the Service's name
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [server.removeprefix("http://")], "labels": {"namespace": NAMESPACE, "pod": POD}}],
        }],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(folder / "prometheus.log", "w")
    process = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (folder / "prometheus.log").read_text()[-3000:]
            try:
                if query(url, "textserve:requests_in_flight:rate1m"):
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "no recording rule data in 60 s:\n" + (folder / "prometheus.log").read_text()[-3000:]
            send_traffic(server)  # keep the rates alive while Prometheus gathers two scrapes
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def query(url: str, promql: str) -> list[dict]:
    """An instant query; the result vector (an error from Prometheus fails the test)."""
    answer = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", f"{promql!r}: {answer}"
    return answer["data"]["result"]


def test_promtool_check_metrics_passes_on_a_live_scrape(server, traffic):
    promtool = tool("promtool")
    scrape = requests.get(f"{server}/metrics", timeout=10).text
    assert "textserve_requests_total" in scrape
    checked = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.strip() == "", checked.stdout + checked.stderr
    # The lint does find problems where there are some: a counter without _total.
    bad = "# HELP textserve_things Things.\n# TYPE textserve_things counter\ntextserve_things 1\n"
    linted = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, text=True)
    assert linted.returncode != 0 and "_total" in linted.stdout + linted.stderr


def test_probes_of_the_manifests_answer_on_the_running_service(server):
    deployment = one(render("cpu"), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert requests.get(server + path, timeout=5).status_code == 200, path


def test_every_metric_the_queries_name_is_exported_by_the_service(server, traffic):
    scraped = {sample.name for family in text_string_to_metric_families(requests.get(f"{server}/metrics", timeout=10).text)
               for sample in family.samples}
    recorded = {name for name, _ in alert_and_record_queries() if ":" in name}
    for source, queries in (("dashboard", dashboard_queries()), ("rules", alert_and_record_queries()),
                            ("adapter", [("adapter", adapter_query(adapter_rule(), NAMESPACE, [POD]))])):
        for title, promql in queries:
            unknown = selector_names(promql_parser.parse(promql)) - scraped - recorded - NOT_FROM_THE_SERVICE
            assert not unknown, f"{source} {title!r} names metrics the service does not export: {unknown}"


def test_prometheus_evaluates_every_rule_without_error_and_no_alert_fires(prometheus):
    groups = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 10
    deadline = time.monotonic() + 20
    while any(rule.get("lastEvaluation", "").startswith("0001") for rule in rules) and time.monotonic() < deadline:
        time.sleep(1)
        rules = [rule for group in requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"] for rule in group["rules"]]
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    alerts = requests.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    # 4xx are the clients' mistakes, every model loaded, the pod is scraped, p99 is far under 1 s.
    assert alerts == [], alerts


def test_prometheus_answers_the_hpa_adapters_query_with_the_in_flight_requests(prometheus):
    (sample,) = query(prometheus, adapter_query(adapter_rule(), NAMESPACE, [POD]))
    assert sample["metric"] == {"pod": POD}
    in_flight = float(sample["value"][1])
    # Closed-loop clients: the server holds at most one request per client at a time.
    assert 0.0 < in_flight <= CLIENTS + 0.5, in_flight


def test_prometheus_answers_every_alert_and_dashboard_query(prometheus):
    for name, promql in alert_and_record_queries():
        query(prometheus, promql)  # evaluates without error
    answered = {title: query(prometheus, promql) for title, promql in dashboard_queries()}
    for title in ("Requests per second, by model", "Latency quantiles, by model", "Texts per adaptive batch (all models)",
                  "Queue time before a batch starts (all models)", "Errors and refusals by status code, by model",
                  "Models loaded (1) or failed to load (0), lowest over pods"):
        assert answered[title], f"{title}: no data from the live service"
    loaded = {s["metric"]["model"]: float(s["value"][1]) for s in query(prometheus, 'min by (model) (textserve_model_loaded{job="textserve"})')}
    assert loaded == {"kim-cnn-trec6": 1.0, "char-lm-small-ptb": 1.0}
    statuses = {s["metric"]["status"] for s in query(prometheus, 'sum by (status) (textserve_requests_total{job="textserve"})')}
    assert {"200", "400", "404"} <= statuses
    # The model=~"$model" variable: one model selected leaves only its series.
    (title, promql) = next(q for q in dashboard_queries(model="kim-cnn-trec6") if q[0] == "Requests per second, by model")
    assert {s["metric"].get("model") for s in query(prometheus, promql)} == {"kim-cnn-trec6"}
