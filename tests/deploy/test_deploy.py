"""The deployment artifacts, offline (`make test-deploy`; no container engine or cluster here): what
the schema validators (kubernetes-validate, hadolint, yamllint) cannot see — the pieces agree with
each other and with the gateway (its configs load with the gateway's own loader, ports, probes,
secret keys, selectors, mounts and COPY sources exist)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Config, load

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose"
K8S = REPO / "deploy" / "k8s"


def env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")
    )
    return {k: v for k, v in pairs}


def load_with(path: Path, values: dict[str, str]) -> Config:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        return load(path)


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


# ---- compose ------------------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return doc


def test_compose_services_and_mounts() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"gateway-a", "gateway-b", "redis", "postgres", "triton", "prometheus"}
    for name in ("gateway-a", "gateway-b"):
        gw = services[name]
        assert (COMPOSE / gw["build"]["context"] / gw["build"]["dockerfile"]).is_file()
        assert {k for k, v in gw["depends_on"].items() if v["condition"] == "service_healthy"} == {
            "redis",
            "postgres",
            "triton",
        }
    assert services["triton"]["image"].startswith("nvcr.io/nvidia/tritonserver:")
    for name in ("redis", "postgres", "triton"):
        assert services[name]["healthcheck"]["test"], name
    published = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published
    for s in services.values():  # every bind mount's host side exists
        for volume in s.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (COMPOSE / host).exists(), host
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["triton"]["volumes"]}
    assert (COMPOSE / mounts["/models"]).resolve() == REPO / "triton_models"


def test_compose_gateway_config_loads_and_matches() -> None:
    cfg = load_with(COMPOSE / "gateway.yaml", env_file(COMPOSE / "env.example"))
    doc = compose()
    gw_env = doc["services"]["gateway-a"]["environment"]
    # every ${VAR} the config reads is passed to the gateways
    wanted = set(re.findall(r"\$\{([A-Z_]+)", (COMPOSE / "gateway.yaml").read_text()))
    assert wanted <= set(gw_env), wanted - set(gw_env)
    assert set(env_file(COMPOSE / "env.example")) >= {v for v in wanted}
    assert all(p.kind.value == "triton" and p.base_url == "grpc://triton:8001" for p in cfg.providers)
    assert cfg.limits.backend == "redis" and "redis:6379" in cfg.limits.redis.url
    assert cfg.auth.store is not None and cfg.auth.store.kind == "postgres" and cfg.ledger.kind == "postgres"
    assert all(p.endswith(f":{cfg.server.port}") for p in doc["services"]["gateway-a"]["ports"])
    prom = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = next(j for j in prom["scrape_configs"] if j["job_name"] == "fastpath-gateway")
    listen = port_of(cfg.metrics.listen)
    assert targets["static_configs"][0]["targets"] == [f"gateway-a:{listen}", f"gateway-b:{listen}"]
    prom_mounts = {v.split(":")[1] for v in doc["services"]["prometheus"]["volumes"]}
    assert set(prom["rule_files"]) <= prom_mounts


# ---- Kubernetes ---------------------------------------------------------------------------------
def k8s(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((K8S / name).read_text())
    return doc


def test_k8s_pieces_agree(tmp_path: Path) -> None:
    resources = k8s("kustomization.yaml")["resources"]
    assert all((K8S / r).is_file() for r in resources)
    assert {k8s(r)["kind"] for r in resources} == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    secret = k8s("secret.yaml")["stringData"]
    dep = k8s("deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    values = {}
    for name, e in env.items():  # every secret reference exists
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref["name"] == k8s("secret.yaml")["metadata"]["name"] and ref["key"] in secret, name
            values[name] = secret[ref["key"]]
    cm = k8s("configmap.yaml")
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(cm["data"]["gateway.yaml"])
    cfg = load_with(config_path, values)  # the ConfigMap's config loads with the Secret's values
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": cfg.server.port, "metrics": port_of(cfg.metrics.listen)}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert Path(mounts["config"]) / "gateway.yaml" == Path(c["args"][c["args"].index("--config") + 1])
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert "/tmp" in mounts.values()  # the metrics shards need a writable temp dir
    # shutdown: the drain fits in the grace period after preStop
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop + cfg.server.shutdown_grace_ms / 1000 < pod["terminationGracePeriodSeconds"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for name in ("service.yaml", "pdb.yaml", "servicemonitor.yaml"):
        spec = k8s(name)["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), name
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = k8s("hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert hpa["minReplicas"] >= 2 and k8s("pdb.yaml")["spec"]["minAvailable"] < hpa["minReplicas"]
    assert c["resources"]["requests"]["cpu"]  # the HPA's utilization needs a request
    user = re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.M)
    assert user is not None and int(user[1]) == pod["securityContext"]["runAsUser"]


# ---- the image ----------------------------------------------------------------------------------
def test_dockerfile_structure() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M)
    assert len(stages) >= 2 and stages[-1][1] == ""  # multi-stage, the last one unnamed (final)
    final = text[text.rindex("\nFROM ") :]
    assert "maturin build" in text[: text.rindex("\nFROM ")] and "maturin" not in final
    assert re.search(r"^USER (\d+)", final, re.M) and not re.search(r"^USER (root|0)\b", final, re.M)
    assert re.search(r"^HEALTHCHECK .*", final, re.M) and "/healthz" in final
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), path
            assert f"!{path.rstrip('/')}" in ignore or f"!{path.rstrip('/')}/" in ignore, path
