"""Triton top-k chunk sparse attention (forward + backward) and the decoding cache, against the
plain-PyTorch references in float64.

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set here before the
kernels are imported, fp32, tiny shapes, small tiles given through `config`). With CUDA the same
tests run compiled with the default GPU launch parameters, plus the `gpu` tests (bf16, T = 8192).
"""

import math
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from rwkvx_kernels.sparse_attention import (  # noqa: E402
    ChunkedKVCache,
    chunk_selection,
    last_backend,
    sparse_attention,
    sparse_attention_dense_mask,
    sparse_attention_naive,
)
from rwkvx_kernels.sparse_attention.triton_topk import chunk_selection_triton, sparse_attention_triton  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                   reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def random_qkv(B, T, H, D, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=gen, dtype=dtype) for _ in range(4)]


def output_and_grads(fn, q, k, v, upstream, dtype, device="cpu", **kwargs):
    q, k, v = (x.detach().to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(upstream.to(device=device, dtype=dtype))
    return [x.detach().double().cpu() for x in (out, q.grad, k.grad, v.grad)]


def rel_err(got, want):
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def assert_close(got, want, tol):
    errs = {name: rel_err(g, w) for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
    assert all(e <= tol for e in errs.values()), errs


def check_against_oracle(q, k, v, upstream, cu_seqlens=None, config=None, **sizes):
    if DEVICE == "cuda" and config:  # the tiny interpreter tiles are below tl.dot's minimum on GPUs
        config = {key: val for key, val in config.items()
                  if key in ("dq_atomic", "dkdv_split", "sel_prec", "partial_dtype", "merge_in_own")}
    got = output_and_grads(sparse_attention_triton, q, k, v, upstream, torch.float32, DEVICE,
                           cu_seqlens=cu_seqlens, config=config, **sizes)
    want = output_and_grads(sparse_attention_dense_mask, q, k, v, upstream, torch.float64,
                            cu_seqlens=cu_seqlens, **sizes)
    assert_close(got, want, 1e-4)
    return got


@needs_kernels
@pytest.mark.parametrize(
    "B, T, H, D, chunk_size, topk, seed, config",
    [
        (2, 100, 2, 16, 16, 3, 0, None),  # T not a multiple of the chunk
        (1, 128, 2, 64, 32, 2, 1, None),  # T a multiple, head size 64
        (2, 90, 1, 16, 8, 5, 2, None),  # chunk smaller than the tiles: tiles straddle chunks
        (1, 75, 2, 16, 8, 1, 3, None),  # own chunk only
        (1, 110, 2, 32, 12, 4, 4, {"past_bn": 8, "dkdv_bn": 8, "dkdv_bm": 8, "fwd_bm": 8, "dq_bn": 8}),
        (1, 120, 2, 16, 32, 3, 5, {"fwd_bm": 16, "fwd_bn": 8, "past_bm": 8, "dqp_bm": 8, "dq_bm": 8}),
        (2, 100, 2, 16, 8, 3, 6, {"dq_atomic": True}),  # dQ accumulated atomically by the dK/dV kernel
        # three key blocks per chunk, each starting its walk over a long bucket at a different tile
        (1, 200, 2, 16, 48, 3, 10, {"dq_atomic": True}),
        (1, 130, 2, 16, 8, 4, 7, {"dkdv_split": 8, "dq_atomic": True}),  # buckets split across programs
        (2, 96, 1, 16, 16, 3, 8, {"dkdv_split": 16}),
        (2, 100, 2, 16, 8, 3, 9, {"sel_prec": "ieee"}),  # exact fp32 chunk scores
        # the merge of the past partials by its own kernel at topk 3, inside the own-chunk forward at topk 5
        (2, 100, 2, 16, 8, 3, 12, {"merge_in_own": False}),
        (1, 130, 2, 16, 8, 5, 13, {"merge_in_own": True}),
    ],
)
def test_matches_dense_mask_oracle(B, T, H, D, chunk_size, topk, seed, config):
    q, k, v, upstream = random_qkv(B, T, H, D, seed)
    check_against_oracle(q, k, v, upstream, chunk_size=chunk_size, topk=topk, config=config)


@needs_kernels
def test_selection_matches_reference_order():
    B, T, H, D, cs, topk = 2, 77, 3, 16, 8, 4
    q, k, _, _ = random_qkv(B, T, H, D, seed=6, dtype=torch.float32)
    got = chunk_selection_triton(q.to(DEVICE), k.to(DEVICE), cs, topk).cpu()
    assert got.dtype == torch.long and torch.equal(got, chunk_selection(q, k, cs, topk))


def tied_inputs(dtype):
    """Chunks 1 and 3 get identical keys that dominate every score: the earlier one must win."""
    B, T, H, D, cs = 1, 72, 2, 16, 8
    q, k, v, upstream = random_qkv(B, T, H, D, seed=7, dtype=dtype)
    boost = 3.0 * torch.ones(D, dtype=dtype)
    q = q + boost
    k[:, cs : 2 * cs] += boost
    k[:, 3 * cs : 4 * cs] = k[:, cs : 2 * cs]
    return q, k, v, upstream, cs


@needs_kernels
def test_ties_pick_the_earlier_chunk():
    q, k, v, upstream, cs = tied_inputs(torch.float32)
    late = slice(4 * cs, q.shape[1])
    top1 = chunk_selection_triton(q.to(DEVICE), k.to(DEVICE), cs, topk=2).cpu()
    assert (top1[:, late] == 1).all()
    top2 = chunk_selection_triton(q.to(DEVICE), k.to(DEVICE), cs, topk=3).cpu()
    assert (top2[:, late, :, 0] == 1).all() and (top2[:, late, :, 1] == 3).all()
    for topk in (2, 3):
        check_against_oracle(q.double(), k.double(), v.double(), upstream.double(), chunk_size=cs, topk=topk)


@needs_kernels
@pytest.mark.parametrize("topk", [2, 4, 8])  # 4: chunks 40 and 41 tie for the last slot
@pytest.mark.parametrize("sel_prec", ["tf32x3", "ieee"])
def test_selection_over_many_chunks_with_ties(topk, sel_prec):
    """Many chunks (several blocks of chunks per query tile) and exact ties inside and across blocks: the
    reference's choice, best first, earlier chunk on ties, with either precision of the chunk scores
    (the CPU interpreter computes every tl.dot in fp32, so the precisions differ only on a GPU)."""
    B, T, H, D, cs = 1, 300, 2, 16, 4
    q, k, _, _ = random_qkv(B, T, H, D, seed=11 + topk, dtype=torch.float32)
    boost = 2.0 * torch.ones(D)
    q = q + boost
    k[:, 3 * cs : 4 * cs] += boost
    for copy in (21, 40, 41):  # identical to chunk 3, later, some in other blocks of 16 chunks
        k[:, copy * cs : (copy + 1) * cs] = k[:, 3 * cs : 4 * cs]
    config = {"sel_prec": sel_prec}
    got = chunk_selection_triton(q.to(DEVICE), k.to(DEVICE), cs, topk, config=config).cpu()
    want = chunk_selection(q, k, cs, topk)
    assert torch.equal(got, want)
    n = min(3, topk - 1)  # the tied copies, earliest first
    assert (got[:, 42 * cs :, :, :n] == torch.tensor([3, 21, 40][:n])).all()


@needs_kernels
@pytest.mark.parametrize("topk, sel_bg", [(2, 16), (4, 32), (6, 16), (18, 16)])
def test_selection_many_chunks_packed_documents(topk, sel_bg):
    """Several blocks of chunks per document, tiles straddling documents (one empty), topk - 1 above the
    block size, and small-integer inputs so that scores are exact and ties frequent: exactly the
    reference's selection, document by document."""
    cu_seqlens = torch.tensor([0, 5, 5, 160, 163, 259])
    T, H, D, cs = 259, 2, 16, 2
    gen = torch.Generator().manual_seed(20 + topk)
    q = torch.randint(-2, 3, (1, T, H, D), generator=gen).float()
    k = (2 * torch.randint(-1, 2, (1, T, H, D), generator=gen)).float()  # chunk means stay exact
    got = chunk_selection_triton(q.to(DEVICE), k.to(DEVICE), cs, topk, cu_seqlens=cu_seqlens.to(DEVICE),
                                 config={"sel_bg": sel_bg}).cpu()
    for lo, hi in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        if hi > lo:
            assert torch.equal(got[:, lo:hi], chunk_selection(q[:, lo:hi], k[:, lo:hi], cs, topk)), (lo, hi)


def test_bad_selection_config_is_refused():
    """Bad or unknown launch parameters are refused with their name, by the kernels and by the entry point
    whichever backend it runs (so a bad `model.attn_kernel` fails on a CPU machine too)."""
    from rwkvx_kernels.sparse_attention import sparse_attention

    q = torch.zeros(1, 8, 1, 16)
    for bad in ({"sel_bg": 24}, {"sel_bg": 8}, {"sel_prec": "tf32"}, {"dkdv_bm": 48}, {"past_warps": 3},
                {"dq_stages": 0}, {"dq_atomic": "yes"}, {"dkdv_split": -1}, {"dkdv_tile": 64}, {"dkdv_impl": "fast"},
                {"dq_in_dkdv": "yes"}, {"past_maxnreg": 16}, {"past_maxnreg": True},
                {"partial_dtype": "bf16"}):
        key = next(iter(bad))
        with pytest.raises(ValueError, match=key):
            chunk_selection_triton(q, q, 4, 2, config=bad)
        with pytest.raises(ValueError, match=key):
            sparse_attention(q, q, q, 4, 2, backend="naive", config=bad)


@needs_kernels
def test_gluon_dkdv_where_it_cannot_run_is_refused_before_the_forward():
    """Forcing the Gluon dK/dV kernel on inputs it does not take (CPU, fp32, head size 16 here; or with the
    Triton kernel's dq_atomic) fails at the call, naming the option and the reason; "auto" falls back."""
    q = torch.randn(1, 40, 2, 16, device=DEVICE, requires_grad=True)
    for config in ({"dkdv_impl": "gluon"}, {"dkdv_impl": "gluon", "dq_atomic": True}):
        with pytest.raises(ValueError, match="dkdv_impl 'gluon' cannot run: .+"):
            sparse_attention_triton(q, q, q, 8, 3, config=config)
    sparse_attention_triton(q, q, q, 8, 3, config={"dkdv_impl": "auto"}).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_every_kernel_compiles_for_hopper_without_a_gpu():
    """All sparse attention kernels, the Gluon dK/dV kernel among them (which no CPU test can run), compile
    for sm_90 with the installed Triton (the Gluon one only on the Triton release it is written for) on the
    warpgroup tensor cores, the Gluon one without spills."""
    import subprocess
    import sys

    from rwkvx_kernels.sparse_attention import gluon_dkdv

    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "rwkvx_kernels.benchmarks.bench_sparse_attention", "--compile-only"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and "0 failures" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    if gluon_dkdv.triton_unsupported_reason() is None:
        line = next(row for row in run.stdout.splitlines() if "dkdv_gluon" in row)
        assert line.startswith("ok") and "spills 0 B" in line and "wgmma 0," not in line, line


@needs_kernels
@pytest.mark.parametrize("at_least_one, n_buckets", [(False, 37), (True, 37), (False, 1500)])
def test_work_table_cuts_every_bucket_into_blocks(at_least_one, n_buckets):
    """The work table (two kernels) against a plain loop: every bucket cut in blocks of BM entries, in bucket
    order, empty buckets skipped (or given one empty block), the surplus of the upper-bound grid marked -1;
    `first` is each bucket's first block (1500 buckets: the scan carries across its 1024-bucket blocks)."""
    from rwkvx_kernels.sparse_attention.triton_topk import _work_table

    gen = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 40, (n_buckets,), generator=gen)
    counts[[0, 5, 6, 36]] = 0
    counts[9] = 200
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    BM = 16
    wb, ws, n_items, first = _work_table(offs.to(DEVICE), BM, int(counts.sum()), at_least_one, first=True)
    want_b, want_s, want_first = [], [], [0]
    for u, c in enumerate(counts.tolist()):
        n = max(-(-c // BM), 1 if at_least_one else 0)
        want_b += [u] * n
        want_s += [int(offs[u]) + j * BM for j in range(n)]
        want_first.append(want_first[-1] + n)
    assert n_items >= len(want_b)
    assert wb.cpu().tolist() == want_b + [-1] * (n_items - len(want_b))
    assert ws.cpu().tolist()[:len(want_s)] == want_s
    assert first.cpu().tolist() == want_first


@needs_kernels
def test_gathered_rows_are_the_bucket_entries_in_padded_bucket_order():
    """`gluon_dkdv.gather_rows` (a Triton kernel, run on every machine) puts each bucket's entries in
    order in whole tiles of BM rows: their flat row indices, lse and delta; the rest of a bucket's last
    tile has index -1; and each pair's padded row is recorded for it."""
    from rwkvx_kernels.sparse_attention import gluon_dkdv
    from rwkvx_kernels.sparse_attention.triton_topk import _forward, _work_table, resolve_config

    B, T, H, D, cs, topk = 2, 70, 2, 16, 8, 3
    q, k, v, _ = (x.float().to(DEVICE) for x in random_qkv(B, T, H, D, 11))
    o, lse, sel, perm, offs, NC, tables, _ = _forward(q, k, v, cs, topk, (0, T), resolve_config(None, DEVICE))
    delta = torch.randn(B * H, T, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    K1, BM = topk - 1, gluon_dkdv.BM
    wb, ws, n_items, first = _work_table(offs, BM, perm.numel(), first=True)
    tokg, lse_g, delta_g, rowpos = (x.cpu() for x in gluon_dkdv.gather_rows(lse, delta, perm, offs, (wb, ws, n_items),
                                                                             T, H, NC, K1, positions=True))
    perm, offs, first = perm.long().cpu(), offs.long().cpu(), first.long().cpu()
    checked = 0
    for u in range(B * H * NC):
        bh = u // NC
        pairs = perm[offs[u]:offs[u + 1]]
        t = (pairs // (H * K1)) % T
        rows = torch.arange(first[u] * BM, first[u + 1] * BM)
        n = len(pairs)
        assert len(rows) == -(-n // BM) * BM
        assert tokg[rows[:n]].tolist() == (((bh // H) * T + t) * H + bh % H).tolist()
        assert (tokg[rows[n:]] == -1).all()
        assert torch.equal(lse_g[rows[:n]], lse.cpu()[bh, t]) and torch.equal(delta_g[rows[:n]], delta.cpu()[bh, t])
        assert rowpos[pairs].tolist() == rows[:n].tolist()
        checked += n
    assert checked == (sel >= 0).sum().item() > 0


@needs_kernels
def test_dq_sum_adds_the_own_part_and_each_filled_slot():
    """`gluon_dkdv._dq_sum_kernel` (Triton, run on every machine): dQ of a row = its own-chunk part plus the
    part at the padded row of each of its filled slots (empty slots, -1, add nothing), cast to the input dtype."""
    from rwkvx_kernels.sparse_attention import gluon_dkdv

    gen = torch.Generator().manual_seed(9)
    n_rows, K1, D, R = 150, 3, 16, 700
    dq_own = torch.randn(n_rows, D, generator=gen)
    dq_g = torch.randn(R, D, generator=gen)
    sel = torch.randint(0, 5, (n_rows, K1), generator=gen, dtype=torch.int32)
    sel[torch.rand(n_rows, K1, generator=gen) < 0.3] = -1
    rowpos = torch.randperm(R, generator=gen)[:n_rows * K1].to(torch.int32).view(n_rows, K1)
    want = dq_own.double() + (dq_g.double()[rowpos.long()] * (sel >= 0).unsqueeze(-1)).sum(1)
    dq = torch.empty(n_rows, D, dtype=torch.float16)
    args = [x.to(DEVICE) for x in (dq_own, dq_g, rowpos.flatten(), sel.flatten(), dq)]
    gluon_dkdv._dq_sum_kernel[(-(-n_rows // 64),)](*args, n_rows, K1=K1, D=D, BM=64)
    assert rel_err(args[-1].cpu().double(), want) < 1e-3


def test_fp32_inputs_get_dkdv_tiles_that_fit_shared_memory():
    """fp32 inputs on a GPU take smaller dK/dV tiles (the default ones need 264 KB of shared memory there and
    fail to launch); options given by the user still win, and bf16 keeps the default tiles."""
    from rwkvx_kernels.sparse_attention.triton_topk import CONFIG_GPU, CONFIG_GPU_FP32, resolve_config

    fp32 = resolve_config(None, "cuda", torch.float32)
    assert all(fp32[key] == val for key, val in CONFIG_GPU_FP32.items())
    assert any(CONFIG_GPU[key] != val for key, val in CONFIG_GPU_FP32.items())
    assert resolve_config({"dkdv_bn": 128}, "cuda", torch.float32)["dkdv_bn"] == 128
    assert resolve_config(None, "cuda", torch.bfloat16) == resolve_config(None, "cuda")
    assert resolve_config(None, "cuda")["dkdv_bn"] == CONFIG_GPU["dkdv_bn"]


@needs_kernels
def test_packed_documents():
    """An empty document, one shorter than a chunk, and longer ones; nothing crosses a boundary."""
    cu_seqlens = torch.tensor([0, 37, 37, 42, 107, 140])
    T, H, D, sizes = 140, 2, 16, dict(chunk_size=8, topk=3)
    q, k, v, upstream = random_qkv(1, T, H, D, seed=11)
    packed = check_against_oracle(q, k, v, upstream, cu_seqlens=cu_seqlens, **sizes)
    bounds = cu_seqlens.tolist()
    pieces = [output_and_grads(sparse_attention_naive, q[:, s:e], k[:, s:e], v[:, s:e], upstream[:, s:e],
                               torch.float64, **sizes) for s, e in zip(bounds, bounds[1:])]
    separate = [torch.cat(parts, dim=1) for parts in zip(*pieces)]
    assert_close(packed, separate, 1e-4)
    # document-relative chunk ids, as a per-document chunk_selection would give
    sel = chunk_selection_triton(q.float().to(DEVICE), k.float().to(DEVICE), cu_seqlens=cu_seqlens, **sizes).cpu()
    for s, e in zip(bounds, bounds[1:]):
        if e > s:
            assert torch.equal(sel[:, s:e], chunk_selection(q[:, s:e].float(), k[:, s:e].float(), **sizes))


@needs_kernels
@pytest.mark.parametrize("T, chunk_size, topk", [(60, 20, 3), (48, 16, 3)])
def test_short_sequences_are_dense_causal(T, chunk_size, topk):
    q, k, v, upstream = random_qkv(2, T, 2, 16, seed=T)

    def causal(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)

    got = output_and_grads(sparse_attention_triton, q, k, v, upstream, torch.float32, DEVICE,
                           chunk_size=chunk_size, topk=topk)
    want = output_and_grads(causal, q, k, v, upstream, torch.float64)
    assert_close(got, want, 1e-4)


@needs_kernels
def test_saved_state_is_linear_in_t():
    B, T, H, D, cs, topk = 1, 256, 2, 16, 16, 3
    q, k, v = (x.float().to(DEVICE).requires_grad_() for x in random_qkv(B, T, H, D, seed=17)[:3])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sparse_attention_triton(q, k, v, cs, topk)
    assert saved and max(t.numel() for t in saved) <= B * T * H * D
    assert sum(t.numel() for t in saved) <= B * T * H * (4 * D + 1 + 2 * (topk - 1)) + 4 * T + 8


@needs_kernels
def test_dispatch_and_fallback():
    q, k, v, _ = random_qkv(1, 40, 2, 16, seed=21)
    out = sparse_attention(q.float().to(DEVICE), k.float().to(DEVICE), v.float().to(DEVICE), 8, 3)
    assert last_backend() == "triton" and out.dtype == torch.float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = sparse_attention(q, k, v, 8, 3)  # float64 -> reference
    assert last_backend() == "naive" and any("float64" in str(w.message) for w in caught)
    assert rel_err(out.double().cpu(), ref) <= 1e-5
    with pytest.raises(ValueError, match="B=2"):
        sparse_attention(q.float().expand(2, -1, -1, -1).to(DEVICE), k.float().expand(2, -1, -1, -1).to(DEVICE),
                         v.float().expand(2, -1, -1, -1).to(DEVICE), 8, 3, cu_seqlens=[0, 40])


# ------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("chunk_size, topk, tie", [(4, 3, False), (5, 2, False), (4, 3, True), (6, 1, False)])
def test_decode_matches_training_rule(chunk_size, topk, tie):
    B, T, H, D = 2, 37, 3, 8
    q, k, v, _ = random_qkv(B, T, H, D, seed=31 + chunk_size)
    if tie:  # chunks 0 and 2 identical and dominant
        q = q + 3.0
        k[:, :chunk_size] += 3.0
        k[:, 2 * chunk_size : 3 * chunk_size] = k[:, :chunk_size]
    want = sparse_attention_naive(q, k, v, chunk_size, topk)
    cache = ChunkedKVCache(H, D, chunk_size, topk, dtype=torch.float64, batch_size=B)
    prompt = 7
    cache.extend(k[:, :prompt], v[:, :prompt])
    for t in range(prompt, T):
        y = cache.step(q[:, t], k[:, t], v[:, t])
        if t % 4 == 0 or t == T - 1:  # the last row of a run on the prefix (== row t of the full run, causal)
            ref = sparse_attention_naive(q[:, : t + 1], k[:, : t + 1], v[:, : t + 1], chunk_size, topk)[:, t]
            assert (y - ref).abs().max().item() <= 1e-12, t
        assert (y - want[:, t]).abs().max().item() <= 1e-12, t
    assert cache.length == T and cache.n_complete_chunks == T // chunk_size


def test_decode_cache_grows_and_keeps_contents():
    B, H, D, cs = 1, 2, 4, 4
    cache = ChunkedKVCache(H, D, cs, 2, dtype=torch.float64, batch_size=B)
    q, k, v, _ = random_qkv(B, 50, H, D, seed=41)
    for t in range(50):
        cache.append(k[:, t], v[:, t])
    means = k[:, :48].transpose(1, 2).reshape(B, H, 12, cs, D).mean(-2)
    assert torch.equal(cache._means[:, :, :12], means)
    assert torch.equal(cache._k[:, :, :50], k.transpose(1, 2))
    assert (cache.attend(q[:, 49]) - sparse_attention_naive(q, k, v, cs, 2)[:, 49]).abs().max() <= 1e-12


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("cu_seqlens, config", [(None, None), ([0, 3000, 3001, 8192], None),
                                                (None, {"partial_dtype": "input"}),
                                                ([0, 3000, 3001, 8192], {"partial_dtype": "input"})])
def test_gpu_bf16_matches_float64(cu_seqlens, config):
    """bf16 within 1e-2 of float64, with the per-pair partials in fp32 and in bf16."""
    B, T, H, D, cs, topk = 1, 8192, 2, 64, 512, 3
    q, k, v, upstream = random_qkv(B, T, H, D, seed=51)
    # round to bf16 first so both sides see the same inputs
    q, k, v, upstream = (x.bfloat16().double() for x in (q, k, v, upstream))
    got = output_and_grads(sparse_attention, q, k, v, upstream, torch.bfloat16, "cuda",
                           chunk_size=cs, topk=topk, cu_seqlens=cu_seqlens, config=config)
    assert last_backend() == "triton"
    want = output_and_grads(sparse_attention_naive, q, k, v, upstream, torch.float64, "cuda",
                            chunk_size=cs, topk=topk, cu_seqlens=cu_seqlens)
    assert_close(got, want, 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (and TRITON_INTERPRET unset)")
def test_gpu_past_chunk_register_cap_leaves_the_output_bitwise_unchanged():
    """`past_maxnreg` (three past-chunk programs per SM instead of two) changes only how registers are
    allocated: the same products in the same order, so the same bits as without the cap."""
    B, T, H, D, cs, topk = 1, 5000, 3, 64, 256, 4
    q, k, v = (x.cuda().bfloat16() for x in random_qkv(B, T, H, D, seed=57)[:3])
    capped = sparse_attention_triton(q, k, v, cs, topk, config={"past_maxnreg": 168})
    uncapped = sparse_attention_triton(q, k, v, cs, topk, config={"past_maxnreg": 0})
    assert torch.equal(capped, uncapped)
    assert capped.isfinite().all() and capped.abs().max() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_selection_is_the_fp32_paths_bitwise(dtype):
    """bf16 / fp16 queries are exact in tf32, so the selection kernel leaves out tf32x3's product of their low
    part: on the same values it must select exactly what the fp32-input path (full tf32x3) selects, ties
    included (copied key chunks), over four blocks of chunks; and agree with float64 but for near-ties."""
    B, T, H, D, cs, topk = 2, 8192, 2, 64, 64, 8
    gen = torch.Generator().manual_seed(83)
    q = torch.randn(B, T, H, D, generator=gen).to(dtype)
    k = torch.randn(B, T, H, D, generator=gen).to(dtype)
    k[:, 40 * cs:41 * cs] = k[:, 3 * cs:4 * cs]  # tied chunk means, in different blocks of 32 chunks
    k[:, 100 * cs:101 * cs] = k[:, 70 * cs:71 * cs]
    half = chunk_selection_triton(q.cuda(), k.cuda(), cs, topk).cpu()
    full = chunk_selection_triton(q.float().cuda(), k.float().cuda(), cs, topk).cpu()
    assert torch.equal(half, full)
    exact = chunk_selection(q.double(), k.double(), cs, topk)
    assert (half == exact).all(-1).float().mean() > 0.999


def _gluon_reason():
    from rwkvx_kernels.sparse_attention.gluon_dkdv import unsupported_reason

    if not torch.cuda.is_available() or INTERPRET:
        return "needs CUDA (and TRITON_INTERPRET unset)"
    return unsupported_reason(torch.device("cuda"), torch.bfloat16, 64)


@pytest.mark.gpu
@pytest.mark.skipif(_gluon_reason() is not None, reason=str(_gluon_reason()))
@pytest.mark.parametrize("dtype, B, T, cs, cu_seqlens", [(torch.bfloat16, 2, 3000, 512, None),
                                                     (torch.float16, 1, 5000, 256, [0, 1000, 1001, 3500, 5000])])
def test_gpu_gluon_dkdv_matches_float64_and_the_triton_kernel(dtype, B, T, cs, cu_seqlens):
    """The Gluon dK/dV kernel (Hopper) against float64 on fresh inputs (T not a multiple of the chunk, packed
    documents, fp16 and bf16), and against the Triton kernel it replaces, which sums in the same order."""
    H, D, topk = 2, 64, 3
    q, k, v, upstream = random_qkv(B, T, H, D, seed=61 + T)
    q, k, v, upstream = (x.to(dtype).double() for x in (q, k, v, upstream))
    sizes = dict(chunk_size=cs, topk=topk, cu_seqlens=cu_seqlens)
    gluon = output_and_grads(sparse_attention_triton, q, k, v, upstream, dtype, "cuda",
                             config={"dkdv_impl": "gluon"}, **sizes)
    triton_ = output_and_grads(sparse_attention_triton, q, k, v, upstream, dtype, "cuda",
                               config={"dkdv_impl": "triton"}, **sizes)
    want = output_and_grads(sparse_attention_naive, q, k, v, upstream, torch.float64, "cuda", **sizes)
    assert_close(gluon, want, 1e-2)
    for name, got, ref in zip(("dk", "dv"), gluon[2:], triton_[2:]):
        assert rel_err(got, ref) <= 1e-3, (name, rel_err(got, ref))


@pytest.mark.gpu
@pytest.mark.skipif(_gluon_reason() is not None, reason=str(_gluon_reason()))
@pytest.mark.parametrize("dtype, B, T, cs, topk, cu_seqlens", [
    (torch.bfloat16, 2, 3000, 128, 8, None),
    (torch.float16, 1, 5000, 64, 4, [0, 1000, 1001, 3500, 5000]),
    (torch.bfloat16, 1, 4100, 128, 2, [0, 100, 4100]),
])
def test_gpu_dq_inside_the_gluon_dkdv_kernel_matches_float64_and_the_dq_kernels(dtype, B, T, cs, topk, cu_seqlens):
    """Chunks of at most 128 tokens: the Gluon dK/dV kernel also forms dQ (`dq_in_dkdv`). Against float64 on
    fresh inputs (T not a multiple of the chunk, packed documents, a document shorter than a chunk, fp16 and
    bf16) and against the separate dQ kernels; dK, dV are bitwise those of the unfused kernel."""
    H, D = 2, 64
    q, k, v, upstream = random_qkv(B, T, H, D, seed=91 + T)
    q, k, v, upstream = (x.to(dtype).double() for x in (q, k, v, upstream))
    sizes = dict(chunk_size=cs, topk=topk, cu_seqlens=cu_seqlens)
    fused = output_and_grads(sparse_attention_triton, q, k, v, upstream, dtype, "cuda", config={"dq_in_dkdv": True},
                             **sizes)
    apart = output_and_grads(sparse_attention_triton, q, k, v, upstream, dtype, "cuda", config={"dq_in_dkdv": False},
                             **sizes)
    want = output_and_grads(sparse_attention_naive, q, k, v, upstream, torch.float64, "cuda", **sizes)
    assert_close(fused, want, 1e-2)
    assert fused[0].equal(apart[0]) and fused[2].equal(apart[2]) and fused[3].equal(apart[3])
    assert rel_err(fused[1], apart[1]) <= 5e-3, rel_err(fused[1], apart[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (and TRITON_INTERPRET unset)")
def test_gpu_fp32_and_ties():
    q, k, v, upstream, cs = tied_inputs(torch.float64)
    for topk in (2, 3):
        got = output_and_grads(sparse_attention, q, k, v, upstream, torch.float32, "cuda", chunk_size=cs, topk=topk)
        want = output_and_grads(sparse_attention_dense_mask, q, k, v, upstream, torch.float64, chunk_size=cs, topk=topk)
        assert_close(got, want, 1e-4)
    assert math.isfinite(rel_err(got[0], want[0]))
