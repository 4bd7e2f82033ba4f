"""The model against independent references: BlinkDL's `rwkv` package, its own recurrent form, SPEC layout rules."""

import importlib
import math
import os

import pytest
import torch

from rwkvx_lightning import RWKVX, ModelConfig
from rwkvx_lightning.model import document_offsets


def blinkdl_checkpoint(vocab=512, C=128, n_layer=3, seed=0) -> dict:
    """A random-weight RWKV-7 x070 state dict written from BlinkDL's format (names and shapes), not from our model."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    H, N = C // 64, 64
    lora = lambda f: max(32, int(round(f * math.sqrt(C) / 32) * 32))  # noqa: E731
    dw, da, dv, dg = lora(2.5), lora(2.5), lora(1.7), lora(5)
    sd = {"emb.weight": rnd(vocab, C), "blocks.0.ln0.weight": 1 + rnd(C, scale=0.1), "blocks.0.ln0.bias": rnd(C, scale=0.1)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"] = 1 + rnd(C, scale=0.1)
            sd[p + ln + ".bias"] = rnd(C, scale=0.1)
        a = p + "att."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[a + name] = torch.rand(1, 1, C, generator=g)
        sd[a + "w0"] = rnd(1, 1, C, scale=2.0)
        sd[a + "w1"], sd[a + "w2"] = rnd(C, dw, scale=0.1), rnd(dw, C, scale=0.1)
        sd[a + "a0"] = rnd(1, 1, C)
        sd[a + "a1"], sd[a + "a2"] = rnd(C, da, scale=0.1), rnd(da, C, scale=0.1)
        sd[a + "v0"] = rnd(1, 1, C)  # BlinkDL stores these in layer 0 too, unused there
        sd[a + "v1"], sd[a + "v2"] = rnd(C, dv, scale=0.1), rnd(dv, C, scale=0.1)
        sd[a + "g1"], sd[a + "g2"] = rnd(C, dg, scale=0.1), rnd(dg, C, scale=0.1)
        sd[a + "k_k"] = 0.7 + rnd(1, 1, C, scale=0.1)
        sd[a + "k_a"] = 1 + rnd(1, 1, C, scale=0.1)
        sd[a + "r_k"] = rnd(H, N, scale=0.1)
        for name in ("receptance", "key", "value", "output"):
            sd[a + name + ".weight"] = rnd(C, C, scale=C**-0.5)
        sd[a + "ln_x.weight"] = 1 + rnd(C, scale=0.1)
        sd[a + "ln_x.bias"] = rnd(C, scale=0.1)
        f = p + "ffn."
        sd[f + "x_k"] = torch.rand(1, 1, C, generator=g)
        sd[f + "key.weight"] = rnd(4 * C, C, scale=C**-0.5)
        sd[f + "value.weight"] = rnd(C, 4 * C, scale=(4 * C) ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = 1 + rnd(C, scale=0.1), rnd(C, scale=0.1)
    sd["head.weight"] = rnd(vocab, C, scale=C**-0.5)
    return sd


@pytest.fixture(scope="module")
def rwkv_x070():
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    return importlib.import_module("rwkv.model").RWKV_x070


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_from_rwkv7_matches_blinkdl_rwkv_package(tmp_path, rwkv_x070, backend):
    sd = blinkdl_checkpoint()
    torch.save(sd, tmp_path / "rwkv7.pth")
    tokens = torch.randint(0, 512, (48,), generator=torch.Generator().manual_seed(1)).tolist()

    reference = rwkv_x070(str(tmp_path / "rwkv7"), "cpu fp32")
    expected, _ = reference.forward(tokens, None, full_output=True)

    ours = RWKVX.from_rwkv7(tmp_path / "rwkv7.pth", wkv_backend=backend).eval()
    with torch.no_grad():
        got = ours(torch.tensor([tokens]))[0]
    rel = (got - expected).norm() / expected.norm()
    assert rel < 1e-4, f"relative error {rel:.2e} vs BlinkDL's RWKV_x070"


def test_from_rwkv7_inserts_attention_blocks(tmp_path):
    sd = blinkdl_checkpoint(n_layer=4)
    torch.save(sd, tmp_path / "rwkv7.pth")
    pure = RWKVX.from_rwkv7(tmp_path / "rwkv7.pth").eval()
    hybrid = RWKVX.from_rwkv7(tmp_path / "rwkv7.pth", n_attn=2, chunk_size=8, topk=2).eval()
    assert hybrid.block_kinds == ["rwkv", "rwkv", "attn", "rwkv", "rwkv", "attn"]
    idx = torch.randint(1, 512, (2, 40))
    with torch.no_grad():  # zero-init attention blocks start as the identity
        torch.testing.assert_close(hybrid(idx), pure(idx), rtol=1e-5, atol=1e-5)
    copied = RWKVX.from_rwkv7(tmp_path / "rwkv7.pth", n_attn=2, chunk_size=8, topk=2, attn_init="copy")
    torch.testing.assert_close(copied.attn_blocks[0].att.key.weight, sd["blocks.1.att.key.weight"])
    torch.testing.assert_close(copied.attn_blocks[1].ffn.value.weight, sd["blocks.3.ffn.value.weight"])


def test_from_rwkv7_rejects_mismatched_config(tmp_path):
    torch.save(blinkdl_checkpoint(), tmp_path / "rwkv7.pth")
    with pytest.raises(ValueError, match="model.n_embd=256 but checkpoint has 128"):
        RWKVX.from_rwkv7(tmp_path / "rwkv7.pth", ModelConfig(vocab_size=512, n_embd=256, n_layer=3))


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_parallel_forward_equals_token_by_token_recurrence(backend):
    torch.manual_seed(0)
    model = RWKVX.from_rwkv7_state_dict(blinkdl_checkpoint(seed=3), wkv_backend=backend).eval()
    idx = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        parallel = model(idx)
        state, steps = None, []
        for t in range(idx.shape[1]):
            logits, state = model(idx[:, t : t + 1], state=state, return_state=True)
            steps.append(logits)
        # and a split continuation: 20 tokens, then 13 more from the returned state
        head, state2 = model(idx[:, :20], return_state=True)
        tail, _ = model(idx[:, 20:], state=state2, return_state=True)
    torch.testing.assert_close(torch.cat(steps, 1), parallel, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([head, tail], 1), parallel, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kw, layout",
    [
        (dict(n_layer=4, n_attn=1), ["rwkv"] * 4 + ["attn"]),
        (dict(n_layer=6, n_attn=2), ["rwkv"] * 3 + ["attn"] + ["rwkv"] * 3 + ["attn"]),
        (dict(n_layer=3, attn_positions=[0, 2]), ["attn", "rwkv", "attn", "rwkv", "rwkv"]),
    ],
)
def test_layout(kw, layout):
    assert ModelConfig(n_embd=64, **kw).layout() == layout


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(n_layer=10, n_attn=4), "model.n_layer=10 is not a multiple of model.n_attn=4"),
        (dict(n_layer=3, attn_positions=[0, 9]), "model.attn_positions"),
        (dict(n_layer=3, n_attn=1, attn_positions=[0, 2]), "model.n_attn=1 disagrees"),
        (dict(n_embd=100), "model.n_embd=100"),
        (dict(chunk_size=48), "model.chunk_size must be a power of two"),
        (dict(wkv_backend="cuda"), "model.wkv_backend"),
    ],
)
def test_impossible_layouts_are_errors(kw, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        ModelConfig(**{"n_embd": 64, **kw}).layout()


def test_document_offsets_split_rows_and_end_of_document_tokens():
    idx = torch.tensor([[5, 0, 7, 8], [0, 3, 3, 0]])
    assert document_offsets(idx).tolist() == [0, 2, 4, 5, 8]


def test_attention_block_does_not_leak_across_documents():
    """Changing an earlier document must not change a later document's sparse-attention output."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_embd=64, n_layer=1, attn_positions=[1], chunk_size=4, topk=2)
    attention = RWKVX(cfg).attn_blocks[0].att.eval()
    with torch.no_grad():
        attention.output.weight.normal_(0, 0.1)
        idx = torch.randint(1, 64, (1, 30))
        idx[0, 12] = 0  # document 1 = tokens 0..12, document 2 = 13..29
        x = torch.randn(1, 30, 64)
        y = x.clone()
        y[0, :13] = torch.randn(13, 64)
        cu = document_offsets(idx)
        out_x, out_y = attention(x, cu), attention(y, cu)
        mixed = attention(y, document_offsets(torch.randint(1, 64, (1, 30))))  # one document: the change shows
    torch.testing.assert_close(out_x[0, 13:], out_y[0, 13:])
    assert not torch.allclose(mixed[0, 13:], out_x[0, 13:])


