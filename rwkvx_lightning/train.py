"""Assemble a training run from a Config: run directory, model, data, Lightning Trainer; resume if possible."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from rwkvx_lightning.callbacks import AtomicCheckpointIO, TrainingMetrics
from rwkvx_data.format import read_manifest
from rwkvx_lightning.config import Config, ConfigError, check_resumable, load_config_from_yaml, to_yaml
from rwkvx_lightning.data import ShardDataModule
from rwkvx_lightning.model import RWKVX
from rwkvx_lightning.module import RWKVXModule

log = logging.getLogger("rwkvx")
CONFIG_NAME = "config.yaml"
LAST = "last.ckpt"


def resolve_accelerator(cfg: Config) -> str:
    if cfg.trainer.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if cfg.trainer.accelerator == "cuda" else cfg.trainer.accelerator


def resolve_precision(cfg: Config, accelerator: str) -> str:
    """`auto`: bf16 mixed precision on GPU, fp32 on CPU."""
    if cfg.trainer.precision == "auto":
        return "bf16-mixed" if accelerator == "gpu" else "32-true"
    return cfg.trainer.precision


def launch_rank(cfg: Config) -> int:
    """This process's global rank before the Trainer exists (torchrun, SLURM, or Lightning's own launcher)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return int(os.environ.get("NODE_RANK", 0)) * cfg.trainer.devices + int(os.environ.get("LOCAL_RANK", 0))


def prepare_run_dir(cfg: Config, tokens_per_step: int) -> Path:
    """Create run.dir, refuse one holding another run's config, and (rank 0) write the resolved config.

    The cosine length is fixed in tokens at the first start (from trainer.max_steps unless set),
    so extending a run with a larger trainer.max_steps later does not move its schedule.
    """
    run_dir = Path(cfg.run.dir)
    path = run_dir / CONFIG_NAME
    saved = load_config_from_yaml(path.read_text()) if path.exists() else None
    if cfg.optim.schedule == "cosine" and cfg.optim.decay_tokens is None:
        cfg.optim.decay_tokens = (saved and saved.optim.decay_tokens) or cfg.trainer.max_steps * tokens_per_step
    if saved is not None:
        check_resumable(path.read_text(), cfg, str(run_dir))
    if launch_rank(cfg) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{CONFIG_NAME}.tmp-{os.getpid()}")
        tmp.write_text(to_yaml(cfg))
        tmp.replace(path)
    return run_dir


def build_model(cfg: Config) -> RWKVX:
    if cfg.init.rwkv7_checkpoint:
        return RWKVX.from_rwkv7(cfg.init.rwkv7_checkpoint, cfg.model)
    return RWKVX(cfg.model)


def last_checkpoint(run_dir: Path) -> Optional[Path]:
    path = run_dir / "checkpoints" / LAST
    return path if path.exists() else None  # a file, or a directory for DeepSpeed


def check_data(cfg: Config) -> None:
    """Fail before any work if the shard set is missing, empty, or uses ids the model cannot embed."""
    if cfg.data.urls:
        return
    manifest = read_manifest(cfg.data.path)
    if manifest.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of the shard set "
                          f"{cfg.data.path!r} ({manifest.tokenizer}, {manifest.vocab_size} ids)")


def train(cfg: Config, extra_callbacks: Optional[list] = None) -> L.Trainer:
    """Train per `cfg`; running it again with the same run.dir continues from its last checkpoint."""
    check_data(cfg)
    t, d = cfg.trainer, cfg.data
    tokens_per_step = d.batch_size * d.ctx_len * t.accumulate_grad_batches * t.devices * t.num_nodes
    run_dir = prepare_run_dir(cfg, tokens_per_step)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    accelerator = resolve_accelerator(cfg)
    if accelerator == "gpu":
        torch.set_float32_matmul_precision("high")
    else:
        torch.set_flush_denormal(True)  # subnormal floats in CPU kernels slowed steps by up to 10x

    datamodule = ShardDataModule(d, seed=cfg.seed)
    model = build_model(cfg)
    module = RWKVXModule(cfg, model, tokens_per_step)

    deepspeed = t.strategy.startswith("deepspeed")
    periodic = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="step-{step:08d}", auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_steps, save_top_k=cfg.checkpoint.keep,
        monitor="step", mode="max", save_last=True,
    )
    callbacks = [periodic, TrainingMetrics(tokens_per_step, d.ctx_len), *(extra_callbacks or [])]
    if cfg.logging.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=resolve_precision(cfg, accelerator),
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=d.val_batches,
        log_every_n_steps=t.log_every_n_steps,
        logger=TensorBoardLogger(str(run_dir), name="tensorboard", version="") if cfg.logging.tensorboard else False,
        callbacks=callbacks,
        enable_progress_bar=cfg.logging.progress_bar,
        enable_model_summary=True,
        plugins=None if deepspeed else [AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
        num_sanity_val_steps=0,
    )
    resume = last_checkpoint(run_dir)
    if resume is not None and trainer.is_global_zero:
        log.info("resuming from %s", resume)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    if trainer.global_step > 0 and not trainer.interrupted:
        trainer.save_checkpoint(run_dir / "checkpoints" / LAST)
    return trainer
