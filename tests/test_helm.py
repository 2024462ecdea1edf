"""The Helm chart (deploy/helm/rerank-proxy): linted strictly and rendered with its default values,
the GPU + remote-backend values and the shared-inference example; the rendered objects are read back
and checked for what a cluster relies on: probes on the admin listener, a non-root read-only pod,
a ConfigMap the proxy's own loader accepts, no secret in it, and optional objects exactly when asked.

helm comes from ``scripts/helm.sh`` (built once per machine with ``go install``); a machine that
cannot have it fails these tests rather than skipping them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config_load import load_config

from .conftest import ROOT

CHART = ROOT / "deploy" / "helm" / "rerank-proxy"
GPU_VALUES = CHART / "ci" / "gpu-remote-values.yaml"
SHARED_VALUES = CHART / "examples" / "cpu-shared-inference-values.yaml"
VALUES_FILES = {"default": None, "gpu-remote": GPU_VALUES, "cpu-shared-inference": SHARED_VALUES}

# A cold build of helm (modules downloaded, then compiled) takes minutes on a small machine.
pytestmark = pytest.mark.timeout(1200)

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def helm() -> str:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "helm.sh")], capture_output=True, text=True, timeout=1100
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/helm.sh could not provide helm:\n{proc.stderr}", pytrace=False)
    path = proc.stdout.strip()
    assert Path(path).is_file(), path
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def template_args(values: Path | None, sets: tuple[str, ...]) -> list[str]:
    args = ["--namespace", "search"]
    if values is not None:
        args += ["-f", str(values)]
    for s in sets:
        args += ["--set", s]
    return args


def render(helm: str, values: Path | None = None, *sets: str) -> list[Doc]:
    proc = run_helm(helm, "template", "rel", str(CHART), *template_args(values, sets))
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_error(helm: str, *sets: str) -> str:
    proc = run_helm(helm, "template", "rel", str(CHART), *template_args(None, sets))
    assert proc.returncode != 0, "rendered although it should not have"
    return proc.stderr


def only(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def kinds(docs: list[Doc]) -> set[str]:
    return {d["kind"] for d in docs}


def pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = only(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(docs: list[Doc]) -> Doc:
    containers = pod_spec(docs)["containers"]
    assert len(containers) == 1
    c: Doc = containers[0]
    return c


def config_text(docs: list[Doc]) -> str:
    text: str = only(docs, "ConfigMap")["data"]["config.yaml"]
    return text


def ports(docs: list[Doc]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(docs)["ports"]}


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_chart_lints_strictly(helm: str, name: str) -> None:
    values = VALUES_FILES[name]
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_probes_use_the_named_admin_port(helm: str, name: str) -> None:
    docs = render(helm, VALUES_FILES[name])
    c = container(docs)
    assert ports(docs) == {"http": 8000, "admin": 9901}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "admin"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "admin"}
    startup = c["startupProbe"]
    assert startup["httpGet"]["port"] == "admin"
    # Model download and warm-up: at least five minutes before liveness takes over.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert c["args"] == ["--config", "/etc/rerank-proxy/config.yaml"]
    service = only(docs, "Service")
    assert {(p["name"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("http", "http"),
        ("admin", "admin"),
    }


def test_ports_follow_the_configured_listeners(helm: str) -> None:
    docs = render(helm, None, "config.server.port=8080", "config.server.admin_port=9911")
    assert ports(docs) == {"http": 8080, "admin": 9911}
    cfg = yaml.safe_load(config_text(docs))
    assert (cfg["server"]["port"], cfg["server"]["admin_port"]) == (8080, 9911)
    assert "admin listener" in render_error(helm, "config.server.admin_port=0")


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_pod_runs_non_root_on_a_read_only_root(helm: str, name: str) -> None:
    docs = render(helm, VALUES_FILES[name])
    pod = pod_spec(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # What the proxy writes (temporary files, model weights) has a writable volume.
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert {"emptyDir", "persistentVolumeClaim"} & set(volumes[mounts["/models"]])
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["HOME"] == "/tmp"
    assert env["HF_HOME"] == "/models"


def gpu_limit(docs: list[Doc]) -> Any:
    resources = container(docs)["resources"]
    assert "nvidia.com/gpu" not in resources.get("requests", {})
    return resources.get("limits", {}).get("nvidia.com/gpu")


def test_gpu_is_requested_only_by_the_gpu_values(helm: str) -> None:
    assert gpu_limit(render(helm)) is None
    assert gpu_limit(render(helm, SHARED_VALUES)) is None
    gpu_docs = render(helm, GPU_VALUES)
    assert gpu_limit(gpu_docs) == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(gpu_docs)[
        "tolerations"
    ]
    assert yaml.safe_load(config_text(gpu_docs))["rerank"]["device"] == "cuda"
    # The toggle on its own adds the GPU to whatever limits are set.
    toggled = render(helm, None, "gpu.enabled=true", "gpu.count=2")
    assert gpu_limit(toggled) == 2
    assert container(toggled)["resources"]["limits"]["memory"] == "4Gi"


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_configmap_is_accepted_by_the_proxy_loader(helm: str, name: str, tmp_path: Path) -> None:
    docs = render(helm, VALUES_FILES[name])
    path = tmp_path / "config.yaml"
    path.write_text(config_text(docs), encoding="utf-8")
    cfg = load_config(path, env={})
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.admin_host == "0.0.0.0"
    assert (cfg.server.port, cfg.server.admin_port) == (ports(docs)["http"], ports(docs)["admin"])
    # The drain fits in the grace period the kubelet gives before SIGKILL.
    pre_stop = int(container(docs)["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod_spec(docs)["terminationGracePeriodSeconds"] > pre_stop + cfg.server.shutdown_timeout_s
    if name == "gpu-remote":
        assert cfg.rerank.device == "cuda"
        assert cfg.models["multilingual"].backend == "cohere"
        assert [rule.model for rule in cfg.rules] == ["multilingual", "default"]
        # The key from the Secret (an environment variable) reaches the remote model's entry.
        keyed = load_config(path, env={"RERANK_PROXY_RERANK_BACKEND_API_KEY": "from-secret"})
        assert keyed.models["multilingual"].backend_api_key == "from-secret"
    if name == "cpu-shared-inference":
        assert (cfg.rerank.backend, cfg.rerank.device) == ("tei", "cpu")
        assert cfg.rerank.backend_url == "http://tei-reranker.inference.svc/rerank"


@pytest.mark.parametrize(
    ("toggle", "kind"),
    [
        ("autoscaling.enabled", "HorizontalPodAutoscaler"),
        ("podDisruptionBudget.enabled", "PodDisruptionBudget"),
        ("serviceMonitor.enabled", "ServiceMonitor"),
    ],
)
def test_optional_objects_exist_exactly_when_enabled(helm: str, toggle: str, kind: str) -> None:
    assert kind not in kinds(render(helm))
    assert kind not in kinds(render(helm, None, f"{toggle}=false"))
    docs = render(helm, None, f"{toggle}=true")
    obj = only(docs, kind)
    selector = only(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    service = only(docs, "Service")
    if kind == "HorizontalPodAutoscaler":
        assert obj["apiVersion"] == "autoscaling/v2"
        assert obj["spec"]["scaleTargetRef"]["name"] == only(docs, "Deployment")["metadata"]["name"]
        [metric] = obj["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"]["averageUtilization"] == 70
        # The HPA owns the replica count.
        assert "replicas" not in only(docs, "Deployment")["spec"]
        assert "replicas" in only(render(helm), "Deployment")["spec"]
    elif kind == "PodDisruptionBudget":
        assert obj["spec"]["selector"]["matchLabels"] == selector
        assert obj["spec"]["minAvailable"] == 1
    else:
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        [endpoint] = obj["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["path"]) == ("admin", "/metrics")
        labels = service["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in obj["spec"]["selector"]["matchLabels"].items())
        assert obj["spec"]["namespaceSelector"] == {"matchNames": ["search"]}


def test_values_files_enable_what_they_say(helm: str) -> None:
    gpu = kinds(render(helm, GPU_VALUES))
    assert "PodDisruptionBudget" in gpu
    assert not {"HorizontalPodAutoscaler", "ServiceMonitor"} & gpu
    shared = kinds(render(helm, SHARED_VALUES))
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"} <= shared


def test_autoscaling_needs_a_cpu_request(helm: str) -> None:
    assert "resources.requests.cpu" in render_error(helm, "autoscaling.enabled=true", "resources=null")


def test_secrets_come_from_the_secret_never_the_configmap(helm: str) -> None:
    docs = render(helm, GPU_VALUES)
    env = {e["name"]: e for e in container(docs)["env"]}
    for var, key in [
        ("RERANK_PROXY_UPSTREAM_URL", "upstream-url"),
        ("RERANK_PROXY_RERANK_BACKEND_API_KEY", "backend-api-key"),
    ]:
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "rerank-proxy-secrets", "key": key}
        assert "value" not in env[var]
    text = config_text(docs)
    assert "api_key" not in text
    assert "@" not in yaml.safe_load(text)["upstream"]["url"]
    assert "RERANK_PROXY_RERANK_BACKEND_API_KEY" not in {e["name"] for e in container(render(helm))["env"]}

    refused = [
        ("config.rerank.backend_api_key=s3cret", "secrets.backendApiKeyKey"),
        ("config.models.m.model=x,config.models.m.backend_api_key=s3cret", "config.models.m.backend_api_key"),
        ("config.upstream.url=https://elastic:s3cret@es:9200", "secrets.upstreamUrlKey"),
    ]
    for setting, hint in refused:
        error = render_error(helm, setting)
        assert hint in error
        assert "s3cret" not in error


def test_a_config_change_rolls_the_pods(helm: str) -> None:
    def checksum(*sets: str) -> str:
        value: str = only(render(helm, None, *sets), "Deployment")["spec"]["template"]["metadata"][
            "annotations"
        ]["checksum/config"]
        return value

    base = checksum()
    assert len(base) == 64
    assert checksum() == base
    assert checksum("replicaCount=5") == base
    assert checksum("config.rerank.top_k=50") != base
    assert checksum("config.upstream.url=http://other:9200") != base


def test_grace_period_outlasts_the_drain(helm: str) -> None:
    def grace(*sets: str) -> int:
        value: int = pod_spec(render(helm, None, *sets))["terminationGracePeriodSeconds"]
        return value

    assert grace() == 5 + 30 + 10
    assert grace("config.server.shutdown_timeout_s=120.5", "preStopSleepSeconds=0") == 121 + 10
    assert grace("terminationGracePeriodSeconds=90") == 90
    error = render_error(helm, "terminationGracePeriodSeconds=30")
    assert "terminationGracePeriodSeconds 30 must exceed" in error
    no_hook = container(render(helm, None, "preStopSleepSeconds=0"))
    assert "lifecycle" not in no_hook


def test_tls_secret_is_mounted_where_the_config_points(helm: str) -> None:
    docs = render(helm, None, "tls.existingSecret=proxy-tls")
    server = yaml.safe_load(config_text(docs))["server"]
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "proxy-tls"
    assert server["tls_cert_file"] == f"{mounts['tls']}/tls.crt"
    assert server["tls_key_file"] == f"{mounts['tls']}/tls.key"
    # Not under the ConfigMap's own mount, which is read-only and replaced whole.
    assert not mounts["tls"].startswith(mounts["config"] + "/")
    assert "tls_cert_file" not in yaml.safe_load(config_text(render(helm)))["server"]
