"""The shard loader: packing, splitting across ranks/workers, exact resume, validation, errors.

Every test document starts with a unique id token d + 1 < ID_LIMIT and continues with tokens
>= ID_LIMIT, so the documents in any window can be identified without decoding anything else.
"""

import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rwkvx_data.format import (
    EOD_TOKEN,
    TOKENS_EXT,
    Manifest,
    ShardInfo,
    ShardSetError,
    encode_tokens,
    sha256_file,
    shard_name,
    write_manifest,
)
from rwkvx_lightning.data import DataConfig, ShardDataModule, ShardWindowDataset, manifest_shards

VOCAB = 65536
ID_LIMIT = 32768


def make_set(root: Path, train_shards: int, docs_per_shard: int, val_docs: int, seed: int = 0) -> dict:
    """Write a shard set; return {shard file name: [document token arrays]}."""
    rng = np.random.default_rng(seed)
    splits = [("train", i, docs_per_shard) for i in range(train_shards)]
    splits += [("val", 0, val_docs)] if val_docs else []
    docs, infos, next_id = {}, [], 0
    for split, index, count in splits:
        name = shard_name(split, index)
        docs[name] = []
        with tarfile.open(root / name, "w") as tar:
            for _ in range(count):
                body = rng.integers(ID_LIMIT, VOCAB, size=rng.integers(0, 300))
                doc = np.concatenate([[next_id + 1], body]).astype(np.int64)
                data = encode_tokens(doc, VOCAB)
                member = tarfile.TarInfo(f"{next_id:09d}.{TOKENS_EXT}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
                docs[name].append(doc)
                next_id += 1
        tokens = sum(len(d) for d in docs[name])
        infos.append(ShardInfo(name, split, count, tokens, sha256_file(root / name)))
    total = sum(i.tokens for i in infos)
    write_manifest(root, Manifest("test", VOCAB, next_id, total, infos))
    return docs


def doc_ids(tokens) -> list[int]:
    t = np.asarray(tokens)
    return list(t[(t > 0) & (t < ID_LIMIT)] - 1)


def unpack(windows: torch.Tensor) -> np.ndarray:
    """The token stream that [n, ctx+1] consecutive windows cover."""
    ctx = windows.shape[1] - 1
    return np.concatenate([windows[:, :ctx].reshape(-1).numpy(), windows[-1, ctx:].numpy()])


def first_windows(ds, n):
    return torch.stack([w for _, w in zip(range(n), ds)])


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    return root, make_set(root, train_shards=6, docs_per_shard=8, val_docs=40)


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    root = tmp_path_factory.mktemp("few")
    return root, make_set(root, train_shards=1, docs_per_shard=16, val_docs=8, seed=1)


def test_packing_concatenates_documents_in_epoch_order(many):
    root, docs = many
    ds = ShardWindowDataset(manifest_shards(root, "train"), ctx_len=16, seed=3)
    orders = [ds.epoch_order(e) for e in range(2)]
    assert sorted(s.url for s in orders[0]) == sorted(s.url for s in ds.shards)
    expected = np.concatenate(
        [np.append(d, EOD_TOKEN) for order in orders for s in order for d in docs[Path(s.url).name]]
    )
    n = (len(expected) - 1) // 16  # two full epochs: the packing runs on across the boundary
    windows = first_windows(ds, n)
    assert windows.dtype == torch.long and windows.shape == (n, 17)
    assert torch.equal(windows[1:, 0], windows[:-1, -1])
    np.testing.assert_array_equal(unpack(windows), expected[: n * 16 + 1])


@pytest.mark.parametrize("corpus", ["many", "few"])
def test_streams_split_documents_without_overlap(corpus, request):
    root, docs = request.getfixturevalue(corpus)
    shards = manifest_shards(root, "train")
    seen, streams = Counter(), 0
    for rank in range(2):
        ds = ShardWindowDataset(shards, ctx_len=1, seed=5, rank=rank, world_size=2, infinite=False)
        # One huge batch per worker = that worker's whole stream (ctx_len=1 loses no tail tokens).
        for stream in DataLoader(ds, batch_size=10**6, num_workers=2):
            tokens = unpack(stream)
            assert tokens[-1] == EOD_TOKEN
            seen.update(doc_ids(tokens))
            streams += 1
    train_ids = {int(d[0]) - 1 for name, ds_ in docs.items() if name.startswith("train") for d in ds_}
    assert streams == 4
    assert set(seen) == train_ids and set(seen.values()) == {1}


def test_stream_is_a_function_of_the_seed(many):
    shards = manifest_shards(many[0], "train")
    a, b, c = (first_windows(ShardWindowDataset(shards, 32, seed=s), 200) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    orders = [ShardWindowDataset(shards, 32, seed=s).epoch_order(0) for s in (7, 8)]
    assert orders[0] != orders[1]


def datamodule(root, **kw) -> ShardDataModule:
    defaults = dict(ctx_len=64, batch_size=4, num_workers=2)
    dm = ShardDataModule(DataConfig(path=str(root), **(defaults | kw)), seed=11)
    dm.setup()
    return dm


def take(dm: ShardDataModule, n: int) -> list[torch.Tensor]:
    """n batches from a fresh train iterator, each reported consumed like training_step does."""
    out = []
    for batch, _ in zip(dm.train_dataloader(), range(n)):
        out.append(batch)
        dm.on_batch_consumed()
    return out


@pytest.mark.parametrize("corpus,workers", [("many", 2), ("few", 2), ("many", 0)])
def test_resume_continues_exactly(corpus, workers, request):
    root = request.getfixturevalue(corpus)[0]
    reference = take(datamodule(root, num_workers=workers), 70)  # ~28 batches per epoch of "many"
    # n odd (not a multiple of the workers); 5 resumes inside epoch 0, 37 after skipping whole shards.
    for n, m in [(5, 35), (37, 33)]:
        first = datamodule(root, num_workers=workers)
        assert all(torch.equal(a, b) for a, b in zip(take(first, n), reference))
        resumed = datamodule(root, num_workers=workers)
        resumed.load_state_dict(first.state_dict())
        assert resumed.state_dict()["batches_consumed"] == n
        after = take(resumed, m)
        assert all(torch.equal(a, b) for a, b in zip(after, reference[n : n + m], strict=True))


def test_resume_refuses_a_changed_stream(many):
    state = datamodule(many[0], num_workers=0).state_dict()
    with pytest.raises(ValueError, match="ctx_len was 64 .* now 32"):
        datamodule(many[0], ctx_len=32).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        datamodule(many[0], num_workers=2).load_state_dict(state)
    datamodule(many[0], num_workers=1).load_state_dict(state)  # 0 and 1 worker: the same stream


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        self.trainer.datamodule.on_batch_consumed()
        return self.w * batch.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(root, max_steps, ckpt_path=None):
    model = Recorder()
    # limit_train_batches=5 makes Lightning restart the loader iterator every 5 steps.
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, limit_train_batches=5, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule(root), ckpt_path=ckpt_path)
    return trainer, model.seen


@pytest.mark.filterwarnings("ignore")
def test_lightning_checkpoint_resumes_the_stream(many, tmp_path):
    reference = take(datamodule(many[0]), 15)
    _, uninterrupted = fit(many[0], 15)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, reference, strict=True))
    trainer, first = fit(many[0], 7)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    _, rest = fit(many[0], 15, ckpt_path=tmp_path / "a.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(first + rest, reference, strict=True))


def test_validation_is_fixed_held_out_and_split_by_rank(many):
    root, docs = many
    dm = datamodule(root, ctx_len=16, val_batches=5)
    once, twice = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(once) == 5 and all(torch.equal(a, b) for a, b in zip(once, twice, strict=True))
    val_ids = {int(d[0]) - 1 for d in docs["val-000000.tar"]}
    assert set(doc_ids(torch.cat(once))) <= val_ids
    shards = manifest_shards(root, "val")
    per_rank = [
        set(doc_ids(unpack(first_windows(ShardWindowDataset(shards, 1, rank=r, world_size=2, infinite=False), 10**6))))
        for r in range(2)
    ]
    assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == val_ids


def test_errors_name_the_culprit(many, few, tmp_path):
    with pytest.raises(ShardSetError, match="nowhere"):
        datamodule(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="ctx_len"):
        datamodule(many[0], ctx_len=0)
    with pytest.raises(ValueError, match="batch_size"):
        datamodule(many[0], batch_size=0)

    with pytest.raises(ShardSetError, match="16 documents cannot feed 20 data streams"):
        next(iter(ShardWindowDataset(manifest_shards(few[0], "train"), 64, rank=19, world_size=20)))

    bare = tmp_path / "noval"
    bare.mkdir()
    make_set(bare, train_shards=1, docs_per_shard=3, val_docs=0)
    with pytest.raises(ShardSetError, match="validation fraction"):
        datamodule(bare).val_dataloader()

    broken = tmp_path / "broken"
    shutil.copytree(many[0], broken)
    flipped = broken / "train-000002.tar"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(ShardSetError, match="train-000002.tar.*sha256"):
        list(ShardWindowDataset(manifest_shards(broken, "train"), 64, infinite=False))

    truncated = broken / "train-000001.tar"
    whole = truncated.read_bytes()
    shards = [s for s in manifest_shards(broken, "train") if s.url == str(truncated)]
    # Cut inside the first member's data (tar error), then at a member boundary (too few documents).
    for cut, why in [(600, "unreadable"), (2048, "holds 2 documents")]:
        truncated.write_bytes(whole[:cut])
        with pytest.raises(ShardSetError, match=f"train-000001.tar.*{why}"):
            list(ShardWindowDataset(shards, 64, infinite=False, verify_checksums=False))


def test_resume_skips_whole_shards_unopened(many, monkeypatch):
    shards = manifest_shards(many[0], "train")
    expected = first_windows(ShardWindowDataset(shards, 64, batch_size=4), 801)[-1]
    resumed = ShardWindowDataset(shards, 64, batch_size=4, start_batch=200)  # ~3.5 epochs in
    opened = []
    read = resumed._read
    monkeypatch.setattr(resumed, "_read", lambda shard: opened.append(shard) or read(shard))
    assert torch.equal(next(iter(resumed)), expected)
    assert len(opened) == 1


def test_url_pattern_reads_without_a_manifest(many):
    root = many[0]
    cfg = DataConfig(urls=f"pipe:cat {root}/train-{{000000..000005}}.tar", ctx_len=64, batch_size=4, num_workers=0)
    by_url = ShardDataModule(cfg, seed=11)
    by_url.setup()
    reference = take(datamodule(root, num_workers=0), 40)
    assert all(torch.equal(a, b) for a, b in zip(take(by_url, 7), reference))
    resumed = ShardDataModule(cfg, seed=11)
    resumed.setup()
    resumed.load_state_dict(by_url.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 33), reference[7:], strict=True))
