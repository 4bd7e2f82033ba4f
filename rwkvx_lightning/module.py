"""The LightningModule: loss (cross entropy + L2Wrap), BlinkDL's optimiser groups, token-based LR schedule."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from rwkvx_lightning.config import Config
from rwkvx_lightning.model import RWKVX


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward adds `1e-4 * max_logit / (B*T)` at each position's arg-max logit.

    It keeps logits from drifting upwards (RWKV-LM). The extra gradient is scaled by the incoming
    gradient so that loss scaling and gradient accumulation stay correct.
    """

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        maxx, ids = torch.max(logits, -1, keepdim=True)
        gy = torch.zeros_like(logits).scatter_(-1, ids, maxx * factor)
        return grad_output, grad_output * gy


def lr_factor(tokens: float, cfg: Config, tokens_per_step: int) -> float:
    """LR multiplier after `tokens` training tokens: linear warmup from 1%, then cosine to lr_final or constant."""
    o = cfg.optim
    if o.warmup_tokens and tokens < o.warmup_tokens:
        return 0.01 + 0.99 * tokens / o.warmup_tokens
    if o.schedule == "constant":
        return 1.0
    decay_tokens = o.decay_tokens or cfg.trainer.max_steps * tokens_per_step
    progress = min(max((tokens - o.warmup_tokens) / max(decay_tokens - o.warmup_tokens, 1), 0.0), 1.0)
    final = o.lr_final / o.lr
    return final + 0.5 * (1 - final) * (1 + math.cos(math.pi * progress))


def optimizer_groups(model: RWKVX, cfg: Config) -> list[dict]:
    """BlinkDL's x070 groups: 2x lr for att.w0, weight decay only on matrices named *.weight."""
    decay, one_x, two_x = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("att.w0"):
            two_x.append(p)
        elif cfg.optim.weight_decay > 0 and p.squeeze().dim() >= 2 and name.endswith(".weight"):
            decay.append(p)
        else:
            one_x.append(p)
    groups = [
        {"params": one_x, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": two_x, "weight_decay": 0.0, "lr_scale": 2.0},
        {"params": decay, "weight_decay": cfg.optim.weight_decay, "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]


class RWKVXModule(L.LightningModule):
    def __init__(self, cfg: Config, model: RWKVX, tokens_per_step: int):
        super().__init__()
        self.cfg, self.model = cfg, model
        self.tokens_per_step = tokens_per_step  # global: batch x ctx x accumulation x ranks
        if cfg.optim.freeze == "rwkv":
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("attn_blocks."))

    def forward(self, idx):
        return self.model(idx)

    def _loss(self, batch):
        idx, targets = batch[:, :-1], batch[:, 1:]
        logits = self.model(idx)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return loss, logits

    def training_step(self, batch, batch_idx):
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "on_batch_consumed"):
            datamodule.on_batch_consumed()  # the data position that a checkpoint stores
        loss, logits = self._loss(batch)
        if self.cfg.optim.l2wrap:
            loss = L2Wrap.apply(loss, logits)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=False)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def configure_optimizers(self):
        o = self.cfg.optim
        groups = optimizer_groups(self.model, self.cfg)
        for g in groups:
            g["lr"] = o.lr * g["lr_scale"]
        # foreach, not fused: Lightning's mixed-precision gradient clipping refuses fused optimizers
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step * self.tokens_per_step, self.cfg, self.tokens_per_step)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
