"""The plain-PyTorch sparse attention against its independent oracles: the explicit-mask version,
a brute-force selection, hand-written dense causal attention and per-document runs."""

import math

import pytest
import torch

from rwkvx_kernels.sparse_attention import chunk_selection, sparse_attention_dense_mask, sparse_attention_naive
from rwkvx_kernels.sparse_attention import naive as naive_module


def random_qkv(B, T, H, D, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=gen, dtype=dtype) for _ in range(3)]


def output_and_grads(fn, q, k, v, upstream, **kwargs):
    """Output of `fn` and the gradients of q, k, v for the given upstream gradient."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(upstream)
    return out.detach(), q.grad, k.grad, v.grad


def assert_all_close(got, want, atol):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = (g.double() - w.double()).abs().max().item()
        assert err <= atol, f"{name}: max abs error {err}"


@pytest.mark.parametrize(
    "B, T, H, D, chunk_size, topk, seed",
    [
        (2, 200, 3, 16, 16, 3, 0),  # T not a multiple of the chunk size
        (2, 256, 3, 8, 32, 2, 1),  # T a multiple
        (2, 200, 3, 64, 16, 1, 2),  # own chunk only
        (2, 160, 3, 16, 8, 5, 3),
    ],
)
def test_naive_matches_dense_mask_oracle(B, T, H, D, chunk_size, topk, seed):
    q, k, v = random_qkv(B, T, H, D, seed)
    upstream = torch.randn(B, T, H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    sizes = dict(chunk_size=chunk_size, topk=topk)
    got = output_and_grads(sparse_attention_naive, q, k, v, upstream, **sizes)
    want = output_and_grads(sparse_attention_dense_mask, q, k, v, upstream, **sizes)
    assert_all_close(got, want, atol=1e-10)


def test_chunk_selection_matches_brute_force():
    B, T, H, D, chunk_size, topk = 2, 45, 2, 4, 4, 4
    q, k, _ = random_qkv(B, T, H, D, seed=5)
    selected = chunk_selection(q, k, chunk_size, topk)
    assert selected.shape == (B, T, H, topk - 1) and selected.dtype == torch.long
    for b in range(B):
        for h in range(H):
            for t in range(T):
                means = [k[b, c * chunk_size : (c + 1) * chunk_size, h].mean(0) for c in range(t // chunk_size)]
                ranked = sorted(range(len(means)), key=lambda c: (-float(q[b, t, h] @ means[c]), c))[: topk - 1]
                expected = ranked + [-1] * (topk - 1 - len(ranked))
                assert selected[b, t, h].tolist() == expected, (b, t, h)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_pick_the_earlier_chunk(dtype):
    """Chunks 1 and 3 get identical keys that dominate every score: the earlier one must rank first."""
    B, T, H, D, chunk_size = 1, 96, 2, 8, 12
    q, k, v = random_qkv(B, T, H, D, seed=7, dtype=dtype)
    boost = 3.0 * torch.ones(D, dtype=dtype)
    q = q + boost
    k[:, chunk_size : 2 * chunk_size] += boost
    k[:, 3 * chunk_size : 4 * chunk_size] = k[:, chunk_size : 2 * chunk_size]
    late = slice(4 * chunk_size, T)  # queries for which both tied chunks are eligible

    top1 = chunk_selection(q, k, chunk_size, topk=2)
    assert (top1[:, late] == 1).all()
    top2 = chunk_selection(q, k, chunk_size, topk=3)
    assert (top2[:, late, :, 0] == 1).all() and (top2[:, late, :, 1] == 3).all()

    if dtype == torch.float64:
        upstream = torch.randn(B, T, H, D, dtype=dtype)
        for topk in (2, 3):
            got = output_and_grads(sparse_attention_naive, q, k, v, upstream, chunk_size=chunk_size, topk=topk)
            want = output_and_grads(sparse_attention_dense_mask, q, k, v, upstream, chunk_size=chunk_size, topk=topk)
            assert_all_close(got, want, atol=1e-10)


def causal_attention_by_hand(q, k, v):
    T, D = q.shape[1], q.shape[3]
    logits = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", torch.softmax(logits, dim=-1), v)


@pytest.mark.parametrize("T, chunk_size, topk", [(100, 40, 3), (120, 40, 3), (33, 8, 5)])
def test_short_sequences_are_dense_causal(T, chunk_size, topk):
    q, k, v = random_qkv(2, T, 3, 16, seed=T)
    upstream = torch.randn(2, T, 3, 16, dtype=torch.float64)
    got = output_and_grads(sparse_attention_naive, q, k, v, upstream, chunk_size=chunk_size, topk=topk)
    want = output_and_grads(lambda q, k, v: causal_attention_by_hand(q, k, v), q, k, v, upstream)
    assert_all_close(got, want, atol=1e-10)


def test_packed_documents_match_separate_runs():
    lengths = [37, 100, 0, 91]
    cu_seqlens = torch.tensor([0, 37, 137, 137, 228])
    T, H, D, sizes = sum(lengths), 3, 16, dict(chunk_size=16, topk=3)
    q, k, v = random_qkv(1, T, H, D, seed=11)
    upstream = torch.randn(1, T, H, D, dtype=torch.float64)

    packed = output_and_grads(sparse_attention_naive, q, k, v, upstream, cu_seqlens=cu_seqlens, **sizes)
    bounds = cu_seqlens.tolist()
    pieces = [
        output_and_grads(sparse_attention_naive, q[:, s:e], k[:, s:e], v[:, s:e], upstream[:, s:e], **sizes)
        for s, e in zip(bounds, bounds[1:])
    ]
    separate = [torch.cat(parts, dim=1) for parts in zip(*pieces)]
    assert_all_close(packed, separate, atol=1e-12)

    oracle = output_and_grads(sparse_attention_dense_mask, q, k, v, upstream, cu_seqlens=bounds, **sizes)
    assert_all_close(packed, oracle, atol=1e-10)


@pytest.mark.parametrize(
    "cu_seqlens, batch, match",
    [
        ([0, 50, 40, 100], 1, "40"),
        ([1, 50, 100], 1, r"\[1, 50, 100\]"),
        ([0, 50, 99], 1, "99"),
        ([0, 100], 2, "B=2"),
        (torch.tensor([[0, 100]]), 1, "2-D"),
        (torch.tensor([0.0, 100.0]), 1, "float"),
        ([0, 50.5, 100], 1, "50.5"),
    ],
)
def test_bad_cu_seqlens_raise(cu_seqlens, batch, match):
    q, k, v = random_qkv(batch, 100, 2, 8, seed=13)
    for fn in (sparse_attention_naive, sparse_attention_dense_mask):
        with pytest.raises(ValueError, match=match):
            fn(q, k, v, chunk_size=16, topk=3, cu_seqlens=cu_seqlens)


def saved_tensors_while(fn):
    """Every tensor autograd saves for backward while `fn` runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_nothing_of_size_t_by_t_is_saved(monkeypatch):
    B, T, H, D, chunk_size, topk = 1, 2048, 2, 16, 64, 3
    q, k, v = (x.float().requires_grad_() for x in random_qkv(B, T, H, D, seed=17))

    def forward():
        sparse_attention_naive(q, k, v, chunk_size, topk)

    # Checkpointed blocks keep only their inputs: views of q, k, v plus chunk-level selection masks.
    # Count distinct storages, since the many k/v views share one.
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved_tensors_while(forward)}
    held_fp32_elements = sum(storages.values()) / 4
    assert held_fp32_elements <= 4 * B * T * H * D + B * H * T * (T // chunk_size)
    # Without checkpointing each block would save at most its L x T logits: O(T * chunk_size * H).
    monkeypatch.setattr(naive_module, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))
    assert max(t.numel() for t in saved_tensors_while(forward)) <= B * H * chunk_size * T


def test_fp32_inputs_match_float64_oracle():
    B, T, H, D, sizes = 2, 200, 3, 64, dict(chunk_size=16, topk=3)
    q, k, v = random_qkv(B, T, H, D, seed=19)
    got = sparse_attention_naive(q.float(), k.float(), v.float(), **sizes)
    want = sparse_attention_dense_mask(q, k, v, **sizes)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()
