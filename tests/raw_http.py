"""Raw HTTP/1.1 over a socket: send exact bytes, read one answer. For requests no client library will
send (malformed lines, bare CRs, absolute-form targets) and for comparing the proxy's answer to the
same bytes with Elasticsearch's own."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import Any

import orjson
from multidict import CIMultiDict


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> Answer | None:
    """Send ``raw`` to 127.0.0.1:``port`` and read one answer; None when the server closed the
    connection without answering. The body is read by its framing, not to the connection's end
    (Elasticsearch keeps some connections open after an error)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may refuse and close before reading it all
            sock.sendall(raw)
        reader = _Reader(sock)
        head = reader.until(b"\r\n\r\n")
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.add(name.strip(), value.strip())
        if "Content-Length" in headers:
            body = reader.exactly(int(headers["Content-Length"]))
        elif "chunked" in headers.get("Transfer-Encoding", "").lower():
            body = b""
            while True:
                size_line = reader.until(b"\r\n") or b"0"
                size = int(size_line.split(b";")[0], 16)
                chunk = reader.exactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = reader.rest()
        return Answer(status, headers, body)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def _more(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return False
        self.buf += data
        return bool(data)

    def until(self, mark: bytes) -> bytes | None:
        while mark not in self.buf:
            if not self._more():
                return None
        out, _, self.buf = self.buf.partition(mark)
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n and self._more():
            pass
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest(self) -> bytes:
        while self._more():
            pass
        out, self.buf = self.buf, b""
        return out


def request(method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    """A well-formed request's bytes, ``Host`` and ``Connection: close`` included."""
    lines = [f"{method} {target} HTTP/1.1", "Host: es", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_es_error(answer: Answer | None, status: int, es_type: str | None = None) -> dict[str, Any]:
    """``answer`` is an Elasticsearch-shaped error the proxy made: JSON, X-Elastic-Product, the shape."""
    assert answer is not None, "no answer"
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.headers.get("Content-Type", "").startswith("application/json"), answer.headers
    assert answer.headers.get("X-Elastic-Product") == "Elasticsearch", answer.headers
    body = answer.json()
    assert set(body) == {"error", "status"} and body["status"] == status, body
    error = body["error"]
    assert isinstance(error["root_cause"], list) and error["root_cause"], body
    assert {"type", "reason"} <= set(error) and error["root_cause"][0]["type"] == error["type"], body
    if es_type is not None:
        assert error["type"] == es_type, body
    return dict(error)
