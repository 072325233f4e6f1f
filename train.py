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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from config import ConfigError, apply_args
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


def parse_config(argv: list[str]) -> Config:
    """Defaults, then `--config file.json`, then `--key value` / `--key=value` overrides, then value checks."""
    cfg = apply_args(Config(), argv)
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
