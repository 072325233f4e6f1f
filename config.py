"""Dataclass configs from the command line (`--config file.json`, then `--key value` overrides), and the checks
of a config against this machine that train.py runs before any work.

Nested dataclasses are addressed with dots (`--rollout.max_turns 8`, `--user.backend http`); in a JSON file
they are nested objects. Every value is converted to the field's declared type; unknown keys, values of the
wrong type and non-finite floats (inf, nan) raise ConfigError with a message that names the key. Keys starting
with `_` in a JSON file are comments. A caller may name `fixed` keys that neither the command line nor a recipe
may set (a value derived from another key), each with the reason.

Secrets never enter a config: the run folder keeps config.json, and a shell keeps its history. An API key is read
from the environment variable a `*api_key_env` field names (e.g. --user.api_key_env, default OPENAI_API_KEY); a key
given as `--api_key`, `--user.api_key`, `--token` and the like, a `*api_key_env` value that is not a variable name
(a key pasted there), or a `*base_url` with a password in it, is refused with a message that never shows the value.

`check_before_work(cfg)` then reads what the config needs from the machine: the device, the ranks, the models'
names, every task file, the user endpoint. Each problem is one line (ConfigError naming the key, DataError naming
the file), raised before the run folder exists and before any model loads. `plan_ranks(cfg)` is the part about
GPUs: how many ranks train on which GPUs, and which GPUs the user server gets (train.main launches by it).
"""
import ast
import dataclasses
import inspect
import json
import math
import os
import re
import textwrap
import typing
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import requests
import transformers

import distributed
import envs
import sft
import users


class ConfigError(ValueError):
    """A mistake in the config or the command line; the message starts with the key (--lr: ...)."""


SECRET_NAME = re.compile(r"(?:\w+_)?(?:api_?key|key|token|secret|password)")
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _refuse_secret(cfg_obj, key: str, name: str, fields: dict):
    """A secret given as a config key: say which environment variable to put it in instead."""
    env_field = next((f for f in (f"{name}_env", "api_key_env") if f in fields), None)
    env_field = env_field or next((f for f in sorted(fields) if f.endswith("api_key_env")), None)
    var = getattr(cfg_obj, env_field) if env_field else "OPENAI_API_KEY"
    prefix = key[: len(key) - len(name)]
    other = f" (or name another variable with --{prefix}{env_field})" if env_field else ""
    raise ConfigError(f"--{key}: API keys are read only from environment variables, never from a flag or a config "
                      f"file (the run folder keeps its config): export {var}=...{other}")


def _check_secret_free(key: str, name: str, value):
    if name.endswith("api_key_env") and not ENV_NAME.fullmatch(value):
        raise ConfigError(f"--{key}: the NAME of the environment variable that holds the key, such as OPENAI_API_KEY "
                          "(capitals, digits, _); the value given is not one (not shown: it may be the key itself)")
    if name.endswith("base_url") and value and urllib.parse.urlsplit(value).password:
        raise ConfigError(f"--{key}: a URL with a password in it (not shown) would be kept in the run folder's "
                          "config; put the key in the environment variable the api_key_env key names")


class DataError(ValueError):
    """A task file that cannot be used; the message names the file (and the line and field where known)."""


def _convert(key: str, value, typ, from_file: bool = False):
    """`value` (a string from the command line, or a JSON value from a file) as type `typ`."""
    if typ in (bool, int, float) and isinstance(value, str) and (from_file or "_" in value or not value.isascii()):
        # JSON has numbers and booleans of its own; on the command line only plain ASCII numbers ("1_0" and
        # non-Latin digits are refused, though Python's int() and float() take them)
        raise ConfigError(f"--{key}: expected {'true or false' if typ is bool else 'a number'}, got {value!r}")
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
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"--{key}: expected {'an int' if typ is int else 'a float'}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ConfigError(f"--{key}: expected an int, got {value!r}")
        if not math.isfinite(out):  # float("inf") parses, then dies steps later (in the sampler, the optimizer)
            raise ConfigError(f"--{key}: expected a finite number, got {value!r}")
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


def _set(cfg, key: str, value, fixed: dict, from_file: bool = False):
    """Set `a.b.c` on a (nested) dataclass config, converting `value` to the field's declared type. A fixed key
    (derived from others) is refused on the command line and skipped in a file: a run's own config.json holds it."""
    if key in fixed:
        if from_file:
            return
        raise ConfigError(f"--{key}: {fixed[key]}")
    obj, *path = cfg, *key.split(".")
    for i, name in enumerate(path):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields and SECRET_NAME.fullmatch(name):
            _refuse_secret(obj, key, name, fields)
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
                if not sub.startswith("_"):  # "_comment" keys document a recipe, at any depth
                    _set(cfg, f"{key}.{sub}", v, fixed, from_file)
        else:
            value = _convert(key, value, _field_type(obj, name), from_file)
            if isinstance(value, str):
                _check_secret_free(key, name, value)
            setattr(obj, name, value)


