"""Reading the configuration from its sources: the YAML file, the environment, command-line flags.

:mod:`proxy.config` declares every option and checks each section's values; this module turns text
and YAML values into those types (errors naming the key), layers the sources by precedence, and reads
the YAML-only ``models:`` and ``rules:`` sections into named models and per-index rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .config import (
    DEFAULT_MODEL,
    ENV_PREFIX,
    MODEL_KEYS,
    RULE_KEYS,
    SECTIONS,
    STRUCTURED,
    Config,
    ConfigError,
    RerankConfig,
    Rule,
    option_keys,
    require,
)


def _field_type(section: str, name: str) -> Any:
    return typing.get_type_hints(SECTIONS[section])[name]


def _coerce(key: str, value: Any, typ: Any, from_text: bool) -> Any:
    """Turn a YAML value or an env/CLI string into the option's type, naming the key on failure."""
    optional = False
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        optional, typ = True, args[0]
    if value is None or (from_text and optional and value in ("", "null", "none")):
        if optional:
            return None
        raise ConfigError(f"{key}: must not be empty")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
            return value.lower() in {"true", "1", "yes", "on"}
        raise ConfigError(f"{key}: expected true or false (got {value!r})")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return _number_text(key, value, int, "an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _number_text(key, value, float, "a number")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string (got {value!r})")
    if typing.get_origin(typ) is tuple:
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",")] if from_text else [value]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            items = list(value)
        else:
            raise ConfigError(f"{key}: expected a string or a list of strings (got {value!r})")
        return tuple(items)
    raise ConfigError(f"{key}: unsupported option type {typ!r}")  # pragma: no cover


def _number_text(key: str, value: Any, cast: type[int] | type[float], what: str) -> int | float:
    """A number written as text (an environment variable, a flag, a quoted YAML value)."""
    if isinstance(value, str):
        try:
            return cast(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected {what} (got {value!r})")


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown configuration key '{key}'{hint}")


def _from_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    flat: dict[str, Any] = {}
    known = [k for k, _ in option_keys()]
    for section, body in data.items():
        if section in STRUCTURED:
            continue
        if section not in SECTIONS:
            raise _unknown(str(section), [*SECTIONS, *STRUCTURED])
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a mapping of options (got {body!r})")
        for name, value in body.items():
            key = f"{section}.{name}"
            if key not in known:
                raise _unknown(key, known)
            flat[key] = value
    return flat


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    by_var = {ENV_PREFIX + key.replace(".", "_").upper(): key for key, _ in option_keys()}
    flat: dict[str, str] = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        if var == ENV_PREFIX + "CONFIG":
            continue
        if var not in by_var:
            raise _unknown(var, list(by_var))
        flat[by_var[var]] = value
    return flat


def explicit_keys(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> frozenset[str]:
    """The option keys a source sets (the YAML file, an environment variable, a flag), as opposed to
    those left at their defaults: a default the operator did not choose may be replaced at start-up."""
    env = env or {}
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = env[ENV_PREFIX + "CONFIG"]
    keys = set(overrides or {}) | set(_from_env(env))
    if path is not None:
        keys |= set(_from_yaml(Path(path)))
    return frozenset(keys)


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Config:
    """Build the one Config: defaults < YAML file < environment < overrides (CLI flags, as text)."""
    env = env or {}
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = env[ENV_PREFIX + "CONFIG"]
    layers: list[tuple[dict[str, Any], bool]] = []
    if path is not None:
        layers.append((_from_yaml(Path(path)), False))
    layers.append((dict(_from_env(env)), True))
    layers.append((dict(overrides or {}), True))

    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    known = [k for k, _ in option_keys()]
    for flat, from_text in layers:
        for key, raw in flat.items():
            if key not in known:
                raise _unknown(key, known)
            section, name = key.split(".", 1)
            values[section][name] = _coerce(key, raw, _field_type(section, name), from_text)
    cfg = Config(**{s: cls(**values[s]) for s, cls in SECTIONS.items()})
    if path is None:
        return cfg
    structured = _structured(Path(path))
    models = _models(structured.get("models"), cfg.rerank)
    rules = _rules(structured.get("rules"), cfg.rerank, models)
    return dataclasses.replace(cfg, models=models, rules=rules)


def _structured(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))  # readable: _from_yaml read it first
    return {k: v for k, v in data.items() if k in STRUCTURED} if isinstance(data, dict) else {}


def _replace(base: RerankConfig, prefix: str, raw: Mapping[str, Any]) -> RerankConfig:
    """``base`` with ``raw``'s rerank options (coerced as YAML values), errors naming ``prefix.key``."""
    values = {
        name: _coerce(f"{prefix}.{name}", value, _field_type("rerank", name), False)
        for name, value in raw.items()
    }
    try:
        return dataclasses.replace(base, **values)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("rerank.", f"{prefix}.", 1)) from None


