"""End-to-end training on CPU: resume equals the uninterrupted run, checkpoints survive a crash mid-save."""

import hashlib
import io
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from rwkvx_data.format import Manifest, ShardInfo, ShardSetError, encode_tokens, sha256_file, shard_name, write_manifest
from rwkvx_lightning.callbacks import AtomicCheckpointIO
from rwkvx_lightning.config import ConfigError, load_config, to_yaml
from rwkvx_lightning.train import train

VOCAB = 256


def make_shards(directory: Path, n_docs=120, seed=0) -> Path:
    """A small random-token shard set: 3 train shards and 1 val shard."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, VOCAB, size=rng.integers(5, 90)) for _ in range(n_docs)]
    directory.mkdir(parents=True)
    splits = {"train": [docs[i::3] for i in range(3)], "val": [docs[-8:]]}
    infos = []
    for split, groups in splits.items():
        for j, group in enumerate(groups):
            path = directory / shard_name(split, j)
            with tarfile.open(path, "w") as tar:
                for i, doc in enumerate(group):
                    data = encode_tokens(doc, VOCAB)
                    member = tarfile.TarInfo(f"{j:03d}{i:06d}.tokens.npy")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
            infos.append(ShardInfo(path.name, split, len(group), int(sum(len(d) for d in group)), sha256_file(path)))
    write_manifest(directory, Manifest("random", VOCAB, sum(s.documents for s in infos), sum(s.tokens for s in infos), infos))
    return directory


def tiny_config(run_dir, data_dir, **extra):
    overrides = {
        "run.dir": run_dir, "data.path": data_dir, "model.vocab_size": VOCAB, "model.n_embd": 64, "model.n_layer": 2,
        "model.n_attn": 1, "model.chunk_size": 8, "model.topk": 2, "data.ctx_len": 32, "data.batch_size": 2,
        "data.num_workers": 2, "data.val_batches": 2, "trainer.max_steps": 8, "trainer.val_check_interval": 4,
        "trainer.log_every_n_steps": 1, "checkpoint.every_n_steps": 4, "logging.progress_bar": False,
        "optim.warmup_tokens": 128, "trainer.accelerator": "cpu", **extra,
    }
    return load_config("demo", [f"{k}={v}" for k, v in overrides.items()])


class Recorder(L.Callback):
    """Remembers each step's loss and a hash of the batch it trained on."""

    def __init__(self, crash_at_step=None):
        self.losses, self.batches, self.crash_at_step = {}, {}, crash_at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[trainer.global_step + 1] = hashlib.sha1(batch.numpy().tobytes()).hexdigest()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        if trainer.global_step == self.crash_at_step:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data") / "shards")


def test_resumed_run_reproduces_uninterrupted_run(tmp_path, shards):
    straight = Recorder()
    train(tiny_config(tmp_path / "a", shards), [straight])
    assert sorted(straight.losses) == list(range(1, 9))

    crashed = Recorder(crash_at_step=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(tmp_path / "b", shards), [crashed])
    assert (tmp_path / "b/checkpoints/last.ckpt").is_file()  # written at step 4

    resumed = Recorder()
    train(tiny_config(tmp_path / "b", shards), [resumed])  # same command again: continues from step 4
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert resumed.batches[step] == straight.batches[step], f"step {step} trained on other data"
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=1e-6, abs=1e-6)
    # every batch of the uninterrupted run was seen exactly once across the crash and the resume
    seen = [crashed.batches[s] for s in range(1, 5)] + [resumed.batches[s] for s in range(5, 9)]
    assert seen == [straight.batches[s] for s in range(1, 9)]

    events = list((tmp_path / "a/tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0])).Reload().Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/tokens_per_sec", "train/tokens_seen", "train/grad_norm", "val/loss"):
        assert tag in tags
    assert (tmp_path / "a/config.yaml").read_text().count("max_steps: 8") == 1


def test_run_dir_with_another_runs_config_is_refused(tmp_path, shards):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.yaml").write_text(to_yaml(tiny_config(tmp_path / "run", shards, **{"model.n_embd": 128})))
    with pytest.raises(ConfigError, match="incompatible config.*model.n_embd: 128 -> 64"):
        train(tiny_config(tmp_path / "run", shards))


def test_missing_data_directory_stops_before_work(tmp_path):
    with pytest.raises(ShardSetError, match="does not exist"):
        train(tiny_config(tmp_path / "run", tmp_path / "nowhere"))
    assert not (tmp_path / "run").exists()


def test_vocab_larger_than_model_is_a_config_error(tmp_path, shards):
    with pytest.raises(ConfigError, match="model.vocab_size=100 is smaller"):
        train(tiny_config(tmp_path / "run", shards, **{"model.vocab_size": 100}))


KILLED_SAVE = """
import os, sys, torch
from rwkvx_lightning.callbacks import AtomicCheckpointIO
path = sys.argv[1]
AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.randn(10)}, path)
def dying_save(obj, f, *a, **k):
    f.write(b"partial bytes")
    f.flush()
    os._exit(9)  # the process dies mid-write: no cleanup code runs
torch.save = dying_save
AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.randn(10)}, path)
"""


def test_checkpoint_killed_mid_save_leaves_previous_usable(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "last.ckpt"
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint is intact
    assert len(list(tmp_path.glob(".last.ckpt.tmp-*"))) == 1  # the killed write's leftover
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the next save cleaned up


def test_trainer_saves_through_the_atomic_writer(tmp_path, shards):
    trainer = train(tiny_config(tmp_path / "run", shards, **{"trainer.max_steps": 1}))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_schedule_length_is_fixed_at_first_start(tmp_path, shards):
    """Extending a run (larger trainer.max_steps) must not move its cosine schedule."""
    from rwkvx_lightning.train import prepare_run_dir

    first = tiny_config(tmp_path / "run", shards)
    prepare_run_dir(first, tokens_per_step=64)
    assert first.optim.decay_tokens == 8 * 64
    extended = tiny_config(tmp_path / "run", shards, **{"trainer.max_steps": 20})
    prepare_run_dir(extended, tokens_per_step=64)
    assert extended.optim.decay_tokens == 8 * 64
    assert "decay_tokens: 512" in (tmp_path / "run/config.yaml").read_text()


def test_only_rank_zero_writes_the_run_config(tmp_path, shards, monkeypatch):
    from rwkvx_lightning.train import prepare_run_dir

    monkeypatch.setenv("RANK", "1")
    prepare_run_dir(tiny_config(tmp_path / "run", shards), tokens_per_step=64)
    assert not (tmp_path / "run/config.yaml").exists()
    monkeypatch.setenv("RANK", "0")
    prepare_run_dir(tiny_config(tmp_path / "run", shards), tokens_per_step=64)
    assert (tmp_path / "run/config.yaml").exists()
