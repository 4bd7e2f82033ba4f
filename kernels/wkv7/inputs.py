"""Argument checks and layout shared by the Triton wkv7 entry points."""

import torch


def prepare_inputs(r, w, k, v, a, b, initial_state, cu_seqlens):
    """Contiguous tensors, int32 `cu_seqlens` on r's device; ValueError for what the kernels cannot run."""
    B, T, H, N = r.shape
    if N != 64:
        raise ValueError(f"wkv7 Triton kernel supports head size 64 only, got {N}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B == 1 (packed documents), got B={B}")
        cu_seqlens = cu_seqlens.to(device=r.device, dtype=torch.int32).contiguous()
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    return r, w, k, v, a, b, initial_state, cu_seqlens
