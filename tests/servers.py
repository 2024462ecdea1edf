"""The real search servers the integration tests talk to, and starting them once per session.

The matrix: Elasticsearch 8.19 (the default, ``es_url``), Elasticsearch 9, OpenSearch 3 and OpenSearch
2, each on its own port, each the official integ-test zip from Maven Central run by
``scripts/elasticsearch.sh``. A server whose environment variable (``url_env``) names a URL is used as
it is and never started or stopped.

A test that needs a server carries its marker (``es8``, ``es9``, ``os3``, ``os2``), so ``pytest -m os3``
runs one server's tests alone and the session knows, once collection is done, which servers its
selected tests need. The first test that needs any of them starts all of them at once, and they run
with the C1 compiler only (``-XX:TieredStopAtLevel=1``): start-up is mostly JIT compilation, and a
server that lives for one test session never profits from C2. On the 2-core machine the three extra
servers came up in about 13 s together this way, against 20 s one after the other and 39 s together
with C2. A server that was
already running is used as it is. Developers' sessions share the machine's ports, so each session
holds a lease on the servers it uses (``Leases``): the last session to let go of a server that a test
session started stops it, and one that no test session started (the shared default server, say) is
never stopped.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "scripts" / "elasticsearch.sh"
START_TIMEOUT_S = 600  # a first run downloads and unpacks the zips
LEASE_DIR = Path(tempfile.gettempdir()) / "rerank-proxy-servers"


@dataclass(frozen=True)
class ServerSpec:
    marker: str  # pytest marker and test id
    distribution: str  # the script's ES_DISTRIBUTION
    version: str
    port: int
    url_env: str  # a running server to use instead of starting one
    fixture: str  # the session fixture that yields its URL

    @property
    def product(self) -> str:
        return {"elasticsearch": "Elasticsearch", "opensearch": "OpenSearch"}[self.distribution]

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def __str__(self) -> str:
        return f"{self.product} {self.version}"


SERVERS = (
    ServerSpec(
        "es8",
        "elasticsearch",
        "8.19.21",
        int(os.environ.get("ES_TEST_PORT", "9250")),
        "ELASTICSEARCH_URL",
        "es_url",
    ),
    ServerSpec("es9", "elasticsearch", "9.5.4", 9251, "ES9_URL", "es9_url"),
    ServerSpec("os3", "opensearch", "3.8.0", 9252, "OPENSEARCH3_URL", "opensearch3_url"),
    ServerSpec("os2", "opensearch", "2.19.6", 9253, "OPENSEARCH2_URL", "opensearch2_url"),
)
BY_MARKER = {s.marker: s for s in SERVERS}


def mark_items(items: Iterable[pytest.Item]) -> None:
    """Give a test that uses a server's fixture that server's marker (tests parametrized over servers
    carry theirs already), and the ``integration`` marker to any test that needs a server."""
    for item in items:
        for spec in SERVERS:
            if spec.fixture in getattr(item, "fixturenames", ()) and not item.get_closest_marker(spec.marker):
                item.add_marker(spec.marker)
        if needed_by([item]) and not item.get_closest_marker("integration"):
            item.add_marker("integration")


def needed_by(items: Iterable[pytest.Item]) -> set[str]:
    return {m.name for item in items for m in item.iter_markers() if m.name in BY_MARKER}


class Leases:
    """Which test sessions on this machine use the server on a port: one file per session, named by
    its PID, beside a flag saying a test session started the server. Developers share the machine
    and its ports, so the session that started a server is not always the last to need it: the last
    session to let go stops it, and a server that no test session started is never stopped."""

    def __init__(self, port: int) -> None:
        self.dir = LEASE_DIR / str(port)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._mine = self.dir / str(os.getpid())
        self._started = self.dir / "started-by-a-test-session"

    @contextmanager
    def locked(self) -> Iterator[None]:
        with open(self.dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def take(self) -> None:
        self._mine.touch()

    def mark_started(self) -> None:
        self._started.touch()

    def release(self) -> bool:
        """Let go; True when this was the last session using a server a test session started."""
        self._mine.unlink(missing_ok=True)
        others = [f for f in self.dir.iterdir() if f.name.isdigit() and _alive(int(f.name))]
        if others or not self._started.exists():
            return False
        self._started.unlink()
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class ServerPool:
    """The session's servers: started together on first use, stopped at the end by the last session
    using them."""

    def __init__(self, needed: Iterable[str], log_dir: Path) -> None:
        self._needed = set(needed)
        self._log_dir = log_dir
        self._launched: dict[str, subprocess.Popen[bytes] | None] = {}  # None: already running
        self._urls: dict[str, str] = {}

    def url(self, marker: str) -> str:
        if marker in self._urls:
            return self._urls[marker]
        spec = BY_MARKER[marker]
        given = os.environ.get(spec.url_env)
        if given:
            self._urls[marker] = given.rstrip("/")
            return self._urls[marker]
        if marker not in self._launched:
            self._launch([marker, *sorted(self._needed - set(self._launched))])
        if not self._settle(marker):
            err = (self._log_dir / f"{marker}.err").read_text(errors="replace")
            raise RuntimeError(f"{spec} did not start on port {spec.port}:\n{err[-4000:]}")
        self._urls[marker] = f"http://127.0.0.1:{spec.port}"
        return self._urls[marker]

    def _settle(self, marker: str) -> bool:
        """Wait for the server's start, if this session ran one; True when the server is up. A start
        that found the server up after all (the status check can fail on a loaded machine) or
        waited for another's start did not start it: only one whose script launched a JVM did."""
        proc = self._launched[marker]
        if proc is None:
            return True
        if proc.wait(timeout=START_TIMEOUT_S) != 0:
            return False
        if "elasticsearch.sh: starting " in (self._log_dir / f"{marker}.err").read_text(errors="replace"):
            leases = Leases(BY_MARKER[marker].port)
            with leases.locked():
                leases.mark_started()
        self._launched[marker] = None  # settled
        return True

    def _launch(self, markers: Iterable[str]) -> None:
        for marker in markers:
            spec = BY_MARKER[marker]
            if marker in self._launched or os.environ.get(spec.url_env):
                continue
            leases = Leases(spec.port)
            with leases.locked():
                running = self._script(spec, "status").wait() == 0
                leases.take()
            if running:
                self._launched[marker] = None
                continue
            # Another session starting the same server meanwhile is fine: the script lets one start
            # run at a time per port, and the second finds the server up.
            with (
                open(self._log_dir / f"{marker}.out", "wb") as out,
                open(self._log_dir / f"{marker}.err", "wb") as err,
            ):
                self._launched[marker] = self._script(spec, "start", stdout=out, stderr=err)

    def stop(self) -> None:
        """Let go of every server this session used; stop those no other session uses any more."""
        for marker in self._launched:
            self._settle(marker)  # a start still under way finishes first
        with ExitStack() as locks:
            stopping = []
            for marker in sorted(self._launched):
                spec = BY_MARKER[marker]
                leases = Leases(spec.port)
                locks.enter_context(leases.locked())  # held until stopped: no one takes it meanwhile
                if leases.release():
                    stopping.append(self._script(spec, "stop"))
            for proc in stopping:
                proc.wait(timeout=120)

    @staticmethod
    def _script(
        spec: ServerSpec, command: str, stdout: IO[bytes] | None = None, stderr: IO[bytes] | None = None
    ) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "ES_DISTRIBUTION": spec.distribution,
            "ES_VERSION": spec.version,
            "ES_PORT": str(spec.port),
            "ES_JAVA_OPTS": os.environ.get("ES_JAVA_OPTS", "-XX:TieredStopAtLevel=1"),
        }
        return subprocess.Popen(
            ["bash", str(SERVER_SCRIPT), command],
            env=env,
            stdout=stdout or subprocess.DEVNULL,
            stderr=stderr or subprocess.DEVNULL,
        )


def http(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request: status, headers (lower-case names) and the body's exact bytes, error
    statuses included."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
