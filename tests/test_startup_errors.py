"""Start-up failures of the real ``rerank-proxy`` command: one line on stderr, the right exit code.

Each case runs the installed command as a user would and checks the CLI's promise: exit code 2 for a
bad configuration, 1 for a model or machine that cannot honour it (or a port it cannot listen on),
exactly one line on stderr that names the option and the value, no traceback, no "Unclosed client
session". The proxy logs at ``warning`` here, so its routine start-up info lines stay out of stderr
while any warning or error it logs (an unclosed session is one) would still count as an extra line.
No Elasticsearch is needed: every case fails before the first request.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from .conftest import free_port

BIN = Path(sys.executable).parent
COMMAND = (
    [str(BIN / "rerank-proxy")] if (BIN / "rerank-proxy").exists() else [sys.executable, "-m", "proxy.cli"]
)
# Nothing listens there: none of these cases gets as far as contacting Elasticsearch.
UPSTREAM = "http://127.0.0.1:9"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_PROXY_")}
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "RERANK_PROXY_SERVER_LOG_LEVEL": "warning",
        "RERANK_PROXY_SERVER_PORT": str(free_port()),
        "RERANK_PROXY_SERVER_ADMIN_PORT": str(free_port()),
        "RERANK_PROXY_UPSTREAM_URL": UPSTREAM,
    }
    return {**env, **defaults, **extra}


def start_up_error(
    args: Sequence[str],
    code: int,
    *needles: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> str:
    """Run the command to its failure; assert the exit code and the one stderr line, return it."""
    proc = subprocess.run(
        [*prefix, *COMMAND, *args],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "Unclosed" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rerank-proxy: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# Configuration errors: found before torch is imported, exit code 2.


@pytest.mark.parametrize(
    ("args", "env", "needles"),
    [
        (["--rerank-top-k", "0"], {}, ["rerank.top_k", "0"]),
        ([], {"RERANK_PROXY_UPSTREAM_URL": "ftp://x"}, ["upstream.url", "ftp://x"]),
        (["--rerank-device", "gpu"], {}, ["rerank.device", "gpu"]),
    ],
)
def test_bad_option(args: list[str], env: dict[str, str], needles: list[str]) -> None:
    start_up_error(args, 2, *needles, env=_env(**env))


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"rerank:\n  top_k: [1\n", ["not valid YAML", "line"]),
        (b"\xff\xfe rerank", ["not UTF-8"]),
        (b"rerank: 5\n", ["rerank", "expected a mapping"]),
        (b"rerank:\n  topk: 5\n", ["rerank.topk", "rerank.top_k"]),
    ],
)
def test_bad_config_file(tmp_path: Path, content: bytes, needles: list[str]) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_bytes(content)
    start_up_error(["--config", str(path)], 2, *needles)


def test_config_file_that_is_a_folder(tmp_path: Path) -> None:
    start_up_error(["--config", str(tmp_path)], 2, str(tmp_path), "Is a directory")


def _without_capabilities(*caps: str) -> list[str]:
    """A prefix that runs a root process without ``caps``, so root meets the refusals users meet."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is missing: root would not be refused")
    drop = ",".join(f"-{c}" for c in caps)
    return ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"]


def test_unreadable_config_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("rerank:\n  top_k: 5\n", encoding="utf-8")
    path.chmod(0)
    prefix = _without_capabilities("dac_override", "dac_read_search")
    start_up_error(["--config", str(path)], 2, str(path), "Permission denied", prefix=prefix)


