"""Triton RWKV-7 recurrence kernels vs the float64 naive reference: values and every gradient.

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, fp32, tiny shapes).
The env var must be set before the kernel modules are imported (Triton decides at decoration time);
it is only set when no CUDA device is present, so on a GPU machine the same tests run compiled.
"""

import functools
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import rwkvx_kernels.wkv7 as wkv7_pkg  # noqa: E402
from rwkvx_kernels import dispatch  # noqa: E402
from rwkvx_kernels.wkv7 import wkv7, wkv7_naive  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if CUDA and not INTERPRET else "cpu"

if not CUDA and not INTERPRET:  # pragma: no cover - env var was set to something else by the user
    pytest.skip("no CUDA and TRITON_INTERPRET != 1", allow_module_level=True)

from rwkvx_kernels.wkv7.chunk import chunk_wkv7  # noqa: E402
from rwkvx_kernels.wkv7.fused_recurrent import fused_recurrent_wkv7  # noqa: E402

N = 64


W_FLOOR = -math.exp(-0.5)  # the model's most negative log decay: exp(w) = 0.545


def make_inputs(B, T, H, seed=0, dtype=torch.float32, device=DEV, n_state=None, state=False, extreme=False):
    """Model-like inputs; `extreme`: decay at its floor or 1 (random per entry) and in-context rate 1."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r, k, v = (rn(B, T, H, N) * 0.5 for _ in range(3))
    w = W_FLOOR * torch.sigmoid(rn(B, T, H, N))
    kk = torch.nn.functional.normalize(rn(B, T, H, N), dim=-1)
    a = -kk
    b = kk * torch.sigmoid(rn(B, T, H, N))
    if extreme:
        w = W_FLOOR * (rn(B, T, H, N) > 0).double()
        b = kk
    xs = [x.to(device=device, dtype=dtype) for x in (r, w, k, v, a, b)]
    h0 = (rn(n_state or B, H, N, N) * 0.3).to(device=device, dtype=torch.float32) if state else None
    return xs, h0


def rel(x, ref):
    x, ref = x.double().cpu(), ref.double().cpu()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_and_grads(fn, xs, h0, cu_seqlens, want_final, to64=False, seed=1):
    in_dtype = xs[0].dtype  # dy is rounded to the input dtype so that both runs see the same dy
    xs = [x.detach().clone().double() if to64 else x.detach().clone() for x in xs]
    for x in xs:
        x.requires_grad_(True)
    if h0 is not None:
        h0 = h0.detach().clone().double() if to64 else h0.detach().clone()
        h0.requires_grad_(True)
    y, ht = fn(*xs, initial_state=h0, cu_seqlens=cu_seqlens, output_final_state=want_final)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(in_dtype).to(y.device, y.dtype)
    loss = (y * dy).sum()
    if want_final:
        dht = torch.randn(ht.shape, generator=g, dtype=torch.float64).to(ht.device, ht.dtype)
        loss = loss + (ht * dht).sum()
    loss.backward()
    grads = [x.grad for x in xs] + ([h0.grad] if h0 is not None else [])
    return y, ht, grads


NAMES = ["r", "w", "k", "v", "a", "b", "h0"]


def check(fn, B, T, H, state, cu, want_final, tol=1e-4, seed=0, dtype=torch.float32, extreme=False):
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    n_state = None if cu is None else len(cu) - 1
    xs, h0 = make_inputs(B, T, H, seed=seed, dtype=dtype, n_state=n_state, state=state, extreme=extreme)
    y, ht, grads = run_and_grads(fn, xs, h0, cu_t, want_final)
    y64, ht64, grads64 = run_and_grads(wkv7_naive, xs, h0, None if cu is None else torch.tensor(cu), want_final, to64=True)
    errs = {"y": rel(y, y64)}
    if want_final:
        errs["ht"] = rel(ht, ht64)
    for name, gx, g64 in zip(NAMES, grads, grads64):
        assert gx is not None, f"no gradient for {name}"
        errs["d" + name] = rel(gx, g64)
    bad = {k_: e for k_, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
    return errs


CASES = [
    # B, T, H, initial_state, cu_seqlens, output_final_state
    pytest.param(1, 37, 1, False, None, False, id="T37"),
    pytest.param(2, 37, 1, True, None, True, id="T37-h0-final"),
    pytest.param(1, 64, 2, True, None, False, id="T64-h0"),
    pytest.param(1, 64, 1, False, None, True, id="T64-final"),
    pytest.param(1, 53, 1, False, [0, 5, 30, 53], True, id="varlen-final"),
    pytest.param(1, 53, 1, True, [0, 5, 30, 53], True, id="varlen-h0-final"),
    pytest.param(1, 40, 1, True, [0, 17, 17, 40], True, id="varlen-empty-doc"),
]


@pytest.mark.parametrize("B,T,H,state,cu,final", CASES)
def test_fused_recurrent_matches_float64(B, T, H, state, cu, final):
    check(fused_recurrent_wkv7, B, T, H, state, cu, final)


def test_fused_recurrent_row_blocks():
    """BV < 64: per-key gradients come from partial sums over row blocks."""
    from rwkvx_kernels.wkv7 import fused_recurrent as fr

    old = dict(fr.CONFIG)
    fr.CONFIG.update(fwd_bv=32, bwd_bv=16)
    try:
        check(fused_recurrent_wkv7, 1, 21, 1, True, None, True)
    finally:
        fr.CONFIG.clear()
        fr.CONFIG.update(old)


@pytest.mark.parametrize("B,T,H,state,cu,final", CASES)
def test_chunk_matches_float64(B, T, H, state, cu, final):
    check(chunk_wkv7, B, T, H, state, cu, final)


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param({"group_chunks": 2}, id="grouped"),
        pytest.param({"group_chunks": 1, "fuse_out": True, "state_bv": 16}, id="grouped1-fused-bv16"),
        pytest.param({"group_chunks": 0, "fuse_out": True, "state_bv": 64}, id="fused-bv64"),
        pytest.param({"checkpoint_chunks": 4}, id="checkpoints4"),
        pytest.param({"exact_precision": "tf32x3", "group_chunks": 2}, id="tf32x3-inverse-and-scan"),
        pytest.param({"chunk_len": 32, "checkpoint_chunks": 2}, id="chunk32-checkpoints2"),
        pytest.param({"chunk_len": 32, "group_chunks": 1, "fuse_out": True}, id="chunk32-grouped-fused"),
        pytest.param({"save_wy": True, "checkpoint_chunks": 2}, id="saved-wy-checkpoints2"),
        pytest.param({"checkpoint_chunks": 2, "state_bv": 32}, id="checkpoints2-bv32"),
        pytest.param({"checkpoint_chunks": 3, "group_chunks": 2}, id="checkpoints3-grouped"),
        pytest.param({"checkpoint_chunks": 1}, id="every-chunk"),
        pytest.param({"checkpoint_chunks": 1, "group_chunks": 2, "fuse_out": True}, id="every-chunk-grouped-fused"),
        pytest.param({"checkpoint_chunks": 0, "group_chunks": 2, "save_wy": True}, id="no-checkpoints-grouped"),
        pytest.param({"checkpoint_chunks": 0, "fuse_out": True}, id="no-checkpoints-fused"),
        pytest.param({"grad_bv": 16}, id="grad-bv16"),
        pytest.param({"grad_bv": 32, "chunk_len": 32}, id="grad-bv32-chunk32"),
        pytest.param({"grad_kernels": 3}, id="chunk16-split-grads"),
        pytest.param({"state_step": "affine"}, id="affine-step"),
        pytest.param({"state_step": "affine", "group_chunks": 2, "checkpoint_chunks": 3}, id="affine-step-grouped-checkpoints3"),
        pytest.param({"state_step": "affine", "chunk_len": 64, "checkpoint_chunks": 1}, id="affine-step-chunk64-every-chunk"),
        pytest.param({"chunk_len": 64}, id="chunk64-split-grads"),
        pytest.param({"chunk_len": 64, "checkpoint_chunks": 1, "group_chunks": 1}, id="chunk64-every-chunk-grouped"),
        pytest.param({"chunk_len": 64, "state_warps": 4, "state_stages": 1, "checkpoint_chunks": 2},
                     id="chunk64-stages1-checkpoints2"),
    ],
)
@pytest.mark.parametrize("B,T,H,cu", [(2, 70, 1, None), (1, 90, 1, [0, 5, 75, 75, 90])], ids=["batch", "varlen"])
def test_chunk_configs(cfg, B, T, H, cu):
    """Two-level scan over groups of chunks (used when sequences x heads are few), y fused into the state pass,
    states saved for backward at other checkpoint intervals (restored from several checkpoints per sequence)."""
    check(functools.partial(chunk_wkv7, config=cfg), B, T, H, True, cu, True)


def test_affine_step_reaches_every_state_launch(monkeypatch):
    """The direct step is a correct fallback, so the float64 checks alone cannot tell whether state_step reached a
    launch: every sequential-pass launch (grouped forward and backward, the recompute from checkpoints) must get it."""
    from rwkvx_kernels.wkv7 import chunk

    seen = []

    class Spy:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(chunk, name)

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def call(*args, **kwargs):
                seen.append((self.name, kwargs.get("AFFINE")))
                return launch(*args, **kwargs)

            return call

    for name in ("_fwd_state_kernel", "_bwd_state_kernel"):
        monkeypatch.setattr(chunk, name, Spy(name))
    cfg = {"state_step": "affine", "group_chunks": 2, "checkpoint_chunks": 3}
    check(functools.partial(chunk_wkv7, config=cfg), 1, 90, 1, True, [0, 5, 75, 75, 90], True)
    # forward: augmented group walk + walk; backward: restore from checkpoints, augmented group walk + walk
    assert [n for n, _ in seen] == ["_fwd_state_kernel"] * 3 + ["_bwd_state_kernel"] * 2, seen
    assert all(affine is True for _, affine in seen), seen


@pytest.mark.parametrize(
    "cfg,extra_inputs",
    [({}, 0), ({"checkpoint_chunks": 1}, 4), ({"checkpoint_chunks": 4}, 1),
     ({"checkpoint_chunks": 1, "save_wy": True}, 4 + 1 + 0.25), ({"save_wy": True}, 1 + 0.25)],
    ids=["inputs-only", "every-chunk", "every-4th-chunk", "every-chunk-with-wy", "with-wy"],
)
def test_chunk_saved_for_backward(cfg, extra_inputs):
    """Backward memory in elements: the six inputs alone by default (as fla), plus the chunk states
    [T / 16, H, 64, 64] (four inputs' worth) with checkpoint_chunks=1 or [T / 64, H, 64, 64] (one input's
    worth) with checkpoint_chunks=4, plus W [T, H, 64] and Q [T, H, 16] with save_wy; each suffices for
    backward."""
    xs, _ = make_inputs(1, 128, 2)
    xs = [x.requires_grad_(True) for x in xs]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = chunk_wkv7(*xs, config=cfg)
    y.sum().backward()
    saved_elems = sum(t.numel() for t in saved)
    assert saved_elems == (6 + extra_inputs) * xs[0].numel(), [tuple(t.shape) for t in saved]
    assert all(torch.isfinite(x.grad).all() for x in xs)


@pytest.mark.parametrize("ckpt", [0, 1], ids=["inputs-only", "every-chunk"])
def test_chunk_in_place_write_to_initial_state(ckpt):
    """With the default (inputs only, as fla) backward reads the initial state again, so an in-place
    write into it before backward must raise instead of silently giving wrong gradients; with every
    chunk state kept, backward does not need it and the write is harmless."""
    xs, h0 = make_inputs(1, 40, 1, seed=5, state=True)
    xs = [x.requires_grad_(True) for x in xs]
    y, _ = chunk_wkv7(*xs, initial_state=h0, config={"checkpoint_chunks": ckpt})
    h0.add_(1.0)
    if ckpt == 0:
        with pytest.raises(RuntimeError, match="inplace"):
            y.sum().backward()
    else:
        y.sum().backward()
        h0.sub_(1.0)
        y64, _ = wkv7_naive(*(x.detach().double().requires_grad_(True) for x in xs), initial_state=h0.double())
        assert rel(y, y64) < 1e-4


@pytest.mark.parametrize("fn", [chunk_wkv7, fused_recurrent_wkv7], ids=["chunk", "fused_recurrent"])
def test_extreme_decay_and_rate(fn):
    """Decay at its floor 0.545 (largest in-chunk rescaling) or 1, in-context learning rate 1."""
    check(fn, 1, 48, 1, True, [0, 16, 48], True, extreme=True)


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_chunk_inference_forward(fuse):
    """Under no_grad the per-chunk states are not kept (fused path) and y / final state still match."""
    from rwkvx_kernels.wkv7 import chunk

    old = dict(chunk.CONFIG)
    chunk.CONFIG["fuse_out"] = fuse
    try:
        xs, h0 = make_inputs(1, 40, 1, state=True)
        for x in xs:
            x.requires_grad_(True)
        with torch.no_grad():
            y, ht = chunk_wkv7(*xs, initial_state=h0, output_final_state=True)
        y64, ht64 = wkv7_naive(*(x.detach().double() for x in xs), initial_state=h0.double(), output_final_state=True)
        assert rel(y, y64) < 1e-4 and rel(ht, ht64) < 1e-4
    finally:
        chunk.CONFIG.clear()
        chunk.CONFIG.update(old)


def test_dispatch_uses_triton():
    xs, h0 = make_inputs(1, 5, 1, state=True)
    y, ht = wkv7(*xs, initial_state=h0, output_final_state=True)
    y64, ht64 = wkv7_naive(*(x.double() for x in xs), initial_state=h0.double(), output_final_state=True)
    assert rel(y, y64) < 1e-4 and rel(ht, ht64) < 1e-4
    assert wkv7_pkg.last_backend() in ("chunk", "fused_recurrent")


# ---------------------------------------------------------------- GPU (lead runs these on a CUDA box)


GPU_FNS = pytest.mark.parametrize(
    "fn", [chunk_wkv7, functools.partial(chunk_wkv7, config={"state_step": "affine"}),
           functools.partial(chunk_wkv7, config={"state_step": "affine", "group_chunks": 8}), fused_recurrent_wkv7],
    ids=["chunk", "chunk-affine-step", "chunk-affine-step-grouped", "fused_recurrent"])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs CUDA (compiled Triton)")
@GPU_FNS
def test_gpu_bf16_accuracy(fn, request):
    B, T, H = 2, 1024, 4
    xs, h0 = make_inputs(B, T, H, seed=3, dtype=torch.bfloat16, device="cuda", state=True)
    y, ht, grads = run_and_grads(fn, xs, h0, None, True)
    y64, ht64, grads64 = run_and_grads(wkv7_naive, xs, h0, None, True, to64=True)
    errs = {"y": rel(y, y64), "ht": rel(ht, ht64)}
    errs.update({"d" + n: rel(g, g64) for n, g, g64 in zip(NAMES, grads, grads64)})
    print(request.node.callspec.id, errs)
    assert errs["y"] < 5e-3 and errs["ht"] < 5e-3, errs
    assert all(errs["d" + n] < 2e-2 for n in NAMES), errs


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs CUDA (compiled Triton)")
@GPU_FNS
def test_gpu_long_sequence_finite(fn):
    xs, h0 = make_inputs(1, 65536, 2, seed=4, dtype=torch.bfloat16, device="cuda")
    y, ht, grads = run_and_grads(fn, xs, None, None, True)
    assert torch.isfinite(y).all() and torch.isfinite(ht).all()
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "cfg",
    [{"chunk_len": 128}, {"grad_bv": 48}, {"checkpoint_chunks": -1}, {"dot_precision": "fp8"},
     {"group_chunks": "some"}, {"save_wy": 1}, {"state_warps": 0}, {"grad_warps": 3}, {"state_bv": 32.0},
     {"state_stages": 0}, {"grad_kernels": 2}, {"grad_kernels": 3.0}, {"state_step": "fast"}, {"chunk_size": 16}],
    ids=["chunk_len", "grad_bv", "checkpoint_chunks", "dot_precision", "group_chunks", "save_wy", "state_warps",
         "grad_warps", "state_bv-float", "state_stages", "grad_kernels", "grad_kernels-float", "state_step",
         "unknown-key"],
)
def test_chunk_rejects_bad_config(cfg):
    """A bad or unknown option is refused with its name (and value), before any kernel runs, by the kernel and by
    the `wkv7` entry point whatever backend it picks; the module defaults are never modified by a call."""
    from rwkvx_kernels.wkv7 import chunk

    (key, val), = cfg.items()
    defaults = dict(chunk.CONFIG)
    xs, _ = make_inputs(1, 20, 1)
    with pytest.raises(ValueError, match=f"{key}.*{val}" if key in chunk.CONFIG else key):
        chunk_wkv7(*xs, config=cfg)
    for backend in ("chunk", "naive"):
        with pytest.raises(ValueError, match=key):
            wkv7(*xs, backend=backend, config=cfg)
    assert chunk.CONFIG == defaults


def test_chunk_options_are_per_call():
    """An option given to one call applies to that call (and its backward) only: a call with
    checkpoint_chunks=1 saves the chunk states, the next call without options does not."""
    xs, _ = make_inputs(1, 64, 1)
    xs = [x.requires_grad_(True) for x in xs]

    def saved_elems(**kw):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y, _ = chunk_wkv7(*xs, **kw)
        y.sum().backward()
        return sum(t.numel() for t in saved)

    assert saved_elems(config={"checkpoint_chunks": 1}) == 10 * xs[0].numel()
    assert saved_elems() == 6 * xs[0].numel()


def test_fallback_to_naive_for_float64():
    xs, h0 = make_inputs(1, 4, 1, dtype=torch.float64, state=True)
    dispatch._warned.clear()
    with pytest.warns(UserWarning, match="PyTorch reference"):
        y, ht = wkv7(*xs, initial_state=h0.double(), output_final_state=True)
    assert wkv7_pkg.last_backend() == "naive" and y.dtype == torch.float64


def test_chunk64_launch_defaults_and_limits():
    """64-token chunks take warpgroup-sized warp counts unless set explicitly, and refuse the fused output
    (more shared memory than a GPU has)."""
    from rwkvx_kernels.wkv7.chunk import CHUNK64_WARPS, resolve_config

    cfg = resolve_config({"chunk_len": 64})
    assert {key: cfg[key] for key in CHUNK64_WARPS} == CHUNK64_WARPS
    assert resolve_config({"chunk_len": 64, "grad_warps": 4})["grad_warps"] == 4
    from rwkvx_kernels.wkv7.chunk import CONFIG

    assert {key: resolve_config({})[key] for key in CHUNK64_WARPS} == {key: CONFIG[key] for key in CHUNK64_WARPS}
    with pytest.raises(ValueError, match="fuse_out.*chunk_len 64"):
        resolve_config({"chunk_len": 64, "fuse_out": True})
    with pytest.raises(ValueError, match="grad_kernels 1.*chunk_len 64"):
        resolve_config({"chunk_len": 64, "grad_kernels": 1})
    assert resolve_config({"chunk_len": 64})["grad_kernels"] == 3 and resolve_config({})["grad_kernels"] == 1
    with pytest.raises(ValueError, match="fuse_out.*affine"):
        resolve_config({"state_step": "affine", "fuse_out": True})
