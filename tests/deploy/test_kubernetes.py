"""The Kustomize overlays render, every object is valid for Kubernetes, and the properties that make the deployment
safe are there: so that removing one (a probe, the read-only root, the metrics port kept off the public Service)
fails here instead of in someone's cluster.

Rendered with `kubectl kustomize`, validated offline with kubernetes-validate (strict: unknown fields are
errors) against the oldest Kubernetes these files support (1.27: gRPC probes GA) and the newest schema it has.
The ServiceMonitor is a CRD without a schema here; its fields are checked one by one.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.app import SERVICES
from server.config import ServerConfig, load
from tests.conftest import ROOT
from tests.deploy.parse import dockerfile_stages, exec_form, parse_serve_flags

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate)")
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl is not installed: the Kustomize overlays cannot be rendered")

KUSTOMIZE = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.27", "1.37")
OVERLAYS = ("dev", "production", "production+queue-depth-hpa")
HEALTH_NAMES = {"", *SERVICES}  # what grpc.health.v1 answers for, as server/app.py registers them
DATA_DIR = "/var/lib/tandem"


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    if overlay == "production+queue-depth-hpa":
        # The optional component on top of production, from a kustomization of our own.
        tmp = Path(tempfile.mkdtemp(prefix="tandem-kustomize-"))
        (tmp / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(KUSTOMIZE / "overlays" / "production", tmp)],
            "components": [os.path.relpath(KUSTOMIZE / "components" / "queue-depth-hpa", tmp)]}))
        folder = tmp
    else:
        folder = KUSTOMIZE / "overlays" / overlay
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {folder} failed:\n{out.stderr}"
    if overlay == "production+queue-depth-hpa":
        shutil.rmtree(folder)
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in render(overlay) if o["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects(overlay, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(overlay: str) -> list[dict[str, Any]]:
    return objects(overlay, "Deployment") + objects(overlay, "StatefulSet")


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pods_of(overlay: str, selector: dict[str, str]) -> list[str]:
    return [w["metadata"]["name"] for w in workloads(overlay)
            if selects(selector, w["spec"]["template"]["metadata"]["labels"])]


def image_entrypoint() -> list[str]:
    final = dockerfile_stages(ROOT / "deploy" / "Dockerfile")[-1]
    return exec_form(final.last("ENTRYPOINT") or "")


def serve_flags(workload: dict[str, Any]) -> list[str]:
    """The flags `tandem serve` gets in this workload: the image's entrypoint, then the container's args."""
    entry = image_entrypoint()
    assert "command" not in container(workload), "a command would replace the image's tini + tandem serve"
    return entry[entry.index("serve") + 1:] + container(workload).get("args", [])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_for_kubernetes(overlay: str) -> None:
    kinds = {o["kind"] for o in render(overlay)}
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "NetworkPolicy", "ConfigMap", "ServiceAccount", "Namespace"} <= kinds
    for obj in render(overlay):
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: test_the_service_monitor_scrapes_the_metrics_service
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                raise AssertionError(f"{overlay}: {obj['kind']} {obj['metadata']['name']} is not valid for "
                                     f"Kubernetes {version} at {path}: {e.message}") from None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_locked_down(overlay: str) -> None:
    for w in workloads(overlay):
        name, pod = w["metadata"]["name"], w["spec"]["template"]["spec"]
        c = container(w)
        assert pod["automountServiceAccountToken"] is False, name
        assert one(overlay, "ServiceAccount", pod["serviceAccountName"])["automountServiceAccountToken"] is False
        # Service links would put TANDEM_PORT=tcp://... into the environment, which the server reads as its port.
        assert pod["enableServiceLinks"] is False, name
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, name
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault", name
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged", False) is False, name
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
        assert "limits" in c["resources"] and c["resources"]["limits"]["memory"], name
        # A read-only root leaves the server two writable places: /tmp and data_dir.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], name
        assert parse_serve_flags(serve_flags(w)).data_dir == DATA_DIR, name
        assert DATA_DIR in mounts, f"{name}: nothing mounted at data_dir {DATA_DIR}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_three_probes_ask_three_questions(overlay: str) -> None:
    """startup: everything loaded and warm; readiness: this tier's service; liveness: the process answers."""
    for w in workloads(overlay):
        name, c = w["metadata"]["name"], container(w)
        grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        services = {}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[kind]
            handlers = {"grpc", "exec", "httpGet", "tcpSocket"} & set(probe)
            assert len(handlers) == 1, f"{name} {kind} has handlers {handlers}"
            if "grpc" in probe:
                assert probe["grpc"]["port"] == grpc_port, f"{name} {kind} probes another port"
                services[kind] = probe["grpc"].get("service", "")
            else:
                cmd = probe["exec"]["command"]
                assert cmd[0] == "tandem-healthcheck", f"{name} {kind}: {cmd}"
                services[kind] = cmd[cmd.index("--service") + 1]
            assert services[kind] in HEALTH_NAMES, f"{name} {kind}: the server has no health service {services[kind]!r}"
        assert services["startupProbe"] == "", f"{name}: startup must wait for everything"
        assert services["readinessProbe"] == {"Deployment": "tandem.v1.Inference",
                                              "StatefulSet": "tandem.v1.Collections"}[w["kind"]], name
        assert services["livenessProbe"] not in (services["startupProbe"], services["readinessProbe"]), name
        startup, ready, live = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, f"{name}: under 5 min to load and warm"
        # Readiness takes a pod out of rotation well before liveness would restart it.
        assert (ready["periodSeconds"] * ready["failureThreshold"]
                < live["periodSeconds"] * live["failureThreshold"]), name
        assert c["lifecycle"]["preStop"], f"{name}: no preStop delay before SIGTERM"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_scales_out_and_survives_disruptions(overlay: str) -> None:
    d = one(overlay, "Deployment", "tandem")
    labels = d["spec"]["template"]["metadata"]["labels"]
    (hpa,) = [h for h in objects(overlay, "HorizontalPodAutoscaler")
              if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tandem"}]
    assert hpa["spec"]["minReplicas"] >= 2
    assert d["spec"].get("replicas", hpa["spec"]["minReplicas"]) >= 2  # left out on purpose: the HPA owns it
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    terms = d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    terms = [t["podAffinityTerm"] for t in terms.get("preferredDuringSchedulingIgnoredDuringExecution", [])] \
        + terms.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and selects(t["labelSelector"]["matchLabels"], labels)
               for t in terms), "replicas are not kept apart"
    (pdb,) = [p for p in objects(overlay, "PodDisruptionBudget") if selects(p["spec"]["selector"]["matchLabels"], labels)]
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable", 0) < hpa["spec"]["minReplicas"]
    assert pods_of(overlay, pdb["spec"]["selector"]["matchLabels"]) == ["tandem"]