def test_ca_bundle_without_certificates(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n", encoding="utf-8")
    start_up_error(["--upstream-ca-certs", str(ca)], 2, "upstream.ca_certs", str(ca))


# A model, device or machine that cannot honour the configuration: exit code 1, after torch is imported.


def _model_args(model: Path | str, *more: str) -> list[str]:
    return ["--rerank-model", str(model), "--rerank-device", "cpu", *more]


@pytest.mark.slow
@pytest.mark.parametrize("warmup", ["true", "false"])
def test_max_length_beyond_the_models_positions(tiny_model: Path, warmup: str) -> None:
    # With warm-up off nothing would run the model before the first search: the check is at load.
    start_up_error(
        _model_args(tiny_model, "--rerank-max-length", "1000", "--rerank-warmup", warmup),
        1,
        "rerank.max_length",
        "1000",
        "512 tokens",
        "max_position_embeddings 512",
    )


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps"])
def test_device_that_is_not_there(tiny_model: Path, device: str) -> None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight CUDA devices")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    line = start_up_error(["--rerank-model", str(tiny_model), "--rerank-device", device], 1)
    assert f"rerank.device: '{device}' asked for" in line
    if not torch.backends.cuda.is_built() and device.startswith("cuda"):
        assert "this torch build has no CUDA support" in line


@pytest.mark.slow
def test_compile_without_a_compiler(tiny_model: Path) -> None:
    # PATH holds only the interpreter's folder (no gcc, g++, cc or clang there) and CC/CXX name
    # nothing: what a slim container image looks like to torch's inductor.
    assert not any((BIN / c).exists() for c in ("gcc", "g++", "cc", "c++", "clang", "clang++"))
    env = _env(PATH=str(BIN), CC="/nonexistent", CXX="/nonexistent")
    start_up_error(_model_args(tiny_model, "--rerank-compile", "true"), 1, "rerank.compile", env=env)


def _broken_copy(tiny_model: Path, tmp_path: Path, *remove: str) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    for name in remove:
        (folder / name).unlink()
    return folder


@pytest.mark.slow
def test_model_folder_missing(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    start_up_error(_model_args(missing), 1, "rerank.model", str(missing), "no such folder")


@pytest.mark.slow
def test_corrupt_config_json(tiny_model: Path, tmp_path: Path) -> None:
    # Other broken folders (no weights, a JSON list, an unknown model_type): tests/test_model_checks.py.
    folder = _broken_copy(tiny_model, tmp_path)
    (folder / "config.json").write_text('{"model_type": "bert",', encoding="utf-8")
    start_up_error(_model_args(folder), 1, "rerank.model", str(folder), "config.json is not valid JSON")


@pytest.mark.slow
def test_model_folder_without_tokenizer(tiny_model: Path, tmp_path: Path) -> None:
    # transformers builds a tokenizer of special tokens alone here, silently: every word [UNK].
    folder = _broken_copy(tiny_model, tmp_path, "tokenizer.json", "tokenizer_config.json")
    start_up_error(_model_args(folder), 1, "rerank.model", str(folder), "no tokenizer vocabulary")


@pytest.mark.slow
def test_tokenizer_without_a_fast_version(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import ByT5Tokenizer  # Python-only: there is no fast ByT5 tokenizer

    folder = _broken_copy(tiny_model, tmp_path, "tokenizer.json", "tokenizer_config.json")
    ByT5Tokenizer().save_pretrained(folder)
    start_up_error(_model_args(folder), 1, "rerank.model", str(folder), "no fast tokenizer")


# Listening: after the model loaded, so these also check that a failed start closes what it opened.


@pytest.mark.slow
def test_port_in_use(tiny_model: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start_up_error(
            [*_model_args(tiny_model), "--server-port", str(port)],
            1,
            f"cannot listen on 127.0.0.1:{port}",
            "address already in use",
        )


@pytest.mark.slow
def test_port_needing_privileges(tiny_model: Path) -> None:
    start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if not start.exists() or int(start.read_text()) <= 81:
        pytest.skip("port 81 needs no privileges on this machine")
    prefix = _without_capabilities("net_bind_service")
    start_up_error(
        [*_model_args(tiny_model), "--server-port", "81"],
        1,
        "cannot listen on 127.0.0.1:81",
        "permission denied",
        prefix=prefix,
    )


def test_admin_port_in_use() -> None:
    """Found before any model loads: the admin listener opens first."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start_up_error(
            ["--rerank-enabled", "false", "--server-admin-port", str(port)],
            1,
            f"cannot listen on 127.0.0.1:{port}",
            "server.admin_port",
            "address already in use",
        )


def _tls_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    import trustme

    ca = trustme.CA()
    cert, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    paths = (tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other-key.pem")
    cert.cert_chain_pems[0].write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[1]))
    other.private_key_pem.write_to_path(str(paths[2]))
    return paths


@pytest.mark.parametrize(
    ("cert_at", "key_at", "key", "why"),
    [
        (0, 2, "server.tls_key_file", "not the private key"),  # the key of another certificate
        (1, 0, "server.tls_cert_file", "no PEM certificate"),  # the two files swapped
    ],
    ids=["key-of-another-certificate", "files-swapped"],
)
def test_tls_files_that_do_not_go_together(
    tmp_path: Path, cert_at: int, key_at: int, key: str, why: str
) -> None:
    """Found before any model loads, so a bad key costs a second, not a model download."""
    paths = _tls_pair(tmp_path)
    cert, private = str(paths[cert_at]), str(paths[key_at])
    args = ["--rerank-enabled", "false", "--server-tls-cert-file", cert, "--server-tls-key-file", private]
    start_up_error(args, 2, key, cert if key == "server.tls_cert_file" else private, why)