def _field_type(obj, name: str):
    return typing.get_type_hints(type(obj))[name]


def apply_args(cfg, argv: list[str], fixed: dict | None = None):
    """Overlay `--config file.json`, then `--key value` / `--key=value` overrides, onto dataclass `cfg`.
    `fixed`: {dotted key: why it cannot be set}."""
    fixed = fixed or {}
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
            if not isinstance(data, dict):
                kind = "an array" if isinstance(data, list) else f"a {type(data).__name__}"
                raise ConfigError(f"--config: {value} holds {kind}; a recipe is a JSON object of keys, "
                                  'e.g. {"lr": 1e-6, "rollout": {"max_turns": 8}}')
            for k, v in data.items():
                if not k.startswith("_"):  # "_comment" keys document a recipe file
                    _set(cfg, k, v, fixed, from_file=True)
    for key, value in pairs:
        if key != "config":
            _set(cfg, key, value, fixed)
    return cfg


HELP = ("-h", "--help")


def field_docs(cls) -> dict:
    """{field name: its description} of a dataclass, inherited fields included: the string literal written under
    each field, the convention of every config here (Python keeps no such string at run time, so it is read from
    the source)."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # no source (a class built at run time)
            continue
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and \
                    isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def help_text(doc: str, cfg, defaults: str, fixed: dict | None = None) -> str:
    """A script's --help: the first two paragraphs of its docstring (what it is, its commands), then every key of
    its config `cfg` that can be set (not the `fixed` ones); `defaults` says where the defaults come from."""
    keys = "\n".join(usage(cfg, hidden=fixed or {}))
    return "\n\n".join(doc.split("\n\n")[:2]) + f"\n\nEvery key, as --key value ({defaults}):\n" + keys


def usage(cfg, prefix: str = "", hidden=()) -> list[str]:
    """One entry per key of dataclass config `cfg`, nested ones dotted: `--key (default)` and its description, for
    --help; dotted keys in `hidden` are left out."""
    lines, docs = [], field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f"{prefix}{f.name}" in hidden:
            continue
        if dataclasses.is_dataclass(value):
            lines += usage(value, f"{prefix}{f.name}.", hidden)
        else:
            lines.append(f"  --{prefix}{f.name} (default {json.dumps(value, default=str)})")
            lines += textwrap.wrap(docs.get(f.name, ""), 112, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return lines


def split_names(names: str) -> list[str]:
    """"intention, telepathy" -> ["intention", "telepathy"]."""
    return [n.strip() for n in names.split(",") if n.strip()]


# ----------------------------------------------------------------------------------------------------------
# Checks before work


@dataclass
class Tasks:
    train: dict
    """{gym: [task]} of the training mixture's gyms"""
    test: list
    """(gym, task) pairs of the evaluation (empty when --eval_every is 0)"""


def check_before_work(cfg, task_pool: dict | None = None, launching: bool = False) -> Tasks:
    """Everything train.Config `cfg` needs from this machine, checked; returns the tasks, loaded once here.
    `task_pool` ({gym: [task]}) replaces the training data (tests with toy gyms). Run by the process that starts
    the run: `python train.py` (`launching` when it is about to start ranks) or each rank of an outside torchrun."""
    if "RANK" in os.environ:  # a rank of torchrun --nproc_per_node N train.py ...
        world = int(os.environ.get("WORLD_SIZE", 1))
        if cfg.nproc and cfg.nproc != world:
            raise ConfigError(f"--nproc: {cfg.nproc}, but torchrun started {world} rank(s); under torchrun its "
                              "--nproc_per_node decides (or run python train.py --nproc N, which starts them)")
        if cfg.user.serve_cmd:
            raise ConfigError("--user.serve_cmd: under torchrun every rank would start a server; run python "
                              "train.py (it starts the ranks and one server), or start the server yourself and "
                              "pass --user.base_url")
    else:
        plan_ranks(cfg)
        if cfg.fsdp and not launching:  # train.main launches FSDP runs as ranks (a group of one at least)
            raise ConfigError("--fsdp: FSDP2 shards the model over the ranks of a process group, and this process "
                              "has none; run python train.py (it starts them: one per GPU, or --nproc N) or "
                              "torchrun --nproc_per_node N train.py ...")
    check_model("model", cfg.model)  # also on resume: the model is built from it, then the checkpoint loaded in
    if cfg.user.backend == "hf":
        check_model("user.model", cfg.user.model)
    tasks = load_tasks(cfg, task_pool)
    if cfg.algo in ("sft", "recipe") and cfg.sft_steps != 0 and cfg.sft_data:
        try:  # read and laid out as turns now, so a bad file stops the run before the model loads
            for c in sft.read_sft_data(cfg.sft_data, cfg.sft_min_score):
                sft.turns_of(c["messages"], c["where"])
        except sft.SFTDataError as e:
            raise DataError(f"--sft_data: {e}") from None
    if cfg.user.backend == "http" and cfg.user.probe and not cfg.user.serve_cmd:  # a started server: probed then
        probe(users.from_config(cfg.user), "--user.base_url", "--user.probe false")
    return tasks


