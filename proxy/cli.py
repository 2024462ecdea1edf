"""``rerank-proxy``: the command line, and the only place that reads ``os.environ``.

Every configuration option gets a ``--<section>-<key>`` flag generated from the dataclasses in
:mod:`proxy.config`, so flags, environment variables, YAML keys and docs can never drift apart.
Start-up problems (a bad option, a model that will not load, a busy port) end the process with one
readable line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from .config import (
    ALIASES,
    DEFAULT_MODEL,
    ENV_PREFIX,
    MODEL_KEYS,
    RULE_KEYS,
    SECTIONS,
    Config,
    ConfigError,
    mask_url,
    option_keys,
)
from .config_load import explicit_keys, load_config

STRUCTURED_EXAMPLE = [
    "# Per-index rules, each with its own model (YAML only). Searches of an index no rule names get the",
    "# rerank section above. A rule's index patterns are matched against the indices a request names",
    "# (wildcards and comma lists; aliases by their own name). A model entry sets any of the rerank",
    "# section's model options (model, scorer, backend, backend_url, max_length, device, dtype...) and",
    "# inherits the rest; a rule sets index, model, enabled, field, top_k and query_path.",
    "#",
    "# models:",
    "#   german:",
    "#     model: deepset/gbert-base-germandpr-reranking",
    "#   shared-gpu:",
    "#     model: mixedbread-ai/mxbai-rerank-base-v1",
    "#     backend: cohere",
    "#     backend_url: http://infinity:7997/rerank",
    "# rules:",
    "#   - index: docs-de-*",
    "#     model: german",
    "#     field: [title, body]",
    "#   - index: [logs-*, metrics-*]",
    "#     enabled: false",
    "",
]


def _flag(key: str) -> str:
    return "--" + key.replace(".", "-").replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerank-proxy",
        description="Elasticsearch proxy that reranks _search hits with a transformer cross-encoder.",
        epilog=f"Precedence: flags > {ENV_PREFIX}<SECTION>_<KEY> environment variables > --config "
        "YAML file > defaults.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file (see config/default.yaml).")
    parser.add_argument(
        "--print-config", action="store_true", help="Print the effective configuration and exit."
    )
    parser.add_argument("--upstream", dest="alias_upstream", metavar="URL", help="Short for --upstream-url.")
    for key, f in option_keys():
        parser.add_argument(_flag(key), dest=key, metavar="VALUE", help=f"{f.metadata['help']} [{key}]")
    return parser


def _yaml_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def render_default_yaml() -> str:
    """The commented default configuration, one entry per option; config/default.yaml is this text."""
    lines = [
        "# rerank-proxy configuration: every option with its default.",
        f"# Override with {ENV_PREFIX}<SECTION>_<KEY> environment variables or --<section>-<key> flags.",
        "",
    ]
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            value = _yaml_value(f.default)
            text = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
            text = text[1:-1] if text.startswith("{") else text
            lines.append(f"  # {f.metadata['help']}")
            lines.append(f"  {text}")
        lines.append("")
    lines.extend(STRUCTURED_EXAMPLE)
    return "\n".join(lines)


def _masked(values: dict[str, Any]) -> dict[str, Any]:
    if values.get("backend_api_key") is not None:
        values["backend_api_key"] = "***"
    return values


def render_config(cfg: Config) -> str:
    """The effective configuration as YAML, secrets masked; ``models:`` and ``rules:`` as resolved."""
    data: dict[str, Any] = {
        s: {f.name: _yaml_value(getattr(getattr(cfg, s), f.name)) for f in dataclasses.fields(cls)}
        for s, cls in SECTIONS.items()
    }
    data["upstream"]["url"] = mask_url(cfg.upstream.url)
    _masked(data["rerank"])
    if cfg.models:
        data["models"] = {
            name: _masked({k: _yaml_value(getattr(m, k)) for k in MODEL_KEYS})
            for name, m in cfg.models.items()
        }
    if cfg.rules:
        data["rules"] = [
            {
                "index": list(rule.index),
                "model": rule.model,
                **{k: _yaml_value(getattr(rule.rerank, k)) for k in RULE_KEYS},
            }
            for rule in cfg.rules
        ]
    return yaml.safe_dump(data, sort_keys=False)


def parse(
    argv: Sequence[str] | None, env: dict[str, str]
) -> tuple[Config, argparse.Namespace, frozenset[str]]:
    """The configuration, the parsed flags, and which option keys a source set explicitly."""
    args = build_parser().parse_args(argv)
    overrides = {key: getattr(args, key) for key, _ in option_keys() if getattr(args, key) is not None}
    for alias, key in ALIASES.items():
        value = getattr(args, f"alias_{alias}")
        if value is not None:
            overrides.setdefault(key, value)
    return load_config(args.config, env, overrides), args, explicit_keys(args.config, env, overrides)


def _models_line(cfg: Config) -> str:
    """The models a search can reach, for the start-up line: ``model X`` alone, or ``models a: X, b: Y``."""
    used = cfg.models_in_use()
    if not used:
        return "reranking disabled"
    if list(used) == [DEFAULT_MODEL]:
        return f"model {cfg.rerank.model}"
    return "models " + ", ".join(f"{name}: {m.model}" for name, m in used.items())


def main(argv: Sequence[str] | None = None) -> int:
    try:
        env = dict(os.environ)
        cfg, args, explicit = parse(argv, env)
    except ConfigError as exc:
        print(f"rerank-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(render_config(cfg), end="")
        return 0

    from .server import ListenError, configure_logging, run

    configure_logging(cfg.server.log_level, cfg.server.log_format)
    from .app import create_app
    from .first_run import offline_fallback
    from .scorer import ModelLoadError

    log = logging.getLogger("proxy")

    def fail(line: str, code: int) -> int:
        # With JSON logs the failure is a JSON line too; plain, it is the bare line on stderr.
        if cfg.server.log_format == "json":
            log.error("%s", line)
        else:
            print(line, file=sys.stderr)
        return code

    fallback = offline_fallback(cfg, explicit, env)
    if fallback is not None:
        cfg, line = fallback
        log.warning("%s", line)
    scheme = "https" if cfg.server.tls_cert_file else "http"
    log.info(
        "rerank-proxy on %s://%s:%d -> %s (%s)",
        scheme,
        cfg.server.host,
        cfg.server.port,
        mask_url(cfg.upstream.url),
        _models_line(cfg),
    )
    try:
        run(create_app(cfg), cfg.server)
    except ConfigError as exc:  # the TLS files, read when the listener is built
        return fail(f"rerank-proxy: configuration error: {exc}", 2)
    except (ModelLoadError, ListenError) as exc:
        return fail(f"rerank-proxy: {exc}", 1)
    except OSError as exc:
        return fail(f"rerank-proxy: {exc.strerror or exc}", 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