def _models(raw: Any, rerank: RerankConfig) -> dict[str, RerankConfig]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"models: expected a mapping of model names to settings (got {raw!r})")
    models: dict[str, RerankConfig] = {}
    for name, body in raw.items():
        where = f"models.{name}"
        require(
            isinstance(name, str) and bool(re.fullmatch(r"[A-Za-z0-9_.-]+", name)),
            "models",
            name,
            "a model's name is letters, digits, '_', '-' or '.'",
        )
        require(name != DEFAULT_MODEL, where, name, f"'{DEFAULT_MODEL}' is the rerank section's own model")
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: expected a mapping of model settings (got {body!r})")
        for key in body:
            if key not in MODEL_KEYS:
                known = [f"{where}.{k}" for k in MODEL_KEYS]
                if key in RULE_KEYS:
                    raise ConfigError(f"{where}.{key}: a search setting; set it on a rule, not a model")
                raise _unknown(f"{where}.{key}", known)
        require("model" in body, f"{where}.model", None, "must name the model (an id, folder or pypi:)")
        # A named model keeps the rerank section's device, threads... unless it sets its own.
        models[name] = _replace(rerank, where, body)
    return models


def _patterns(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise ConfigError(f"{where}: expected an index pattern or a list of them (got {value!r})")
    require(bool(items) and all(items), where, value, "must name at least one index pattern")
    return tuple(items)


def _rules(raw: Any, rerank: RerankConfig, models: Mapping[str, RerankConfig]) -> tuple[Rule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"rules: expected a list of rules (got {raw!r})")
    rules: list[Rule] = []
    for i, body in enumerate(raw):
        where = f"rules[{i}]"
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: expected a mapping with index and settings (got {body!r})")
        for key in body:
            if key not in ("index", "model", *RULE_KEYS):
                known = [f"{where}.{k}" for k in ("index", "model", *RULE_KEYS)]
                if key in MODEL_KEYS:
                    raise ConfigError(
                        f"{where}.{key}: a model setting; declare the model under models: and name it here"
                    )
                raise _unknown(f"{where}.{key}", known)
        require("index" in body, f"{where}.index", None, "every rule names the indices it applies to")
        index = _patterns(f"{where}.index", body["index"])
        name = body.get("model", DEFAULT_MODEL)
        known_models = [DEFAULT_MODEL, *models]
        if name not in known_models:
            close = difflib.get_close_matches(str(name), known_models, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}.model: no model named {name!r} under models:{hint}")
        base = models.get(name, rerank)
        # The search settings start from the rerank section, not from the model's entry.
        base = dataclasses.replace(base, **{k: getattr(rerank, k) for k in RULE_KEYS})
        settings = {k: v for k, v in body.items() if k in RULE_KEYS}
        top_k = settings.get("top_k")
        if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > rerank.max_top_k:
            # max_top_k is the rerank section's, so the rule's top_k is what must change
            why = f"must be <= rerank.max_top_k ({rerank.max_top_k})"
            raise ConfigError(f"{where}.top_k: {why} (got {top_k!r})")
        rules.append(Rule(index, name, _replace(base, where, settings)))
    return tuple(rules)
