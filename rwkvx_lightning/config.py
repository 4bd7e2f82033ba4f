"""Structured configuration: one dataclass per component, a recipe YAML on top, `key=value` overrides last.

Every mistake is caught before any work starts: an unknown key (with the closest valid key as a
hint), a value of the wrong type, or an impossible combination (a layout that does not fit, a
context that does not split into attention chunks). Errors are `ConfigError` and name the key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rwkvx_lightning.data import DataConfig
from rwkvx_lightning.model import ModelConfig

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
FREEZE = ("none", "rwkv")
STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3")


class ConfigError(ValueError):
    """A bad recipe or override; the message names the key."""


@dataclass
class RunConfig:
    dir: str = "runs/demo"  # everything of one run: resolved config, checkpoints, TensorBoard events


@dataclass
class InitConfig:
    rwkv7_checkpoint: Optional[str] = None  # BlinkDL-format RWKV-7 .pth to start from (stage 1 / stage 2)


@dataclass
class OptimConfig:
    lr: float = 6e-4  # peak learning rate
    lr_final: float = 6e-5  # end of the cosine decay
    schedule: str = "cosine"  # cosine | constant (after warmup)
    warmup_tokens: int = 0
    decay_tokens: Optional[int] = None  # cosine length in tokens; default: trainer.max_steps worth of tokens
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-18
    weight_decay: float = 0.1  # matrices only (BlinkDL groups); vectors never decay, att.w0 gets 2x lr
    grad_clip: float = 1.0  # 0 disables
    l2wrap: bool = True
    freeze: str = "none"  # none | rwkv: train only the attention blocks (stage 1 alignment)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | deepspeed_stage_1 | deepspeed_stage_2 | ...
    precision: str = "auto"  # auto (bf16-mixed on GPU, 32-true on CPU) | 32-true | bf16-mixed | bf16-true
    max_steps: int = 1000  # optimizer steps
    accumulate_grad_batches: int = 1
    val_check_interval: int = 100  # steps between validations
    log_every_n_steps: int = 10


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100  # periodic checkpoint (also refreshes last.ckpt)
    keep: int = 3  # periodic checkpoints kept; last.ckpt is always kept


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class Config:
    seed: int = 42
    run: RunConfig = field(default_factory=RunConfig)
    init: InitConfig = field(default_factory=InitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Keys that may differ when a run directory is resumed; everything else must match its saved config.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.val_check_interval", "trainer.log_every_n_steps",
                     "checkpoint.", "logging.", "data.path", "data.urls", "data.val_batches", "run.dir",
                     "model.wkv_kernel.", "model.attn_kernel.")  # kernel options: speed, memory, rounding


def _valid_keys(cls, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema, mapped to its field type."""
    out = {}
    for f in fields(cls):
        key = prefix + f.name
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            out[key] = "section"
            out.update(_valid_keys(type(default), key + "."))
        elif isinstance(default, dict):
            out[key] = "mapping"  # free-form keys below it (kernel options), checked by their owner
        else:
            out[key] = f.type
    return out


VALID_KEYS = _valid_keys(Config)