def test_kernel_options_reach_the_kernels(monkeypatch):
    """`model.wkv_kernel` / `model.attn_kernel` are passed to every call of the Triton ops (spied here, run by the
    reference), and bad options stop model construction with the key named."""
    import rwkvx_kernels.sparse_attention as sparse_pkg
    import rwkvx_kernels.wkv7 as wkv7_pkg

    seen = {"wkv": [], "attn": []}

    def wkv7_spy(*args, config=None, **kw):
        seen["wkv"].append(config)
        return wkv7_pkg.wkv7(*args, backend="naive", config=config, **kw)

    def attn_spy(*args, config=None, **kw):
        seen["attn"].append(config)
        return sparse_pkg.sparse_attention(*args, backend="naive", config=config, **kw)

    import rwkvx_lightning.model as model_mod

    real_op = model_mod._triton_op
    monkeypatch.setattr(model_mod, "_triton_op",
                        lambda backend, x, module, name: (wkv7_spy if name == "wkv7" else attn_spy)
                        if backend == "triton" else real_op(backend, x, module, name))
    cfg = ModelConfig(vocab_size=64, n_embd=64, n_layer=2, n_attn=1, chunk_size=8, topk=2, wkv_backend="triton",
                      attn_backend="triton", wkv_kernel={"checkpoint_chunks": 1}, attn_kernel={"dkdv_stages": 2})
    model = RWKVX(cfg)
    model(torch.randint(0, 64, (1, 20))).sum().backward()
    assert seen["wkv"] == [{"checkpoint_chunks": 1}] * 2 and seen["attn"] == [{"dkdv_stages": 2}]
    with pytest.raises(ValueError, match="model.wkv_kernel: .*grad_bv.*48"):
        RWKVX(ModelConfig(vocab_size=64, n_embd=64, n_layer=2, wkv_kernel={"grad_bv": 48}))
    with pytest.raises(ValueError, match="model.attn_kernel: unknown .*tile"):
        RWKVX(ModelConfig(vocab_size=64, n_embd=64, n_layer=2, n_attn=1, attn_kernel={"tile": 64}))
