"""The container images, as far as they can be checked without a Docker engine: the serving image runs as
non-root under tini, has a HEALTHCHECK, installs no torch and starts `tandem serve` with flags it accepts; the
training image is separate. The healthcheck script itself runs here against a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trustme

from tests.conftest import ROOT, SHIPPED_MODELS, start_server
from tests.deploy.conftest import Served
from tests.deploy.parse import copy_sources, dockerfile_stages, exec_form, parse_serve_flags
from tests.test_layout import free_port

SERVING = ROOT / "deploy" / "Dockerfile"
TRAINING = ROOT / "deploy" / "Dockerfile.train"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"


def test_every_copied_path_exists() -> None:
    for dockerfile in (SERVING, TRAINING):
        for stage in dockerfile_stages(dockerfile):
            for rest in stage.all("COPY"):
                if "--from=" in rest:
                    continue
                for src in copy_sources(rest):
                    assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: no such path in the build context"


def test_serving_image_runs_as_non_root_under_tini() -> None:
    final = dockerfile_stages(SERVING)[-1]
    user = (final.last("USER") or "root").split(":")[0]
    assert user not in ("root", "0"), "the server must not run as root"
    entry = exec_form(final.last("ENTRYPOINT") or "")
    # PID 1 gets no default signal actions; tini forwards SIGTERM to the server and reaps zombies.
    assert entry[:2] == ["tini", "--"] and entry[2:4] == ["tandem", "serve"], entry
    assert any("install" in run and "tini" in run for run in final.all("RUN")), "tini is not installed"
    args = parse_serve_flags(entry[4:] + exec_form(final.last("CMD") or "[]"))
    assert args.host == "0.0.0.0" and args.models and args.data_dir
    assert args.allow_insecure_public is True  # the plain `docker run` default, replaced by any flags given


def test_serving_image_bounds_malloc_arenas() -> None:
    """Without it, resident memory grew 17% in 2 minutes of collection load (benchmarks/soak.py)."""
    final = dockerfile_stages(SERVING)[-1]
    assert any("MALLOC_ARENA_MAX=2" in env for env in final.all("ENV"))


def test_serving_image_has_a_healthcheck_it_ships() -> None:
    final = dockerfile_stages(SERVING)[-1]
    check = final.last("HEALTHCHECK") or ""
    assert "--start-period" in check, "without a start period, loading models counts as unhealthy"
    cmd = exec_form(check[check.index("CMD") + 3:].strip())
    (copy,) = [rest for rest in final.all("COPY") if "deploy/healthcheck.py" in rest]
    assert copy.split()[-1] == f"/usr/local/bin/{cmd[0]}" and "--chmod=0755" in copy, \
        f"HEALTHCHECK runs {cmd[0]}, which the image does not install as an executable on PATH"
    assert HEALTHCHECK.read_text().startswith("#!/opt/venv/bin/python\n")  # the serving venv of the build stage


def test_serving_image_installs_no_torch() -> None:
    stages = dockerfile_stages(SERVING)
    installs = [run for s in stages for run in s.all("RUN") if "pip install" in run]
    assert installs
    for run in installs:
        assert "[train" not in run and "torch" not in run.split("&&")[0].split("pip install", 1)[1], run
    assert any('! python -c "import torch"' in run for run in installs), "the build no longer proves torch is absent"
    assert all(s.base.startswith("python:") and "-slim" in s.base for s in stages)


def test_training_image_is_separate_and_has_the_train_extra() -> None:
    (stage,) = dockerfile_stages(TRAINING)
    assert any("'.[train]'" in run for run in stage.all("RUN"))
    assert stage.last("HEALTHCHECK") is None  # a batch job, not a server


def healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=60)


def test_healthcheck_answers_for_each_health_service(served: Served) -> None:
    for service in ("", "tandem.v1.Inference", "tandem.v1.Models", "tandem.v1.Collections"):
        out = healthcheck("--target", served.target, "--service", service)
        assert out.returncode == 0 and out.stdout.strip().endswith("SERVING"), (service, out.stdout, out.stderr)


def test_healthcheck_fails_for_an_unknown_service_and_a_closed_port(served: Served) -> None:
    unknown = healthcheck("--target", served.target, "--service", "tandem.v1.Nope")
    assert unknown.returncode == 1 and "no health service named tandem.v1.Nope" in unknown.stdout
    closed = healthcheck("--target", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert closed.returncode == 2 and "no answer (UNAVAILABLE" in closed.stdout, closed.stdout


def test_healthcheck_reads_its_settings_from_the_environment(served: Served) -> None:
    """Pods set TANDEM_HEALTHCHECK_* once for all three probes."""
    env = {"TANDEM_HEALTHCHECK_TARGET": served.target, "TANDEM_HEALTHCHECK_SERVICE": "tandem.v1.Nope"}
    out = subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and served.target in out.stdout, out.stdout + out.stderr


def test_healthcheck_speaks_tls_and_mtls_as_the_production_probes_do(tmp_path: Path) -> None:
    """The pod's probes reach 127.0.0.1 and check the certificate against the name "tandem"."""
    ca = trustme.CA()
    files = {"ca": ca.cert_pem}
    for name, cert in (("server", ca.issue_cert("tandem", "tandem.tandem.svc")), ("client", ca.issue_cert("probe"))):
        files[f"{name}_key"], files[f"{name}_cert"] = cert.private_key_pem, cert.cert_chain_pems[0]
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / f"{name}.pem"))
    pem = {name: str(tmp_path / f"{name}.pem") for name in files}
    server = start_server(SHIPPED_MODELS, tls_cert=pem["server_cert"], tls_key=pem["server_key"],
                          tls_client_ca=pem["ca"])
    try:
        tls = {"TANDEM_HEALTHCHECK_TARGET": server.target, "TANDEM_HEALTHCHECK_TLS_CA": pem["ca"],
               "TANDEM_HEALTHCHECK_TLS_SERVER_NAME": "tandem", "TANDEM_HEALTHCHECK_TIMEOUT": "2"}
        client = {"TANDEM_HEALTHCHECK_TLS_CERT": pem["client_cert"], "TANDEM_HEALTHCHECK_TLS_KEY": pem["client_key"]}

        def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, str(HEALTHCHECK), "--service", "tandem.v1.Models"],
                                  capture_output=True, text=True, timeout=60, env=env)

        ok = run({**tls, **client})
        assert ok.returncode == 0 and ok.stdout.strip().endswith("SERVING"), ok.stdout + ok.stderr
        assert run(tls).returncode == 2  # no client certificate: the server refuses the handshake
        assert run({**tls, **client, "TANDEM_HEALTHCHECK_TLS_SERVER_NAME": "elsewhere"}).returncode == 2
        plain = {"TANDEM_HEALTHCHECK_TARGET": server.target, "TANDEM_HEALTHCHECK_TIMEOUT": "2"}
        assert run(plain).returncode == 2
    finally:
        server.stop()
