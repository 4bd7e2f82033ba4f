"""RWKV-X: RWKV-7 (x070) blocks with top-k chunk sparse-attention blocks interleaved (SPEC.md).

The one model implementation: training, checkpoint import, evaluation and inference all use it.
RWKV-7 blocks keep BlinkDL's state-dict names (`emb`, `blocks.{i}.att.*`, `blocks.{i}.ffn.*`,
`ln_out`, `head`) so published RWKV-7 checkpoints load as they are; the attention blocks live in
`attn_blocks.{j}` and the order of the two kinds of block comes from `ModelConfig`.
"""

from __future__ import annotations

import importlib
import math
from functools import partial
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkvx_kernels.sparse_attention import sparse_attention_naive
from rwkvx_kernels.wkv7.naive import wkv7_naive
from rwkvx_kernels.wkv7.torch_chunked import wkv7_torch_chunked

EOD_TOKEN = 0
DECAY_SCALE = math.exp(-0.5)  # per-step decay d = exp(-exp(-0.5) * sigmoid(w_raw)) lies in (0.545, 1)
BACKENDS = ("auto", "triton", "torch", "naive")  # auto: triton on CUDA, torch (chunked PyTorch) elsewhere
ATTN_INITS = ("zero", "copy")


@dataclass
class ModelConfig:
    """Shape and behaviour of an RWKV-X model; `layout()` checks that the block order is possible."""

    vocab_size: int = 65536
    n_embd: int = 768
    n_layer: int = 12  # RWKV-7 blocks
    n_attn: int = 0  # attention blocks: [RWKV x (n_layer // n_attn), Attn] x n_attn
    attn_positions: Optional[list[int]] = None  # or explicit indices of the attention blocks in the full stack
    head_size: int = 64
    chunk_size: int = 2048  # sparse attention key chunk (RWKV-X: 2048)
    topk: int = 3  # chunks attended per query, the own chunk included (RWKV-X: 3)
    attn_init: str = "zero"  # zero: new blocks start as identity (paper); copy: from the preceding RWKV block (upstream)
    wkv_backend: str = "auto"  # auto: Triton on CUDA, chunked PyTorch elsewhere | triton | torch | naive (token loop)
    attn_backend: str = "auto"  # auto: Triton on CUDA, PyTorch reference elsewhere | triton | torch
    # Options of the Triton kernels: speed and memory, and the rounding of a few (dot_precision,
    # exact_precision, state_dtype, sel_prec); unknown keys or bad values stop the run at start-up. wkv_kernel: keys of rwkvx_kernels.wkv7.chunk.CONFIG, e.g.
    # {checkpoint_chunks: 1} keeps every chunk state for backward (four bf16 inputs' worth of memory per
    # block, 12-21% less recurrence time on an H200; default 0 keeps only the inputs, as fla). attn_kernel: keys of
    # rwkvx_kernels.sparse_attention.triton_topk.CONFIG_GPU (launch parameters).
    wkv_kernel: Dict[str, Any] = field(default_factory=dict)
    attn_kernel: Dict[str, Any] = field(default_factory=dict)
    grad_checkpoint: bool = False  # recompute each block in backward (activation checkpointing)

    def layout(self) -> list[str]:
        """The block order, e.g. ['rwkv', 'rwkv', 'attn', ...]; raises ValueError naming the bad key."""
        if self.n_layer < 1:
            raise ValueError(f"model.n_layer must be >= 1, got {self.n_layer}")
        if self.n_embd < self.head_size or self.n_embd % self.head_size:
            raise ValueError(f"model.n_embd={self.n_embd} must be a positive multiple of model.head_size={self.head_size}")
        if self.vocab_size < 1:
            raise ValueError(f"model.vocab_size must be >= 1, got {self.vocab_size}")
        if self.topk < 1:
            raise ValueError(f"model.topk must be >= 1, got {self.topk}")
        if self.chunk_size < 1 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"model.chunk_size must be a power of two, got {self.chunk_size}")
        for key in ("wkv_backend", "attn_backend"):
            if getattr(self, key) not in BACKENDS:
                raise ValueError(f"model.{key} must be one of {BACKENDS}, got {getattr(self, key)!r}")
        self.check_kernel_options()
        if self.attn_init not in ATTN_INITS:
            raise ValueError(f"model.attn_init must be one of {ATTN_INITS}, got {self.attn_init!r}")
        if self.attn_init == "copy" and self.attn_positions is not None and 0 in self.attn_positions:
            raise ValueError("model.attn_init='copy' copies from the preceding RWKV block, but model.attn_positions puts attention first")
        if self.attn_positions is not None:
            positions = list(self.attn_positions)
            total = self.n_layer + len(positions)
            if self.n_attn not in (0, len(positions)):
                raise ValueError(f"model.n_attn={self.n_attn} disagrees with model.attn_positions {positions} ({len(positions)} blocks)")
            if len(set(positions)) != len(positions) or any(p < 0 or p >= total for p in positions):
                raise ValueError(f"model.attn_positions {positions} must be distinct indices in [0, {total}) (n_layer + number of attention blocks)")
            return ["attn" if i in positions else "rwkv" for i in range(total)]
        if self.n_attn < 0:
            raise ValueError(f"model.n_attn must be >= 0, got {self.n_attn}")
        if self.n_attn == 0:
            return ["rwkv"] * self.n_layer
        if self.n_layer % self.n_attn:
            raise ValueError(
                f"model.n_layer={self.n_layer} is not a multiple of model.n_attn={self.n_attn}: "
                "the interval layout would drop RWKV blocks; set model.attn_positions explicitly"
            )
        interval = self.n_layer // self.n_attn
        return (["rwkv"] * interval + ["attn"]) * self.n_attn

    def check_kernel_options(self) -> None:
        """ValueError naming the bad key or value of `wkv_kernel` / `attn_kernel` (checked by the kernels' own
        resolvers, so the model accepts exactly what they do)."""
        for key, module in (("wkv_kernel", "rwkvx_kernels.wkv7.chunk"),
                            ("attn_kernel", "rwkvx_kernels.sparse_attention.triton_topk")):
            options = getattr(self, key)
            if not isinstance(options, dict):
                raise ValueError(f"model.{key} must be a mapping of kernel options, got {options!r}")
            if not options:
                continue
            try:
                resolve = importlib.import_module(module).resolve_config
            except ImportError:  # no Triton here: the kernels (and so their options) cannot run
                continue
            try:
                resolve(dict(options))
            except ValueError as e:
                raise ValueError(f"model.{key}: {e}") from e

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