def probe(endpoint, flag: str, off: str):
    """Check an HTTP endpoint before any work (users.HTTPUser.probe: GET /models answers and serves its model);
    a failure is a ConfigError naming the option that chose it (`flag`) and the one that skips the check (`off`)."""
    try:
        endpoint.probe()
    except users.UserError as e:
        raise ConfigError(f"{flag}: {e.message} ({off} skips this check)") from None


def plan_ranks(cfg, visible: list[str] | None = None) -> distributed.Plan:
    """How `python train.py` uses this machine, from the GPUs it sees (`visible`: distributed.visible_gpus()).
    On GPUs (--device cuda, or auto with one visible) the user server gets the LAST --user.serve_gpus of them and
    the ranks one each of the rest (--nproc of them; 0 = all); on the CPU, --nproc gloo ranks (0 = one process).
    More than one rank, or --fsdp, means launching ranks through torch.distributed.run: FSDP2 needs a process
    group, and one rank is a group of one."""
    visible = distributed.visible_gpus() if visible is None else visible
    if cfg.device == "cuda" and not visible:
        raise ConfigError("--device: cuda, but torch sees no GPU here (torch.cuda.device_count() is 0); "
                          "use --device cpu")
    kept = cfg.user.serve_gpus
    if kept > len(visible):
        raise ConfigError(f"--user.serve_gpus: {kept} GPU(s) for the user server, but {len(visible)} visible here"
                          + ("; use 0 on a machine without GPUs" if not visible else ""))
    server, left = visible[len(visible) - kept:], visible[:len(visible) - kept]
    if cfg.device == "cpu" or not visible:
        nproc = cfg.nproc or 1
        return distributed.Plan(nproc, nproc > 1 or cfg.fsdp, None, server)
    if not left:
        raise ConfigError(f"--user.serve_gpus: all {len(visible)} visible GPU(s) go to the user server and none is "
                          "left to train on; keep fewer, or train on the CPU with --device cpu")
    nproc = cfg.nproc or len(left)
    if nproc > len(left):
        raise ConfigError(f"--nproc: {nproc} ranks need one GPU each, but {len(left)} are left for training "
                          f"({len(visible)} visible, {kept} kept for the user server)")
    return distributed.Plan(nproc, nproc > 1 or cfg.fsdp, left[:nproc], server)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_model(key: str, name: str):
    """`name` is "tiny" or "tiny-demo", a folder with a config.json, or a hub id that is cached or can be fetched
    (only its config.json is read here, never the weights)."""
    if name in ("tiny", "tiny-demo"):
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--{key}: {name} is a folder without a config.json, not a model folder")
        return
    if path.exists() or name.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(name):
        raise ConfigError(f"--{key}: {name} is neither a model folder (there is no such folder), a hub id such as "
                          "Qwen/Qwen3-4B, nor tiny / tiny-demo")
    try:
        transformers.AutoConfig.from_pretrained(name, local_files_only=True)
        return
    except OSError:
        pass  # not in the cache
    hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if not offline:
        try:  # one quick request: without internet the hub client retries for half a minute, printing each try
            requests.head(hub, timeout=5)
        except requests.RequestException:
            offline = True
    if offline:
        raise ConfigError(f"--{key}: {name} is not in the Hugging Face cache and {hub} cannot be reached from here; "
                          f"download it where there is internet (huggingface-cli download {name}) or pass a local "
                          "folder")
    try:
        transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--{key}: {name}: {one_line(e)}") from None


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def load_tasks(cfg, task_pool: dict | None) -> Tasks:
    """Every training gym's train split and, when evaluations are on, every eval gym's test split: read now, so
    that a bad file stops the run before any work."""
    def load(gym, split):
        try:
            return envs.load_tasks(gym, split, cfg.data_dir or None)
        except (ValueError, OSError, KeyError) as e:  # envs.TaskDataError is a ValueError naming file/line/field
            where = f"--data_dir {cfg.data_dir}" if cfg.data_dir else "data/"
            raise DataError(f"{gym} {split} tasks ({where}): {one_line(e)}") from None

    weights = cfg.gyms or {g: 1.0 for g in (task_pool or envs.GYMS)}
    train = task_pool or {g: load(g, "train") for g, w in weights.items() if w > 0}
    for gym, tasks in train.items():
        if not tasks:
            raise DataError(f"{gym}: no training tasks")
    test = []
    if cfg.eval_every or cfg.algo == "recipe":
        test = [(g, task) for g in split_names(cfg.eval_gyms) for task in load(g, "test")[: cfg.eval_tasks or None]]
    return Tasks(train, test)
