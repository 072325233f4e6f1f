"""Multi-turn GRPO for user-centric agents: the UserRL recipe (arXiv 2509.19736), written by hand in PyTorch.

    python train.py                                             # offline demo: tiny model, scripted users, CPU
    python train.py --config configs/demo.json --steps 3        # a named recipe plus overrides
    python train.py --lr abc                                    # -> error: --lr: expected a float, got 'abc'

Config: the defaults below, then `--config file.json`, then `--key value` (or `--key=value`) overrides;
unknown keys and values of the wrong type are rejected with a message that names the key.
"""
import dataclasses
import json
import os
import random
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models import load_model  # noqa: F401  (part of this module's API: train.load_model)


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    model: str = "tiny"
    """policy: "tiny" (offline random model), a hub id such as Qwen/Qwen3-4B, or a local folder"""
    seed: int = 0
    """seeds python, numpy and torch on every rank"""
    out_dir: str = ""
    """run folder; empty means runs/<timestamp>"""
    steps: int = 3
    """number of GRPO steps to run"""
    lr: float = 1e-6
    """AdamW learning rate, constant (the paper's recipe)"""
    dtype: str = "float32"
    """parameter dtype: float32 or bfloat16"""


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


def parse_config(argv: list[str], cfg=None):
    """Defaults, then `--config file.json`, then `--key value` / `--key=value` overrides, in that order."""
    cfg = cfg if cfg is not None else Config()
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
    validate(cfg)
    return cfg


def validate(cfg: Config):
    """Checks of values (types are checked on parsing); run before any model is loaded."""
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype: expected float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.steps < 0:
        raise ConfigError(f"--steps: must be >= 0, got {cfg.steps}")
    if not cfg.lr > 0:
        raise ConfigError(f"--lr: must be > 0, got {cfg.lr}")


# ----------------------------------------------------------------------------------------------------------
# Run set-up


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_run_dir(cfg: Config) -> Path:
    out = Path(cfg.out_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return out


def main(argv: list[str]):
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    run_dir = make_run_dir(cfg)
    print(json.dumps(dataclasses.asdict(cfg)))
    seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.model, seed=cfg.seed, dtype=getattr(torch, cfg.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"run folder: {run_dir}")
    print(f"model: {cfg.model} ({n_params:,} parameters), tokenizer vocab {len(tokenizer)}")
    print("The GRPO loop is not implemented yet (see the open issues); nothing was trained.")


if __name__ == "__main__":
    main(sys.argv[1:])