def lora_dim(n_embd: int, factor: float) -> int:
    """BlinkDL's LoRA width rule: max(32, round(factor * sqrt(C) / 32) * 32)."""
    return max(32, int(round(factor * math.sqrt(n_embd) / 32) * 32))


def token_shift(x: torch.Tensor, prev: Optional[torch.Tensor]) -> torch.Tensor:
    """The previous token's features (zero at sequence start, or `prev` [B, C] when continuing)."""
    shifted = F.pad(x, (0, 0, 1, -1))
    if prev is not None:
        shifted[:, 0] = prev
    return shifted


def _ortho(shape, scale: float) -> torch.Tensor:
    x = torch.empty(shape)
    gain = math.sqrt(shape[0] / shape[1]) if shape[0] > shape[1] else 1.0
    nn.init.orthogonal_(x, gain=gain * scale)
    return x


def _triton_op(backend: str, x: torch.Tensor, module: str, name: str):
    """The Triton op `module.name` if the backend asks for it (`auto`: on CUDA, when it exists), else None."""
    if backend not in ("triton", "auto") or (backend == "auto" and not x.is_cuda):
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        if backend == "triton":
            raise
        return None  # auto: this op has no Triton kernel here; the PyTorch path is used


class TimeMix(nn.Module):
    """RWKV-7 time mixing (`att.*`): token shift, LoRA decay/iclr/gate/value-residual, the WKV state."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        self.wkv_backend = cfg.wkv_backend
        self.wkv_kernel = dict(cfg.wkv_kernel) or None
        ratio_0_to_1 = layer_id / max(cfg.n_layer - 1, 1)
        ratio_1_to_almost0 = 1.0 - layer_id / cfg.n_layer
        ddd = (torch.arange(C) / C).view(1, 1, C)
        n = torch.arange(C, dtype=torch.float32)
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1**0.3)

        self.x_r = nn.Parameter(1.0 - ddd ** (0.2 * ratio_1_to_almost0))
        self.x_w = nn.Parameter(1.0 - ddd ** (0.9 * ratio_1_to_almost0))
        self.x_k = nn.Parameter(1.0 - ddd ** (0.7 * ratio_1_to_almost0))
        self.x_v = nn.Parameter(1.0 - ddd ** (0.7 * ratio_1_to_almost0))
        self.x_a = nn.Parameter(1.0 - ddd ** (0.9 * ratio_1_to_almost0))
        self.x_g = nn.Parameter(1.0 - ddd ** (0.2 * ratio_1_to_almost0))

        d_w, d_a, d_v, d_g = lora_dim(C, 2.5), lora_dim(C, 2.5), lora_dim(C, 1.7), lora_dim(C, 5)
        self.w0 = nn.Parameter((www + 0.5 + zigzag * 2.5).view(1, 1, C))
        self.w1 = nn.Parameter(torch.zeros(C, d_w))
        self.w2 = nn.Parameter(_ortho((d_w, C), 0.1))
        self.a0 = nn.Parameter((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        self.a1 = nn.Parameter(torch.zeros(C, d_a))
        self.a2 = nn.Parameter(_ortho((d_a, C), 0.1))
        if layer_id > 0:  # layer 0 defines v_first and has no value residual
            self.v0 = nn.Parameter((0.73 - linear * 0.4).view(1, 1, C))
            self.v1 = nn.Parameter(torch.zeros(C, d_v))
            self.v2 = nn.Parameter(_ortho((d_v, C), 0.1))
        self.g1 = nn.Parameter(torch.zeros(C, d_g))
        self.g2 = nn.Parameter(_ortho((d_g, C), 0.1))
        self.k_k = nn.Parameter((0.71 - linear * 0.1).view(1, 1, C))
        self.k_a = nn.Parameter(torch.full((1, 1, C), 1.02))
        self.r_k = nn.Parameter(torch.full((H, N), -0.04))

        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)
        with torch.no_grad():
            self.receptance.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
            self.key.weight.uniform_(-0.05 / C**0.5, 0.05 / C**0.5)
            self.value.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
            self.output.weight.zero_()
            self.ln_x.weight.fill_(((1 + layer_id) / cfg.n_layer) ** 0.7)

    def forward(self, x, v_first, shift_state=None, wkv_state=None):
        """x [B, T, C] -> (out, v_first, last token of x, final WKV state or None)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, shift_state) - x
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        log_decay = -DECAY_SCALE * torch.sigmoid((self.w0 + torch.tanh(xw @ self.w1) @ self.w2).float())
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        iclr = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (iclr - 1) * self.k_a)

        # one dtype for all recurrence inputs: under autocast the fp32 parameters promote k, v, a, b
        heads = lambda t: t.to(r.dtype).view(B, T, H, N)  # noqa: E731
        y, final_state = self._wkv(heads(r), heads(log_decay), heads(k), heads(v), heads(-kk), heads(kk * iclr), wkv_state)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        y = y + ((heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)).view(B, T, C)
        return self.output(y * g), v_first, x[:, -1], final_state

    def _wkv(self, r, w, k, v, a, b, state):
        want_state = state is not None
        wkv7 = _triton_op(self.wkv_backend, r, "rwkvx_kernels.wkv7", "wkv7")
        if wkv7 is not None:
            return wkv7(r, w, k, v, a, b, initial_state=state, output_final_state=want_state, config=self.wkv_kernel)
        if self.wkv_backend == "naive":
            return wkv7_naive(r, w, k, v, a, b, initial_state=state, output_final_state=want_state)
        return wkv7_torch_chunked(r, w, k, v, a, b, initial_state=state, output_final_state=want_state)


