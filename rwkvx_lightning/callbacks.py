"""Callbacks: training metrics (lr, tokens, throughput, memory, MFU) and crash-safe checkpoint files."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rwkvx_lightning.flops import peak_flops, training_flops_per_token


class TrainingMetrics(L.Callback):
    """Logs train/lr, train/tokens_seen, train/tokens_per_sec and, on GPU, memory and MFU.

    Tokens are counted over all ranks (`tokens_per_step` is global); throughput is measured over
    the wall time between optimizer steps, so it includes data loading and logging.
    """

    def __init__(self, tokens_per_step: int, ctx_len: int):
        self.tokens_per_step, self.ctx_len = tokens_per_step, ctx_len
        self._last: Optional[float] = None
        self._last_step = 0
        self._flops_per_token: Optional[float] = None

    def on_train_start(self, trainer, pl_module):
        self._flops_per_token = training_flops_per_token(pl_module.model, self.ctx_len)
        self._peak = peak_flops(pl_module.device)
        self._last, self._last_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step:  # inside a gradient-accumulation window
            return
        now = time.perf_counter()
        dt, steps = now - self._last, step - self._last_step
        self._last, self._last_step = now, step
        tokens_per_sec = steps * self.tokens_per_step / max(dt, 1e-9)
        metrics = {
            "train/lr": trainer.optimizers[0].param_groups[0]["lr"],
            "train/tokens_seen": float(step * self.tokens_per_step),
            "train/tokens_per_sec": tokens_per_sec,
        }
        if pl_module.device.type == "cuda":
            metrics["train/memory_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            if self._peak:
                world = max(trainer.world_size, 1)
                metrics["train/mfu"] = tokens_per_sec / world * self._flops_per_token / self._peak
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        pl_module.log("tok/s", tokens_per_sec, prog_bar=True, on_step=True, on_epoch=False, logger=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same directory, fsyncs it, then renames.

    A kill during a save leaves the previous checkpoint of that name intact (a rename is atomic);
    the next save removes temporary files such a kill left behind.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # make the rename itself durable
            finally:
                os.close(directory)
        finally:
            tmp.unlink(missing_ok=True)
