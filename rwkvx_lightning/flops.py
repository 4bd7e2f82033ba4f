"""Model FLOPs per token (for MFU) counted from the model itself, and the peak FLOP/s of known devices."""

from __future__ import annotations

import torch

from rwkvx_lightning.model import RWKVX

# Dense (no sparsity) bf16 tensor-core peak FLOP/s by device-name fragment, first match wins.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A6000", 155e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for frag, f in PEAK_BF16_FLOPS if frag in name), None)


def training_flops_per_token(model: RWKVX, ctx_len: int) -> float:
    """Forward + backward FLOPs per trained token (3x forward).

    Forward: 2 per weight of every matrix product (embedding lookup excluded, head included), the
    WKV recurrence (about 4 N^2 per head per token: decay+rank-1 update, v k^T, S r), and for each
    attention block q.k and p.v over min(ctx, chunk_size * topk) keys per token: an upper bound,
    since causal masking makes the own chunk (and short contexts) cheaper.
    """
    cfg = model.cfg
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("emb."))
    forward = 2 * matmul_params
    forward += len(model.blocks) * cfg.n_head * 4 * cfg.head_size**2 * 2
    attended = min(ctx_len, cfg.chunk_size * cfg.topk)
    forward += len(model.attn_blocks) * 2 * 2 * cfg.n_embd * attended
    return 3.0 * forward
