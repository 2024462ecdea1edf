"""``make demo``: one question asked of Elasticsearch directly and through the proxy, side by side.

Starts what is needed (a local Elasticsearch with scripts/elasticsearch.sh unless --es-url names one,
and rerank-proxy as its own process), indexes the project's sample corpus (demo/corpus.json), asks the
question both ways and prints the two top fives next to each other. Stops what it started.

    python scripts/demo.py [--es-url URL] [--query TEXT] [-- extra rerank-proxy flags]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INDEX = "rerank-demo"
QUERY = "coffee tastes too acidic, what should I change"
WIDTH = 38


def http(
    url: str, method: str = "GET", body: Any = None, ndjson: bool = False
) -> tuple[int, dict[str, str], Any]:
    data = None
    headers = {}
    if body is not None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        headers["Content-Type"] = "application/x-ndjson" if ndjson else "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def index_corpus(es: str) -> list[dict[str, str]]:
    docs: list[dict[str, str]] = json.loads((ROOT / "demo" / "corpus.json").read_text())
    http(f"{es}/{INDEX}", "DELETE")
    http(f"{es}/{INDEX}", "PUT", {"settings": {"number_of_shards": 1, "number_of_replicas": 0}})
    lines = "".join(
        json.dumps({"index": {"_index": INDEX, "_id": d["id"]}}) + "\n" + json.dumps(d) + "\n" for d in docs
    )
    status, _, _ = http(f"{es}/_bulk?refresh=true", "POST", lines, ndjson=True)
    if status != 200:
        raise SystemExit(f"demo: indexing into {es} failed ({status})")
    return docs


def start_proxy(es: str, port: int, admin: int, extra: list[str], log: Any) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "proxy.cli",
        "--upstream",
        es,
        "--server-port",
        str(port),
        "--server-admin-port",
        str(admin),
        "--rerank-top-k",
        "20",
    ]
    proc = subprocess.Popen([*cmd, *extra], cwd=ROOT, stderr=log, text=True)
    deadline = time.monotonic() + 600  # a first run may download the default model
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"demo: rerank-proxy stopped:\n{log.read()}")
        try:
            if http(f"http://127.0.0.1:{admin}/health/ready")[0] == 200:  # loaded, Elasticsearch answers
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("demo: rerank-proxy did not start")


def side_by_side(direct: list[dict[str, Any]], proxied: list[dict[str, Any]]) -> str:
    rows = [
        f"{'Elasticsearch (BM25)':<{WIDTH}}  {'through rerank-proxy':<{WIDTH}}",
        f"{'-' * WIDTH}  {'-' * WIDTH}",
    ]
    for i in range(max(len(direct), len(proxied))):
        left = f"{i + 1}. {direct[i]['_source']['title']}" if i < len(direct) else ""
        right = f"{i + 1}. {proxied[i]['_source']['title']}" if i < len(proxied) else ""
        rows.append(f"{left[:WIDTH]:<{WIDTH}}  {right[:WIDTH]:<{WIDTH}}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--es-url", help="a running Elasticsearch (default: start one on :9200)")
    ap.add_argument("--query", default=QUERY)
    ap.add_argument("proxy_args", nargs="*", help="extra rerank-proxy flags (after --)")
    args = ap.parse_args()
    started_es = False
    es = args.es_url or os.environ.get("RERANK_PROXY_UPSTREAM_URL")
    if not es:
        script = ROOT / "scripts" / "elasticsearch.sh"
        status = subprocess.run(["bash", str(script), "status"], capture_output=True)
        out = subprocess.run(["bash", str(script), "start"], check=True, capture_output=True, text=True)
        es, started_es = out.stdout.strip().splitlines()[-1], status.returncode != 0
    es = es.rstrip("/")
    port, admin = free_port(), free_port()
    proxy = None
    with tempfile.TemporaryFile("w+") as log:
        try:
            docs = index_corpus(es)
            proxy = start_proxy(es, port, admin, args.proxy_args, log)
            log.seek(0)
            for line in log.read().splitlines():  # e.g. which model a machine without the Hub starts with
                if "WARNING" in line:
                    print(line.split(": ", 1)[-1])
            body = {"query": {"match": {"text": args.query}}, "size": 5}
            _, _, direct = http(f"{es}/{INDEX}/_search", "POST", body)
            _, headers, proxied = http(f"http://127.0.0.1:{port}/{INDEX}/_search", "POST", body)
            _, _, stats = http(f"http://127.0.0.1:{admin}/_rerank/stats")
            print(f"\n{len(docs)} passages in {INDEX} at {es}; model {stats.get('model')}")
            print(f'query: "{args.query}"   X-Rerank-Status: {headers.get("X-Rerank-Status")}\n')
            print(side_by_side(direct["hits"]["hits"], proxied["hits"]["hits"]))
            print("\n`make run` starts a proxy that stays up; point any Elasticsearch client at it.")
        finally:
            if proxy is not None:
                proxy.terminate()
                proxy.wait(30)
            if started_es:
                subprocess.run(
                    ["bash", str(ROOT / "scripts" / "elasticsearch.sh"), "stop"], capture_output=True
                )


if __name__ == "__main__":
    main()
