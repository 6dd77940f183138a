"""Raw config input before the schema: `section.key=value` overrides, PyYAML's float quirk, and pydantic's
validation errors as one-line problems, all reported together in one `ConfigError` (`vlm_tune.config` holds
the schema and the cross-field rules)."""

from __future__ import annotations

import contextlib
import difflib
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vlm_tune.errors import UserError


class ConfigError(UserError):
    """One or more problems in a config file or its overrides."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


def valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of `model` and its nested sections."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(valid_keys(ann, dotted + "."))
    return keys


def suggest(key: str, schema: type[BaseModel]) -> str:
    """' (did you mean X?)' for the closest valid key of `schema`, preferring keys in the same section."""
    valid = valid_keys(schema)
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    same = (
        [k for k in valid if k.rsplit(".", 1)[0] == parent] if parent else [k for k in valid if "." not in k]
    )
    for pool in (same, valid):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return f" (did you mean {match[0]}?)"
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = [k for k in valid if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], n=1, cutoff=0.8)]
    return f" (did you mean {by_leaf[0]}?)" if by_leaf else ""


def format_errors(err: ValidationError, schema: type[BaseModel]) -> list[str]:
    """pydantic's errors → one line per problem ('key: got value; expected ...'), unknown keys with a
    suggestion from `schema`."""
    problems = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # pydantic adds union member names (e.g. 'str', 'dict[str,str]') and list indices to loc
        loc = [
            p
            for p in loc
            if not p.startswith(("function-", "literal[")) and p not in ("str", "dict[str,str]", "int")
        ]
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key{suggest(key, schema)}")
            continue
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "a mapping"
        msg = e["msg"]
        if msg.lower().startswith("input should be"):
            msg = "expected " + msg.split(" ", 3)[-1]
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append(f"{key}: got {shown}; {msg}")
    # union types report one error per member; keep the first per key+value
    seen, unique = set(), []
    for p in problems:
        head = p.split(";")[0]
        if head not in seen:
            seen.add(head)
            unique.append(p)
    return unique


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[list[str], Any]]:
    """`a.b=value` strings → (key path, YAML-parsed value). Bad syntax raises ConfigError."""
    parsed, problems = [], []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            problems.append(f"override {item!r}: expected section.key=value (e.g. train.learning_rate=1e-4)")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads 1e-4 as a string; numbers like that are meant as floats
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value) if any(c in value for c in "eE.") and value.strip() else value
        parsed.append((key.strip().split("."), value))
    if problems:
        raise ConfigError(problems, "overrides")
    return parsed


def fix_yaml_floats(node: Any) -> Any:
    """PyYAML reads '1e-4' (no dot) as a string; turn such strings back into floats."""
    if isinstance(node, dict):
        return {k: fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [fix_yaml_floats(v) for v in node]
    if isinstance(node, str):
        s = node.strip()
        if s and s[0] in "0123456789+-." and ("e" in s or "E" in s):
            try:
                return float(s)
            except ValueError:
                return node
    return node


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set each `a.b.c=value` into a nested dict (creating levels; unknown keys are caught by validation)."""
    for path, value in parse_overrides(overrides):
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return raw