class ChannelMix(nn.Module):
    """RWKV-7 channel mixing (`ffn.*`): token shift then relu(k W_key)^2 W_value, hidden 4C."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        ratio_1_to_almost0 = 1.0 - layer_id / cfg.n_layer
        self.x_k = nn.Parameter(1.0 - (torch.arange(C) / C).view(1, 1, C) ** (ratio_1_to_almost0**4))
        self.key = nn.Linear(C, 4 * C, bias=False)
        self.value = nn.Linear(4 * C, C, bias=False)
        with torch.no_grad():
            self.key.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
            self.value.weight.zero_()

    def forward(self, x, shift_state=None):
        k = x + (token_shift(x, shift_state) - x) * self.x_k
        return self.value(torch.relu(self.key(k)) ** 2), x[:, -1]


class RWKV7Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)  # normalises the embedding (BlinkDL keeps it in block 0)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, v_first, state=None):
        """state: None, or (att shift [B, C], wkv [B, H, N, N], ffn shift [B, C]) to continue a sequence."""
        att_shift, wkv, ffn_shift = state if state is not None else (None, None, None)
        h, v_first, att_last, wkv = self.att(self.ln1(x), v_first, att_shift, wkv)
        x = x + h
        h, ffn_last = self.ffn(self.ln2(x), ffn_shift)
        return x + h, v_first, (att_last, wkv, ffn_last)


class SparseAttention(nn.Module):
    """Multi-head top-k chunk attention (MoBA rule, SPEC section 3), no positional encoding, no bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.n_embd
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        self.chunk_size, self.topk, self.backend = cfg.chunk_size, cfg.topk, cfg.attn_backend
        self.kernel_options = dict(cfg.attn_kernel) or None
        self.receptance = nn.Linear(C, C, bias=False)  # q
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        with torch.no_grad():
            self.receptance.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
            self.key.weight.uniform_(-0.05 / C**0.5, 0.05 / C**0.5)
            self.value.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
            self.output.weight.zero_()  # zero-init: the inserted block starts as the identity

    def forward(self, x, cu_seqlens):
        """x [B, T, C]; cu_seqlens: document offsets in the flattened [1, B*T] sequence."""
        B, T, C = x.shape
        q, k, v = (proj(x).view(1, B * T, self.n_head, self.head_size) for proj in (self.receptance, self.key, self.value))
        sparse_attention = _triton_op(self.backend, x, "rwkvx_kernels.sparse_attention", "sparse_attention")
        if sparse_attention is not None:
            y = sparse_attention(q, k, v, self.chunk_size, self.topk, cu_seqlens=cu_seqlens, config=self.kernel_options)
        else:
            y = sparse_attention_naive(q, k, v, self.chunk_size, self.topk, cu_seqlens=cu_seqlens)
        return self.output(y.reshape(B, T, C))


class AttentionBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn_layer_id: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = SparseAttention(cfg)
        self.ffn = ChannelMix(cfg, ffn_layer_id)

    def forward(self, x, cu_seqlens):
        x = x + self.att(self.ln1(x), cu_seqlens)
        h, _ = self.ffn(self.ln2(x))
        return x + h

    @torch.no_grad()
    def copy_from(self, block: RWKV7Block) -> None:
        """Upstream RWKV-X's init: start from the preceding RWKV block's norms, projections and FFN."""
        self.ln1.load_state_dict(block.ln1.state_dict())
        self.ln2.load_state_dict(block.ln2.state_dict())
        self.ffn.load_state_dict(block.ffn.state_dict())
        for name in ("receptance", "key", "value", "output"):
            getattr(self.att, name).weight.copy_(getattr(block.att, name).weight)


def document_offsets(idx: torch.Tensor) -> torch.Tensor:
    """Offsets of the documents in idx [B, T] flattened to one sequence: rows and token 0 (which ends a document) split it."""
    B, T = idx.shape
    ends = idx.reshape(-1) == EOD_TOKEN
    ends = ends.view(B, T).clone()
    ends[:, -1] = True  # each row ends a document
    stops = torch.nonzero(ends.reshape(-1)).flatten() + 1
    return torch.cat([stops.new_zeros(1), stops]).to(torch.int32)


