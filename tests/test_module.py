"""Training-method pieces against their definitions: LR schedule in tokens, BlinkDL's optimiser groups, L2Wrap, freezing."""

import math

import pytest
import torch

from rwkvx_lightning import RWKVX, ModelConfig
from rwkvx_lightning.config import load_config
from rwkvx_lightning.module import L2Wrap, RWKVXModule, lr_factor, optimizer_groups


def test_lr_factor_warmup_then_cosine_in_tokens():
    cfg = load_config("demo", ["optim.lr=1.0", "optim.lr_final=0.1", "optim.warmup_tokens=100", "optim.decay_tokens=1100"])
    assert lr_factor(0, cfg, 10) == pytest.approx(0.01)
    assert lr_factor(50, cfg, 10) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(100, cfg, 10) == pytest.approx(1.0)
    assert lr_factor(600, cfg, 10) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(1100, cfg, 10) == pytest.approx(0.1)
    assert lr_factor(5000, cfg, 10) == pytest.approx(0.1)
    constant = load_config("demo", ["optim.schedule=constant", "optim.warmup_tokens=0"])
    assert lr_factor(10**9, constant, 10) == 1.0


def test_optimizer_groups_follow_blinkdl():
    model = RWKVX(ModelConfig(vocab_size=64, n_embd=64, n_layer=2, n_attn=1, chunk_size=8, topk=2))
    groups = optimizer_groups(model, load_config("demo", ["optim.weight_decay=0.1"]))
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = [(g["lr_scale"], g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in groups]
    one_x, two_x, decay = by_group
    assert two_x[:2] == (2.0, 0.0) and two_x[2] == {"blocks.0.att.w0", "blocks.1.att.w0"}
    assert decay[:2] == (1.0, 0.1) and "blocks.1.att.key.weight" in decay[2] and "emb.weight" in decay[2]
    assert all(n.endswith(".weight") for n in decay[2])
    assert {"blocks.0.att.w1", "blocks.0.att.x_r", "blocks.0.ln1.weight", "attn_blocks.0.ln1.weight"} <= one_x[2]
    assert sum(len(g[2]) for g in by_group) == len(list(model.parameters()))


def test_l2wrap_adds_scaled_gradient_at_the_argmax_logit():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    loss = logits.sum() * 0  # zero loss gradient: what remains is L2Wrap's
    (2.5 * L2Wrap.apply(loss, logits)).backward()
    expected = torch.zeros(2, 3, 7)
    mx, ids = logits.detach().max(-1, keepdim=True)
    expected.scatter_(-1, ids, 2.5 * mx * 1e-4 / 6)
    torch.testing.assert_close(logits.grad, expected)


def test_freeze_rwkv_trains_only_attention_blocks():
    cfg = load_config("demo", ["optim.freeze=rwkv", "model.vocab_size=64", "model.n_embd=64"])
    module = RWKVXModule(cfg, RWKVX(cfg.model), tokens_per_step=1)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("attn_blocks.") for n in trainable)
    assert all(n.startswith("attn_blocks.") for g in optimizer_groups(module.model, cfg) for n, p in module.model.named_parameters()
               if any(p is q for q in g["params"]))
