"""The Grafana dashboard and the Prometheus alerts use only metrics that a real server exports, and the alerts
cover what they promise. The server is `tandem serve` with the shipped model; it gets one call of each kind
first, because labelled series appear only once something is counted."""

from __future__ import annotations

import json
import re
import urllib.request

import grpc
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from server.client import TandemClient, TandemError
from tests.conftest import ROOT, png_bytes
from tests.deploy.conftest import MAX_QUEUE_ROWS, Served
from tests.deploy.parse import promql_metric_names

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "tandem.json"

# Series that come from elsewhere than the server, by who exports them.
NOT_FROM_THE_SERVER = {
    "up": "Prometheus itself, per scrape target",
    "kube_pod_container_status_restarts_total": "kube-state-metrics",
    "kube_pod_container_resource_limits": "kube-state-metrics",
    "container_memory_working_set_bytes": "the kubelet's cAdvisor",
}
CLIENT_CODES = ("CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "NOT_FOUND")
SERVER_CODES = ("INTERNAL", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "UNKNOWN", "DATA_LOSS")


def alert_rules() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}


def dashboard_queries() -> dict[str, str]:
    dash = json.loads(DASHBOARD.read_text())
    queries = {f"panel {p['title']!r} {t['refId']}": t["expr"]
               for p in dash["panels"] for t in p.get("targets", [])}
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            queries[f"variable {v['name']}"] = v["query"]["query"]
    return queries


def test_metric_names_are_read_from_promql() -> None:
    """The reader below must find metrics and only metrics, or the export check proves nothing."""
    expr = ('histogram_quantile(0.99, sum by (le, method) (rate(tandem_request_seconds_bucket{method=~"Embed.*"}'
            '[$__rate_interval]))) / on (pod) group_left max by (pod) (kube_pod_container_resource_limits'
            '{resource="memory"}) > 2 * avg_over_time(process_resident_memory_bytes[6h] offset 1h) and up == 0')
    assert promql_metric_names(expr) == {"tandem_request_seconds_bucket", "kube_pod_container_resource_limits",
                                         "process_resident_memory_bytes", "up"}
    assert promql_metric_names('label_values(tandem_model_info{job=~"$job"}, instance)') == {"tandem_model_info"}


def exported(served: Served) -> set[str]:
    """Sample names on /metrics after one call of each kind (and one refused search)."""
    image = png_bytes(Image.new("RGB", (64, 64), (200, 30, 30)))
    with TandemClient(served.target) as c:
        c.embed_text(["a small red circle"])
        c.embed_image([image])
        c.classify([image], ["red circle", "blue square"])
        c.create_collection("shapes")
        c.upsert("shapes", [{"id": "a", "text": "a red circle"}, {"id": "b", "image": image}])
        c.search("shapes", "red", top_k=1)
        with pytest.raises(TandemError):
            c.get_model("no-such-model")
        # More text terms in one search than the text queue holds: refused up front, before any work.
        with pytest.raises(TandemError) as refused:
            c.search("shapes", [(1.0, f"word {i}") for i in range(MAX_QUEUE_ROWS + 1)])
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_queue_rows" in str(refused.value)
    body = urllib.request.urlopen(served.metrics_url, timeout=10).read().decode()
    return {s.name for family in text_string_to_metric_families(body) for s in family.samples}


def test_dashboard_and_alerts_use_only_exported_metrics(served: Served) -> None:
    have = exported(served)
    used = {where: promql_metric_names(expr) for where, expr in {**alert_rules(), **dashboard_queries()}.items()}
    assert all(used.values()), [where for where, names in used.items() if not names]
    missing = {where: sorted(names - have - set(NOT_FROM_THE_SERVER)) for where, names in used.items()}
    assert not any(missing.values()), {w: m for w, m in missing.items() if m}
    # Every server metric family has a place on the dashboard.
    on_dashboard = set().union(*(promql_metric_names(e) for e in dashboard_queries().values()))
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in have if n.startswith("tandem_")}
    shown = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in on_dashboard}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"


def server_fault_regex(expr: str) -> re.Pattern[str]:
    (regex,) = re.findall(r'code!~"([^"]+)"', expr)
    return re.compile(regex)


@pytest.mark.parametrize("where", ["alert", "dashboard"])
def test_error_ratio_leaves_out_client_cancellations_and_bad_input(where: str) -> None:
    if where == "alert":
        expr = alert_rules()["TandemHighErrorRatio"]
    else:
        (expr,) = [e for w, e in dashboard_queries().items() if "Server-side error ratio" in w]
    left_out = server_fault_regex(expr)
    assert all(left_out.fullmatch(code) for code in ("OK", *CLIENT_CODES)), left_out.pattern
    assert not any(left_out.fullmatch(code) for code in SERVER_CODES), left_out.pattern


def test_alerts_cover_targets_memory_restarts_and_errors() -> None:
    rules = alert_rules()
    uses = {name: promql_metric_names(expr) for name, expr in rules.items()}

    def alerting_on(metric: str) -> list[str]:
        return [name for name, names in uses.items() if metric in names]

    assert alerting_on("up"), "target down"
    assert alerting_on("container_memory_working_set_bytes") and alerting_on("process_resident_memory_bytes")
    assert alerting_on("kube_pod_container_status_restarts_total"), "restarts"
    assert alerting_on("tandem_requests_total"), "error rate"
    assert alerting_on("tandem_queue_rejected_total") and alerting_on("tandem_request_seconds_bucket")
    for r in (r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]):
        assert r["labels"]["severity"] in ("critical", "warning", "info") and r["annotations"]["summary"], r["alert"]


def test_the_dashboard_is_importable_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