class RWKVX(nn.Module):
    """The hybrid language model: `model(idx)` returns logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.block_kinds = cfg.layout()
        C = cfg.n_embd
        self.emb = nn.Embedding(cfg.vocab_size, C)
        self.blocks = nn.ModuleList(RWKV7Block(cfg, i) for i in range(cfg.n_layer))
        preceding = self._preceding_rwkv_layers()
        self.attn_blocks = nn.ModuleList(AttentionBlock(cfg, max(p, 0)) for p in preceding)
        self.ln_out = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.vocab_size, bias=False)
        with torch.no_grad():
            nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
            gain = 0.5 * math.sqrt(cfg.vocab_size / C) if cfg.vocab_size > C else 0.5
            nn.init.orthogonal_(self.head.weight, gain=gain)
        if cfg.attn_init == "copy":
            self.copy_init_attention()

    def _preceding_rwkv_layers(self) -> list[int]:
        """For each attention block, the index of the RWKV block just before it (-1 if none)."""
        out, last = [], -1
        for kind in self.block_kinds:
            if kind == "rwkv":
                last += 1
            else:
                out.append(last)
        return out

    def copy_init_attention(self) -> None:
        for block, p in zip(self.attn_blocks, self._preceding_rwkv_layers()):
            block.copy_from(self.blocks[p])

    def forward(self, idx: torch.Tensor, state: Optional[list] = None, return_state: bool = False):
        """idx [B, T] token ids -> logits [B, T, vocab] (and the recurrent state if `return_state`).

        `state` (from a previous call with `return_state=True`) continues the sequence; it is
        supported for pure RWKV-7 models (attention KV caches belong to the inference path).
        """
        if (state is not None or return_state) and self.attn_blocks:
            raise NotImplementedError("recurrent state is only kept for pure RWKV-7 models; attention blocks need the inference KV cache")
        if return_state and state is None:
            state = self.zero_state(idx.shape[0], idx.device)
        x = self.blocks[0].ln0(self.emb(idx))
        cu_seqlens = document_offsets(idx) if len(self.attn_blocks) else None
        recompute = self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled()
        run = partial(checkpoint, use_reentrant=False) if recompute else (lambda block, *args: block(*args))
        v_first = None
        new_state = []
        rwkv_blocks, attn_blocks = iter(self.blocks), iter(self.attn_blocks)
        for kind in self.block_kinds:
            if kind == "rwkv":
                layer_state = state[len(new_state)] if state is not None else None
                x, v_first, layer_state = run(next(rwkv_blocks), x, v_first, layer_state)
                new_state.append(layer_state)
            else:
                x = run(next(attn_blocks), x, cu_seqlens)
        logits = self.head(self.ln_out(x))
        return (logits, new_state) if return_state else logits

    def zero_state(self, batch_size: int, device=None) -> list:
        C, H, N = self.cfg.n_embd, self.cfg.n_head, self.cfg.head_size
        z = lambda *s: torch.zeros(*s, device=device)  # noqa: E731
        return [(z(batch_size, C), z(batch_size, H, N, N), z(batch_size, C)) for _ in self.blocks]

    @classmethod
    def from_rwkv7(cls, path, cfg: Optional[ModelConfig] = None, **overrides) -> "RWKVX":
        """Load a BlinkDL-format RWKV-7 `.pth`; with `n_attn`/`attn_positions` in `cfg` or `overrides`,
        new attention blocks are inserted (zero- or copy-initialised per `attn_init`).

        Shapes (vocab, width, depth, head size) come from the checkpoint; a `cfg` that disagrees is an error.
        """
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return cls.from_rwkv7_state_dict(sd, cfg, **overrides)

    @classmethod
    def from_rwkv7_state_dict(cls, sd: dict, cfg: Optional[ModelConfig] = None, **overrides) -> "RWKVX":
        if "emb.weight" not in sd or "blocks.0.att.r_k" not in sd:
            raise ValueError("not an RWKV-7 (x070) checkpoint: missing emb.weight or blocks.0.att.r_k")
        vocab_size, n_embd = sd["emb.weight"].shape
        n_head, head_size = sd["blocks.0.att.r_k"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        found = dict(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, head_size=head_size)
        if cfg is None:
            cfg = ModelConfig(**{**found, **overrides})
        else:
            cfg = replace(cfg, **overrides)
            bad = {k: (getattr(cfg, k), v) for k, v in found.items() if getattr(cfg, k) != v}
            if bad:
                raise ValueError("model config disagrees with the checkpoint: " + ", ".join(f"model.{k}={a} but checkpoint has {b}" for k, (a, b) in bad.items()))
        model = cls(cfg)
        # Layer 0 has no value residual; BlinkDL's trainer still stores its unused v0/v1/v2.
        sd = {k: v for k, v in sd.items() if not k.startswith(("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"))}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("attn_blocks.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match RWKV-7 x070: missing {missing[:8]}, unexpected {unexpected[:8]}")
        if cfg.attn_init == "copy":
            model.copy_init_attention()
        return model

    def rwkv7_state_dict(self) -> dict:
        """The RWKV-7 part in BlinkDL's format (what `from_rwkv7` reads)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("attn_blocks.")}