def test_queue_depth_component_adds_a_pods_metric() -> None:
    hpa = one("production+queue-depth-hpa", "HorizontalPodAutoscaler", "tandem")
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == ["tandem_queue_rows"]
    assert len(hpa["spec"]["metrics"]) == 2  # CPU stays


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_collections_keep_their_data_on_one_volume_per_replica(overlay: str) -> None:
    s = one(overlay, "StatefulSet", "tandem-collections")
    # One replica: Tandem does not replicate collections, so a second one would hold different data.
    assert s["spec"]["replicas"] == 1
    (claim,) = s["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["mountPath"]: m["name"] for m in container(s)["volumeMounts"]}
    assert mounts[DATA_DIR] == claim["metadata"]["name"]
    assert s["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    assert one(overlay, "Service", s["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    # The inference tier's data_dir is scratch space, not a volume that outlives the pod.
    d = one(overlay, "Deployment", "tandem")
    data = next(m["name"] for m in container(d)["volumeMounts"] if m["mountPath"] == DATA_DIR)
    assert "emptyDir" in next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == data)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_are_on_their_own_service_only(overlay: str) -> None:
    for svc in objects(overlay, "Service"):
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        selected = pods_of(overlay, svc["spec"]["selector"])
        assert selected, f"Service {svc['metadata']['name']} selects no workload"
        targets = {p["targetPort"] for p in ports.values()}
        if svc["metadata"]["name"] == "tandem-metrics":
            assert targets == {"metrics"} and svc["spec"]["clusterIP"] == "None"
            assert set(selected) == {w["metadata"]["name"] for w in workloads(overlay)}
        else:
            assert targets == {"grpc"}, f"Service {svc['metadata']['name']} exposes {targets}"
            assert 9100 not in {p["port"] for p in ports.values()}


def test_the_service_monitor_scrapes_the_metrics_service() -> None:
    (sm,) = objects("production", "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    assert set(sm["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    (svc,) = [s for s in objects("production", "Service")
              if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert svc["metadata"]["name"] == "tandem-metrics"
    assert svc["metadata"]["namespace"] == sm["metadata"]["namespace"]
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "tlsConfig", "relabelings"}
        assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
        assert ep["path"] == "/metrics" and ep["scheme"] == "http"
    # deploy/prometheus/alerts.yaml selects job="tandem-metrics": the Service's name is the job.
    assert 'job="tandem-metrics"' in (ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_opens_grpc_and_metrics_and_nothing_out(overlay: str) -> None:
    (np_,) = objects(overlay, "NetworkPolicy")
    spec = np_["spec"]
    assert set(pods_of(overlay, spec["podSelector"]["matchLabels"])) == {w["metadata"]["name"] for w in workloads(overlay)}
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and not spec.get("egress")
    by_port = {r["ports"][0]["port"]: r for r in spec["ingress"]}
    assert set(by_port) == {"grpc", "metrics"} and all(len(r["ports"]) == 1 for r in spec["ingress"])
    # Metrics only from a named namespace, not from every pod.
    assert all(set(peer) == {"namespaceSelector"} for peer in by_port["metrics"]["from"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_accepts_its_flags_config_and_environment(overlay: str, tmp_path: Path) -> None:
    fields = {f.upper() for f in ServerConfig.__dataclass_fields__}
    for w in workloads(overlay):
        c = container(w)
        parse_serve_flags(serve_flags(w))
        env = {e["name"]: e for e in c["env"]}
        for name in env:
            assert name in {"TANDEM_CONFIG", "TANDEM_TOKENS"} or name.startswith("TANDEM_HEALTHCHECK_") \
                or name.removeprefix("TANDEM_") in fields, f"{w['metadata']['name']}: {name} is no server setting"
        config = env["TANDEM_CONFIG"]["value"]
        mount = next(m for m in c["volumeMounts"] if config.startswith(m["mountPath"] + "/"))
        volume = next(v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        cm = one(overlay, "ConfigMap", volume["configMap"]["name"])
        toml = tmp_path / "tandem.toml"
        toml.write_text(cm["data"][Path(config).name])
        tomllib.loads(toml.read_text())
        loaded = load(None, env={"TANDEM_CONFIG": str(toml)})  # unknown keys or bad types raise
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert (loaded.port, loaded.metrics_port) == (ports["grpc"], ports["metrics"])
        # SIGKILL only after the preStop sleep and the server's own shutdown grace, with room to close collections.
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        grace = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert pre_stop + loaded.shutdown_grace_seconds + 10 <= grace, w["metadata"]["name"]


def test_production_serves_tls_and_tokens_from_secrets() -> None:
    for w in workloads("production"):
        name, c, pod = w["metadata"]["name"], container(w), w["spec"]["template"]["spec"]
        args = parse_serve_flags(serve_flags(w))
        assert args.tls_cert and args.tls_key and args.tokens_file, name
        assert args.allow_insecure_public is not True, f"{name}: production must not allow plaintext"
        assert args.reflection is False, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for path in (args.tls_cert, args.tls_key, args.tokens_file):
            mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
            assert "subPath" not in mount, f"{name}: subPath mounts never see a changed Secret"
            assert "secret" in volumes[mount["name"]], f"{name}: {path} is not from a Secret"
        env = {e["name"]: e.get("value") for e in c["env"]}
        ca = env["TANDEM_HEALTHCHECK_TLS_CA"]
        assert any(ca.startswith(m["mountPath"] + "/") for m in c["volumeMounts"]), "the probes cannot read the CA"
        assert all("exec" in c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe")), \
            f"{name}: the kubelet's gRPC probe cannot speak TLS"


def test_dev_allows_plaintext_explicitly() -> None:
    for w in workloads("dev"):
        args = parse_serve_flags(serve_flags(w))
        assert args.allow_insecure_public is True and not args.tls_cert
