"""The container files agree with the proxy: the health check asks the admin listener's readiness on
the port the image configures, that port is exposed, and compose publishes it on the host's loopback
only. No Docker engine is needed: the files are read as text and YAML."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from proxy.admin import create_admin_app
from proxy.app import create_app
from proxy.config import Config, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
GPU = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text(encoding="utf-8"))
ADMIN_PORT = ServerConfig().admin_port


def _admin_paths() -> set[str]:
    app = create_admin_app(create_app(Config()))
    return {r.resource.canonical for r in app.router.routes() if r.resource is not None}


def test_image_health_check_asks_admin_readiness() -> None:
    env = dict(re.findall(r"(RERANK_PROXY_SERVER_[A-Z_]+)=(\S+?)(?:\s|\\|$)", DOCKERFILE))
    assert env["RERANK_PROXY_SERVER_ADMIN_HOST"] == "0.0.0.0"  # probes reach the pod's address
    assert env["RERANK_PROXY_SERVER_ADMIN_PORT"] == str(ADMIN_PORT)
    check = re.search(r"^HEALTHCHECK .*\n\s+CMD (.*)$", DOCKERFILE, re.MULTILINE)
    assert check is not None
    assert "/health/ready" in check.group(1) and "RERANK_PROXY_SERVER_ADMIN_PORT" in check.group(1)
    assert "curl" not in check.group(1)  # python:3.11-slim has none
    assert "/health/ready" in _admin_paths()
    exposed = re.search(r"^EXPOSE (.*)$", DOCKERFILE, re.MULTILINE)
    assert exposed is not None and exposed.group(1).split() == ["8000", str(ADMIN_PORT)]


def test_compose_checks_readiness_and_keeps_admin_off_the_network() -> None:
    proxy = COMPOSE["services"]["proxy"]
    port = proxy["environment"]["RERANK_PROXY_SERVER_ADMIN_PORT"]
    assert port == str(ADMIN_PORT)
    assert f"http://127.0.0.1:{port}/health/ready" in " ".join(proxy["healthcheck"]["test"])
    admin = [p for p in proxy["ports"] if p.endswith(f":{port}")]
    assert admin == [f"127.0.0.1:{port}:{port}"]
    grace = int(proxy["stop_grace_period"].rstrip("s"))
    assert grace > ServerConfig().shutdown_timeout_s
    assert set(GPU["services"]["proxy"]["healthcheck"]) <= set(proxy["healthcheck"])  # an override


def test_the_compiler_build_argument_installs_what_compile_looks_for() -> None:
    """``rerank.compile`` looks for g++ (inductor, CPU) and gcc (Triton, cuda): the runtime stage
    installs g++, which brings gcc, when built with WITH_COMPILER=1, and nothing by default."""
    runtime = DOCKERFILE[DOCKERFILE.index("AS runtime") :]
    assert re.search(r"^ARG WITH_COMPILER=0$", runtime, re.MULTILINE)
    step = re.search(
        r'^RUN if \[ "\$\{WITH_COMPILER\}" = "1" \]; then(.*?)fi$', runtime, re.MULTILINE | re.DOTALL
    )
    assert step is not None and "apt-get install -y --no-install-recommends g++" in step.group(1)
    assert runtime.index("ARG WITH_COMPILER") < runtime.index("USER app")  # installed as root