def _check_keys(keys: list[str], source: str) -> None:
    for key in keys:
        if key in VALID_KEYS:
            continue
        parts = key.split(".")
        if any(VALID_KEYS.get(".".join(parts[:i])) == "mapping" for i in range(1, len(parts))):
            continue
        hint = difflib.get_close_matches(key, list(VALID_KEYS), n=1, cutoff=0.6)
        if not hint:  # a typo in the leaf name: compare with the keys of the same section
            section, _, leaf = key.rpartition(".")
            siblings = [k for k in VALID_KEYS if k.rpartition(".")[0] == section]
            close = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in siblings], n=1, cutoff=0.5)
            hint = [f"{section}.{close[0]}" if section else close[0]] if close else []
        msg = f"unknown config key {key!r} in {source}"
        raise ConfigError(msg + (f"; did you mean {hint[0]!r}?" if hint else ""))


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves (and sections holding unknown names) of a parsed YAML/dotlist."""
    if not isinstance(node, (dict, DictConfig)):
        return [prefix[:-1]]
    keys = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        if VALID_KEYS.get(key) == "section" and isinstance(v, (dict, DictConfig)):
            keys.extend(_leaf_keys(v, key + "."))
        else:
            keys.append(key)
    return keys


def find_recipe(name_or_path: str) -> Path:
    """A recipe file path, or the name of a bundled recipe (`demo` -> recipes/demo.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = resources.files("rwkvx_recipes")
    for candidate in (name_or_path, f"{name_or_path}.yaml"):
        p = bundled / candidate
        if p.is_file():
            return Path(str(p))
    names = sorted(p.name.removesuffix(".yaml") for p in bundled.iterdir() if p.name.endswith(".yaml"))
    raise ConfigError(f"recipe {name_or_path!r} not found: not a file, and not one of the bundled recipes {names}")


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Schema defaults <- recipe YAML <- `key=value` overrides, type-checked and validated."""
    layers = []
    if recipe is not None:
        path = find_recipe(recipe)
        try:
            data = OmegaConf.load(path)
        except Exception as e:  # yaml syntax errors
            raise ConfigError(f"cannot parse recipe {str(path)!r}: {e}") from e
        _check_keys(_leaf_keys(data), f"recipe {path.name}")
        layers.append(data)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        _check_keys([o.split("=", 1)[0].strip() for o in overrides], "command-line overrides")
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot parse overrides {overrides}: {e}") from e
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), *layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"bad value for config key {key!r}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from e
    validate(cfg)
    return cfg


def _require(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


def validate(cfg: Config) -> None:
    """Cross-field checks that a type system cannot express."""
    try:
        layout = cfg.model.layout()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    d, o, t = cfg.data, cfg.optim, cfg.trainer
    _require(d.ctx_len >= 1, "data.ctx_len", d.ctx_len, "must be >= 1")
    _require(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    if "attn" in layout and d.ctx_len > cfg.model.chunk_size:
        _require(d.ctx_len % cfg.model.chunk_size == 0, "data.ctx_len", d.ctx_len,
                 f"must be a multiple of model.chunk_size={cfg.model.chunk_size} so each window splits into whole attention chunks")
    _require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _require(0 <= o.lr_final <= o.lr, "optim.lr_final", o.lr_final, f"must be in [0, optim.lr={o.lr}]")
    _require(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"must be one of {SCHEDULES}")
    _require(o.warmup_tokens >= 0, "optim.warmup_tokens", o.warmup_tokens, "must be >= 0")
    _require(o.decay_tokens is None or o.decay_tokens > o.warmup_tokens, "optim.decay_tokens", o.decay_tokens,
             "must exceed optim.warmup_tokens")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas, "must be two numbers in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    _require(o.freeze in FREEZE, "optim.freeze", o.freeze, f"must be one of {FREEZE}")
    _require(o.freeze == "none" or "attn" in layout, "optim.freeze", o.freeze, "freezing RWKV leaves nothing to train without attention blocks")
    _require(t.accelerator in ACCELERATORS, "trainer.accelerator", t.accelerator, f"must be one of {ACCELERATORS}")
    _require(t.precision in PRECISIONS, "trainer.precision", t.precision, f"must be one of {PRECISIONS}")
    _require(t.strategy in STRATEGIES, "trainer.strategy", t.strategy, f"must be one of {STRATEGIES}")
    for key in ("devices", "num_nodes", "max_steps", "accumulate_grad_batches", "val_check_interval", "log_every_n_steps"):
        _require(getattr(t, key) >= 1, f"trainer.{key}", getattr(t, key), "must be >= 1")
    _require(cfg.checkpoint.every_n_steps >= 1, "checkpoint.every_n_steps", cfg.checkpoint.every_n_steps, "must be >= 1")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep, "must be >= 1")
    _require(bool(cfg.run.dir), "run.dir", cfg.run.dir, "must be a directory path")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Config) -> dict[str, Any]:
    def walk(node, prefix=""):
        out = {}
        for k, v in node.items():
            if isinstance(v, dict):
                out.update(walk(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    return walk(OmegaConf.to_container(OmegaConf.structured(cfg)))


def check_resumable(saved_yaml: str, cfg: Config, where: str) -> None:
    """Refuse to continue a run directory whose saved config differs in anything that shapes the run."""
    try:
        saved_cfg = load_config_from_yaml(saved_yaml)
    except ConfigError as e:
        raise ConfigError(f"run directory {where} holds a config this version cannot read: {e}") from e
    old, new = flatten(saved_cfg), flatten(cfg)
    diffs = [k for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k) and not any(k == m or (m.endswith(".") and k.startswith(m)) for m in RESUMABLE_CHANGES)]
    if diffs:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diffs[:6])
        raise ConfigError(f"run directory {where} holds another run's incompatible config ({detail}); "
                          "use a new run.dir or the saved config")


def load_config_from_yaml(text: str) -> Config:
    data = OmegaConf.create(text)
    _check_keys(_leaf_keys(data), "saved config")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))
    except OmegaConfBaseException as e:
        raise ConfigError(str(e)) from e
    return cfg  # type: ignore[return-value]
