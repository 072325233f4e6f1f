"""Dataclass configs from the command line: `--config file.json`, then `--key value` overrides.

Nested dataclasses are addressed with dots (`--rollout.max_turns 8`, `--user.backend http`); in a JSON file
they are nested objects. Every value is converted to the field's declared type; unknown keys and values of
the wrong type raise ConfigError with a message that names the key. Keys starting with `_` in a JSON file
are comments.
"""
import dataclasses
import json
import typing


class ConfigError(ValueError):
    pass


def _convert(key: str, value, typ):
    """`value` (a string from the command line, or a JSON value from a file) as type `typ`."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"--{key}: expected true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"--{key}: expected {typ.__name__}, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key}: expected {'an int' if typ is int else 'a float'}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ConfigError(f"--{key}: expected an int, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"--{key}: expected a string, got {value!r}")
        return value
    if typ is dict or getattr(typ, "__origin__", None) is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"--{key}: expected a JSON object, got {value!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"--{key}: expected a JSON object, got {value!r}")
        return value
    raise ConfigError(f"--{key}: unsupported field type {typ}")


def _set(cfg, key: str, value):
    """Set `a.b.c` on a (nested) dataclass config, converting `value` to the field's declared type."""
    obj, *path = cfg, *key.split(".")
    for i, name in enumerate(path):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields:
            raise ConfigError(f"--{key}: unknown config key (known: {', '.join(sorted(fields))})")
        if i < len(path) - 1:
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"--{key}: {name} has no sub-keys")
        elif dataclasses.is_dataclass(getattr(obj, name)):
            if not isinstance(value, dict):
                raise ConfigError(f"--{key}: expected an object of sub-keys, got {value!r}")
            for sub, v in value.items():
                _set(cfg, f"{key}.{sub}", v)
        else:
            setattr(obj, name, _convert(key, value, _field_type(obj, name)))


def _field_type(obj, name: str):
    return typing.get_type_hints(type(obj))[name]


def apply_args(cfg, argv: list[str]):
    """Overlay `--config file.json`, then `--key value` / `--key=value` overrides, onto dataclass `cfg`."""
    pairs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; use --key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{arg[2:]}: missing value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        pairs.append((key, value))
    for key, value in pairs:
        if key == "config":
            try:
                with open(value, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"--config: cannot read {value}: {e}") from None
            for k, v in data.items():
                if not k.startswith("_"):  # "_comment" keys document a recipe file
                    _set(cfg, k, v)
    for key, value in pairs:
        if key != "config":
            _set(cfg, key, value)
    return cfg
