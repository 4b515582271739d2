"""deploy/compose and deploy/kubernetes: parsed and cross-checked against what the gateway
accepts (gateway/settings.py, the mappings' url_env names, its routes and the Dockerfile);
the kustomize overlay rendered with ``kubectl kustomize`` where kubectl exists; the
Dockerfile's steps run without a Docker engine (package build from exactly what it copies,
its start-up checks and its HEALTHCHECK against a real server).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from gateway.settings import Settings
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "kubernetes"
SETTINGS = {f"CCG_{f.name.upper()}" for f in fields(Settings)} - {"CCG_CONNECTION_URLS"}
OTHER_ENV = {"FORWARDED_ALLOW_IPS", "PROMETHEUS_MULTIPROC_DIR", "OTEL_EXPORTER_OTLP_ENDPOINT"}
BUNDLED = "/usr/local/lib/python3.11/site-packages/gateway/_bundled/mappings/"


def url_envs(mapping_dir: Path) -> set[str]:
    data = yaml.safe_load((mapping_dir / "connections.yaml").read_text())
    return {c["url_env"] for c in data["connections"].values() if "url_env" in c}


def check_env(env: dict[str, str], mapping_dir: Path) -> Settings:
    """Every variable is one the gateway reads, and the settings parse."""
    known = SETTINGS | url_envs(mapping_dir) | OTHER_ENV
    unknown = set(env) - known
    assert not unknown, f"not read by the gateway: {sorted(unknown)}"
    ccg = {k: v for k, v in env.items() if k in SETTINGS}
    saved = {k: os.environ.get(k) for k in ccg}
    os.environ.update(ccg)
    try:
        return Settings.from_env()  # ints and bools parse
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- docker compose ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return data


def test_compose_services_and_gateway_settings() -> None:
    services = compose()["services"]
    assert {"pas-db", "pas-db-load", "pas-simulator", "redis", "gateway-1", "gateway-2",
            "proxy", "prometheus"} <= set(services)
    gateways = [services["gateway-1"], services["gateway-2"]]
    assert gateways[0]["environment"] == gateways[1]["environment"]
    env = {k: str(v) for k, v in gateways[0]["environment"].items()}
    assert env["CCG_MAPPINGS_DIR"].startswith(BUNDLED)
    mapping_dir = ROOT / "mappings" / env["CCG_MAPPINGS_DIR"][len(BUNDLED):]
    assert mapping_dir.is_dir()
    settings = check_env(env, mapping_dir)
    # Each URL names a service of this file, on the port that service listens on.
    assert urlsplit(settings.redis_url).hostname == "redis"
    hl7 = urlsplit(env["CCG_PAS_HL7_URL"])
    sim = services["pas-simulator"]["command"]
    assert hl7.hostname == "pas-simulator"
    assert str(hl7.port) == sim[sim.index("--port") + 1]
    assert sim[sim.index("--host") + 1] == "0.0.0.0"
    pas = urlsplit(env["CCG_PAS_URL"])
    db_env = services["pas-db"]["environment"]
    assert (pas.hostname, pas.username, pas.password, pas.path) == (
        "pas-db", db_env["POSTGRES_USER"], db_env["POSTGRES_PASSWORD"],
        "/" + db_env["POSTGRES_DB"])
    assert services["pas-db-load"]["environment"]["CCG_PAS_URL"] == env["CCG_PAS_URL"]
    # The proxy sends to both replicas' FHIR port and checks their readiness; Prometheus
    # scrapes both on the metrics port; the replicas share one paging secret and Redis.
    caddy = (COMPOSE / "Caddyfile").read_text()
    assert f"gateway-1:{settings.port} gateway-2:{settings.port}" in caddy
    assert "health_uri /_ready" in caddy and "tls internal" in caddy
    prom = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"gateway-{n}:{settings.metrics_port}" for n in (1, 2)]
    assert settings.metrics_host == "0.0.0.0" and settings.paging_secret
    for gw in gateways:
        assert gw["command"][:2] == ["careconnect-gateway", "serve"]
        assert "--proxy-headers" in gw["command"]
        assert {"redis", "pas-db-load", "pas-simulator"} <= set(gw["depends_on"])
    assert services["proxy"]["ports"] == ["127.0.0.1:8443:8443"]


def test_compose_stop_grace_covers_each_command_s_stop() -> None:
    """``docker compose stop`` sends SIGTERM, then SIGKILL after ``stop_grace_period``
    (default 10 s): serve's drain and in-flight wait, and a command's stop under
    gateway.lifecycle.run_until_stopped (its bound plus the margin), end before that."""
    from gateway.lifecycle import STOP_MARGIN

    for name, service in compose()["services"].items():
        command = service.get("command") or []
        if command[:1] != ["careconnect-gateway"] or command[1] not in (
                "serve", "pas-simulator", "adt-listener"):
            continue
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()
               if k in SETTINGS}
        settings = check_env(env, ROOT / "mappings" / "demo-pas")
        grace = float(str(service.get("stop_grace_period", "10s")).removesuffix("s"))
        needed = (settings.shutdown_drain_seconds + settings.shutdown_timeout
                  if command[1] == "serve" else settings.shutdown_timeout + STOP_MARGIN)
        assert needed < grace, (name, needed, grace)


def test_the_demo_mappings_compose_serves_load(tmp_path: Path) -> None:
    services = compose()["services"]
    bundled = services["gateway-1"]["environment"]["CCG_MAPPINGS_DIR"][len(BUNDLED):]
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "mappings", "check",
         str(ROOT / "mappings" / bundled)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "CCG_DATA_DIR": str(tmp_path), "CCG_DEMO_PATIENTS": "100"})
    assert run.returncode == 0, run.stdout + run.stderr


# --- Kubernetes -------------------------------------------------------------------------------


def kustomization(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((path / "kustomization.yaml").read_text())
    return data


def literals(kust: dict[str, Any], name: str) -> dict[str, str]:
    gen = next(g for g in kust["configMapGenerator"] if g["name"] == name)
    return dict(item.split("=", 1) for item in gen["literals"])


def base_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for item in kustomization(K8S / "base")["resources"]:
        doc = yaml.safe_load((K8S / "base" / item).read_text())
        docs[doc["kind"]] = doc
    return docs


def dockerfile_env() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return dict(re.findall(r"(CCG_[A-Z_]+)=(\S+)", text))


def test_kubernetes_settings_secrets_and_mounts() -> None:
    base, prod = kustomization(K8S / "base"), kustomization(K8S / "overlays" / "production")
    env = {**dockerfile_env(), **literals(base, "careconnect-gateway-env"),
           **literals(prod, "careconnect-gateway-env")}
    mapping_dir = ROOT / "mappings" / "demo-pas"  # the overlay's example mappings
    # the Secret's keys (created outside git; named in the overlay's instructions)
    secret_keys = set(re.findall(r"--from-literal=([A-Z_]+)=",
                                 (K8S / "overlays" / "production" / "kustomization.yaml")
                                 .read_text()))
    assert secret_keys == {"CCG_PAS_URL", "CCG_PAGING_SECRET", "CCG_REDIS_URL"}
    settings = check_env({**env, **dict.fromkeys(secret_keys, "x")}, mapping_dir)
    assert settings.env == "production" and settings.auth_mode == "jwt"
    assert settings.audit_log == "stdout"
    docs = base_docs()
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "NetworkPolicy", "ServiceAccount"} <= set(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["envFrom"] == [
        {"configMapRef": {"name": "careconnect-gateway-env"}},
        {"secretRef": {"name": "careconnect-gateway-secrets"}}]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.port, "metrics": settings.metrics_port}
    assert container["livenessProbe"]["httpGet"]["path"] == "/_health"
    assert container["startupProbe"]["httpGet"]["path"] == "/_health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/_ready"
    # non-root, read-only root file system: every place written to is a volume
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user (Dockerfile)
    assert "--uid 10001" in (DEPLOY / "Dockerfile").read_text()
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    assert str(settings.data_dir) in writable
    assert "/tmp" in writable  # temporary files; --workers' metrics files
    assert mounts[str(settings.mappings_dir)]["readOnly"] is True
    connections = yaml.safe_load((mapping_dir / "connections.yaml").read_text())
    codemaps = os.path.normpath(settings.mappings_dir / connections["codemaps"])
    assert mounts[codemaps]["readOnly"] is True
    # the drain and the in-flight wait fit in the grace period
    assert pod["terminationGracePeriodSeconds"] > (settings.shutdown_drain_seconds
                                                    + settings.shutdown_timeout)
    assert settings.shutdown_drain_seconds >= container["readinessProbe"]["periodSeconds"] * 2
    # egress: DNS, the PAS (SQL and MLLP), Redis, the JWKS (https) and nothing else
    egress_ports = sorted(p["port"] for rule in docs["NetworkPolicy"]["spec"]["egress"]
                          for p in rule["ports"])
    assert egress_ports == [53, 53, 443, 2575, 5432, 6379]
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] >= 1
    assert docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2


def test_the_overlay_lists_the_example_mappings() -> None:
    prod = kustomization(K8S / "overlays" / "production")
    gens = {g["name"]: g.get("files", []) for g in prod["configMapGenerator"]}
    demo = ROOT / "mappings" / "demo-pas"
    assert sorted(gens["careconnect-gateway-mappings"]) == sorted(
        f"mappings/{p.name}" for p in demo.iterdir() if p.is_file())
    # a ConfigMap is flat: the operations directory is its own, projected back into place
    operations = sorted(p.name for p in (demo / "operations").iterdir())
    assert sorted(gens["careconnect-gateway-operations"]) == [
        f"mappings/operations/{name}" for name in operations]
    deployment_patch = next(p for p in prod["patches"] if p["target"]["kind"] == "Deployment")
    ops = yaml.safe_load(deployment_patch["patch"])
    projected = {op["value"]["configMap"]["name"]: op["value"]["configMap"]["items"]
                 for op in ops if op["path"].endswith("/projected/sources/-")}
    assert projected["careconnect-gateway-operations"] == [
        {"key": n, "path": f"operations/{n}"} for n in operations]
    # and the $document declarations the same way
    documents = sorted(p.name for p in (demo / "documents").iterdir())
    assert sorted(gens["careconnect-gateway-documents"]) == [
        f"mappings/documents/{name}" for name in documents]
    assert projected["careconnect-gateway-documents"] == [
        {"key": n, "path": f"documents/{n}"} for n in documents]
    assert sorted(gens["careconnect-gateway-codemaps"]) == sorted(
        f"codemaps/{p.name}" for p in (ROOT / "mappings" / "codemaps").iterdir())


def materialise_overlay(tmp_path: Path) -> Path:
    """The overlay as a trust fills it in: the demo mappings where it expects its own."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    overlay = tree / "overlays" / "production"
    shutil.copytree(ROOT / "mappings" / "demo-pas", overlay / "mappings")
    shutil.copytree(ROOT / "mappings" / "codemaps", overlay / "codemaps")
    return overlay


def test_the_configmap_layout_loads(tmp_path: Path) -> None:
    """Mounted as Kubernetes does it: mappings and codemaps as sibling flat directories."""
    overlay = materialise_overlay(tmp_path)
    etc = tmp_path / "etc" / "careconnect-gateway"
    etc.mkdir(parents=True)
    shutil.copytree(overlay / "mappings", etc / "mappings")
    shutil.copytree(overlay / "codemaps", etc / "codemaps")
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "mappings", "check", str(etc / "mappings")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "CCG_DATA_DIR": str(tmp_path / "data"), "CCG_DEMO_PATIENTS": "100"})
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_production_overlay(tmp_path: Path) -> None:
    overlay = materialise_overlay(tmp_path)
    run = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    docs = [d for d in yaml.safe_load_all(run.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "ConfigMap", "ConfigMap", "ConfigMap", "ConfigMap", "Deployment",
                     "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget",
                     "Service", "ServiceAccount"]
    assert {d["metadata"]["namespace"] for d in docs} == {"careconnect"}
    by_name = {(d["kind"], d["metadata"]["name"].rsplit("-", 1)[0]): d for d in docs}
    env = by_name[("ConfigMap", "careconnect-gateway-env")]["data"]
    assert env["CCG_ENV"] == "production" and env["CCG_AUDIT_LOG"] == "stdout"
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    # the generated (hashed) ConfigMap names are the ones the Deployment mounts
    sources = [s["configMap"] for s in volumes["mappings"]["projected"]["sources"]]
    # the mappings, then the operations and the $document declarations projected into place
    assert len(sources) == 3 and all(s["name"] in names for s in sources)
    for projected in sources[1:]:
        cm = next(d for d in docs if d["kind"] == "ConfigMap"
                  and d["metadata"]["name"] == projected["name"])
        assert set(cm["data"]) == {i["key"] for i in projected["items"]}
    assert volumes["codemaps"]["configMap"]["name"] in names
    assert pod["containers"][0]["envFrom"][0]["configMapRef"]["name"] in names
    assert pod["containers"][0]["image"] == "registry.trust.nhs.uk/careconnect-gateway:0.1.0"
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    redis_rule = policy["spec"]["egress"][2]["to"][0]["podSelector"]["matchLabels"]
    assert redis_rule == {"app.kubernetes.io/name": "redis"}  # not rewritten by kustomize
    mappings_cm = next(d for d in docs if d["kind"] == "ConfigMap"
                       and d["metadata"]["name"].startswith("careconnect-gateway-mappings"))
    assert "Patient.sql.yaml" in mappings_cm["data"]


# --- the Dockerfile, without a Docker engine ----------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_dockerfile_steps_build_and_start(tmp_path: Path) -> None:
    steps = dockerfile()
    # COPY: exactly these paths are in the build context; the package builds from them alone
    src = tmp_path / "src"
    src.mkdir()
    for word, rest in steps:
        if word == "COPY":
            *sources, dest = shlex.split(rest)
            for s in sources:
                target = src / dest if dest != "./" else src
                if (ROOT / s).is_dir():
                    shutil.copytree(ROOT / s, target, ignore=shutil.ignore_patterns(
                        "__pycache__", "*.pyc"))
                else:
                    shutil.copy(ROOT / s, target / s if dest == "./" else target)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = (tmp_path / "dist").glob("careconnect_gateway-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # what compose and the image rely on: the bundled demo mappings and code maps
    assert "gateway/_bundled/mappings/demo-hl7v2/connections.yaml" in names
    assert "gateway/_bundled/mappings/demo-pas/Patient.sql.yaml" in names
    assert "gateway/_bundled/mappings/codemaps/sex.yaml" in names
    runs = [rest for word, rest in steps if word == "RUN"]
    install = next(r for r in runs if r.startswith("pip install"))
    assert "'.[otel]'" in install or '".[otel]"' in install  # the image can trace
    check = re.search(r'python -c "([^"]+)"', install)
    assert check is not None  # the time-zone check of the build, run here
    assert subprocess.run([sys.executable, "-c", check.group(1)], timeout=60).returncode == 0
    # CMD and HEALTHCHECK: start as the image does (on loopback here), probe as it does
    cmd = next(yaml.safe_load(rest) for word, rest in steps if word == "CMD")
    assert cmd[:2] == ["careconnect-gateway", "serve"]
    health = next(rest for word, rest in steps if word == "HEALTHCHECK")
    probe = yaml.safe_load(health[health.index("CMD") + 3:].strip())
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CCG_")},
           "CCG_DATA_DIR": str(tmp_path / "data"), "CCG_PROGRESS": "false",
           "CCG_DEMO_PATIENTS": "100", "CCG_PORT": str(port), "CCG_LOG_LEVEL": "warning"}
    (tmp_path / "data").mkdir()
    args = [sys.executable, "-m", "gateway.cli", *cmd[1:]]
    args[args.index("0.0.0.0")] = "127.0.0.1"  # loopback only in tests
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_health", timeout=2).is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the image's command did not come up"
            time.sleep(0.1)
        assert probe[0] == "python"
        ok = subprocess.run([sys.executable, *probe[1:]], env=env, timeout=30)
        assert ok.returncode == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
    down = subprocess.run([sys.executable, *probe[1:]], env=env, timeout=30,
                          capture_output=True)
    assert down.returncode != 0  # the probe fails once the server is gone


@pytest.mark.skipif(subprocess.run(["docker", "info"], capture_output=True).returncode != 0
                    if shutil.which("docker") else True, reason="no Docker engine")
def test_the_image_builds_with_docker() -> None:  # pragma: no cover - no engine in CI
    run = subprocess.run(["docker", "build", "-f", str(DEPLOY / "Dockerfile"), "-t",
                          "careconnect-gateway:test", str(ROOT)], capture_output=True,
                         text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]


def documented_settings() -> set[str]:
    """The variables of deploy/README.md's settings table."""
    text = (DEPLOY / "README.md").read_text()
    table = text[text.index("## Settings"):text.index("Also read from the environment")]
    return {name for line in table.splitlines() if line.startswith("| `CCG_")
            for name in re.findall(r"`(CCG_[A-Z0-9_]+)`", line.split(" | ")[0])}


def test_the_settings_table_names_every_setting() -> None:
    documented = documented_settings()
    assert documented >= SETTINGS, sorted(SETTINGS - documented)
    # the rest are the ADT feed's and the Subscriptions' (gateway/adt/config.py)
    assert all(v.startswith(("CCG_ADT_", "CCG_SUBSCRIPTION_")) for v in documented - SETTINGS)


def test_the_env_example_names_every_setting() -> None:
    text = (DEPLOY / "gateway.env.example").read_text()
    named = set(re.findall(r"^#?(CCG_[A-Z0-9_]+)=", text, flags=re.M))
    documented = documented_settings()
    # "every CCG_* setting, commented" (deploy/README.md), and nothing unknown
    assert documented <= named, sorted(documented - named)
    assert named - documented <= url_envs(ROOT / "mappings" / "demo-pas")
