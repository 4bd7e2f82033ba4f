"""Training and validation data: documents from a shard set packed into fixed windows, resumable exactly.

Stream model. Documents are concatenated, each followed by `EOD_TOKEN`, and cut into windows of
`ctx_len + 1` tokens with stride `ctx_len`: window j is tokens [j*ctx, j*ctx + ctx + 1) of the stream,
so neighbouring windows share one token and no token is a target twice. The training stream is
infinite: epoch e reads every train shard in an order shuffled by (seed, e), then epoch e+1 follows
with the packing simply continuing.

Splitting. There are S = world_size * W streams (W = dataloader workers, at least 1); stream
s = rank * W + worker. With >= S shards stream s reads whole shards order[s::S]; with fewer shards
every stream reads them all and keeps the documents whose index i in the epoch order has i % S == s.
Either way each document goes to exactly one stream per epoch.

Resume. The datamodule counts consumed micro-batches: the LightningModule calls
`ShardDataModule.on_batch_consumed()` once per `training_step` (prefetched batches are not counted).
A DataLoader over an IterableDataset with W infinite workers takes batch i from worker i % W, so
after n batches logical worker w has delivered ceil((n - w) / W) batches of `batch_size` windows; on
resume it drops that many windows' worth of tokens (windows * ctx_len) from its stream before
yielding. A new iterator starts at worker 0, so worker process k plays logical worker (k + n) % W. Whole
shards are dropped by their manifest token counts (tokens + one EOD per document) without being
opened; documents inside the first partly consumed shard, and the few-shards case, are counted by
reading token arrays (document lengths are cached per worker), never by packing windows.
"""

from __future__ import annotations

import itertools
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tar_file_iterator

from rwkvx_data.format import (
    EOD_TOKEN,
    TOKENS_EXT,
    ShardSetError,
    decode_tokens,
    read_manifest,
    sha256_file,
)


@dataclass
class DataConfig:
    path: str = "data/stdlib"  # local shard set directory (manifest.json + tars)
    urls: Optional[str] = None  # webdataset URL / brace pattern of remote train shards; replaces `path`
    val_urls: Optional[str] = None  # same for the val shards when `urls` is used
    ctx_len: int = 512
    batch_size: int = 8  # per-device micro-batch
    num_workers: int = 1
    val_batches: int = 8  # per rank, the same windows on every validation run
    verify_checksums: bool = True  # sha256 of each local shard against the manifest on first open
    shuffle_shards: bool = True


@dataclass(frozen=True)
class Shard:
    """One tar shard; counts and sha256 come from the manifest and are None for bare URLs."""

    url: str
    documents: Optional[int] = None
    tokens: Optional[int] = None
    sha256: Optional[str] = None


def manifest_shards(path: str | Path, split: str) -> list[Shard]:
    """The shards of one split of a local shard set (ShardSetError if it is not one)."""
    manifest = read_manifest(path)
    return [Shard(str(Path(path) / s.name), s.documents, s.tokens, s.sha256) for s in manifest.split(split)]


def url_shards(urls: str) -> list[Shard]:
    """Shards named by a webdataset URL pattern; without a manifest there are no counts or checksums."""
    return [Shard(u) for u in wds.shardlists.expand_urls(urls)]


def _check_positive(**fields: int) -> None:
    for name, value in fields.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _windows(chunks: Iterator[np.ndarray], ctx_len: int) -> Iterator[torch.Tensor]:
    """Cut a token stream into [ctx_len + 1] windows with stride ctx_len."""
    buf = np.empty(0, np.int64)
    for chunk in chunks:
        buf = np.concatenate([buf, chunk])
        n = (len(buf) - 1) // ctx_len
        for j in range(n):
            yield torch.from_numpy(buf[j * ctx_len : (j + 1) * ctx_len + 1].copy())
        buf = buf[n * ctx_len :]


class ShardWindowDataset(IterableDataset):
    """Windows of one stream per (rank, worker), a pure function of (seed, epoch, stream id).

    `start_batch` is the number of batches the consumer already took from the whole DataLoader;
    each worker skips its share of them (see the module docstring). `infinite=False` reads one
    unshuffled pass (validation); `max_windows` caps what each stream yields.
    """

    def __init__(
        self,
        shards: list[Shard],
        ctx_len: int,
        batch_size: int = 1,
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        infinite: bool = True,
        start_batch: int = 0,
        max_windows: Optional[int] = None,
        verify_checksums: bool = True,
    ):
        _check_positive(ctx_len=ctx_len, batch_size=batch_size)
        if not shards:
            raise ShardSetError("no shards to read")
        self.shards, self.ctx_len, self.batch_size, self.seed = shards, ctx_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.infinite, self.max_windows = shuffle, infinite, max_windows
        self.start_batch, self.verify_checksums = start_batch, verify_checksums
        self._verified: set[str] = set()
        self._lengths: dict[str, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> list[Shard]:
        if not self.shuffle:
            return list(self.shards)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def _stream(self) -> tuple[int, int, int, int]:
        """(stream id, stream count, logical worker, worker count) of the calling process.

        A fresh iterator takes its first batch from worker 0, but the next batch of the whole run is
        due from worker start_batch % W, so worker roles rotate by start_batch.
        """
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = self.rank, self.world_size
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker + self.start_batch) % workers
        return rank * workers + worker, world * workers, worker, workers

    def __iter__(self) -> Iterator[torch.Tensor]:
        s, n_streams, worker, workers = self._stream()
        if len(self.shards) < n_streams and (docs := sum(map(self._doc_count, self.shards))) <= s:
            raise ShardSetError(
                f"{docs} documents cannot feed {n_streams} data streams (world_size x num_workers): "
                "use fewer dataloader workers or more data"
            )
        delivered = max(0, (self.start_batch - worker + workers - 1) // workers)  # ceil((n - w) / W)
        chunks = self._documents(s, n_streams, skip=delivered * self.batch_size * self.ctx_len)
        return itertools.islice(_windows(chunks, self.ctx_len), self.max_windows)

    def _documents(self, s: int, n_streams: int, skip: int) -> Iterator[np.ndarray]:
        """Stream s as document+EOD token arrays, without its first `skip` tokens."""
        for epoch in itertools.count() if self.infinite else range(1):
            order = self.epoch_order(epoch)
            whole = len(order) >= n_streams
            first = 0  # epoch index of the current shard's first document (few-shards case)
            for shard in order[s::n_streams] if whole else order:
                pick = slice(None) if whole else slice((s - first) % n_streams, None, n_streams)
                if skip and skip >= (size := self._tokens_taken(shard, pick)):
                    skip -= size
                else:
                    for doc in itertools.islice(self._read(shard), pick.start, None, pick.step):
                        chunk = np.append(doc.astype(np.int64), EOD_TOKEN)
                        if skip:
                            drop = min(skip, len(chunk))
                            chunk, skip = chunk[drop:], skip - drop
                        if len(chunk):
                            yield chunk
                if not whole:
                    first += self._doc_count(shard)

    def _tokens_taken(self, shard: Shard, pick: slice) -> int:
        """Tokens (EODs included) this stream takes from a shard, from the manifest when it can."""
        if pick == slice(None) and shard.tokens is not None:
            return shard.tokens + shard.documents
        lengths = self._doc_lengths(shard)[pick]
        return int(lengths.sum()) + len(lengths)

    def _doc_count(self, shard: Shard) -> int:
        return shard.documents if shard.documents is not None else len(self._doc_lengths(shard))

    def _doc_lengths(self, shard: Shard) -> np.ndarray:
        if shard.url not in self._lengths:
            self._lengths[shard.url] = np.array([len(d) for d in self._read(shard)], np.int64)
        return self._lengths[shard.url]

    def _read(self, shard: Shard) -> Iterator[np.ndarray]:
        """A shard's documents in tar order; any defect becomes a ShardSetError naming the shard."""
        n = 0
        try:
            if self.verify_checksums and shard.sha256 and shard.url not in self._verified:
                if sha256_file(shard.url) != shard.sha256:
                    raise ShardSetError(
                        f"shard {shard.url}: sha256 differs from the manifest (corrupt or modified); "
                        "rebuild the shard set"
                    )
                self._verified.add(shard.url)
            stream = wds.gopen(shard.url)
            try:
                for member in tar_file_iterator(stream):
                    if member["fname"].endswith("." + TOKENS_EXT):
                        n += 1
                        yield decode_tokens(member["data"])
            finally:
                stream.close()
        except ShardSetError:
            raise
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise ShardSetError(f"shard {shard.url} is unreadable: {e}") from e
        if shard.documents is not None and n != shard.documents:
            raise ShardSetError(f"shard {shard.url} holds {n} documents, the manifest says {shard.documents}")


# The config keys behind each value a checkpoint's data position depends on.
CONFIG_KEYS = {"seed": "seed", "ctx_len": "data.ctx_len", "batch_size": "data.batch_size",
               "num_workers": "data.num_workers", "world_size": "trainer.devices x trainer.num_nodes"}


class ShardDataModule(L.LightningDataModule):
    """Train/val loaders over a shard set; its state is the number of consumed training batches.

    Call `on_batch_consumed()` once per training_step. Lightning stores `state_dict()` in checkpoints
    and calls `load_state_dict()` before building loaders, so a resumed run continues the stream exactly.
    Rank and world size come from the attached Trainer (else rank 0 of 1).
    """

    def __init__(self, cfg: DataConfig, seed: int):
        super().__init__()
        _check_positive(ctx_len=cfg.ctx_len, batch_size=cfg.batch_size)
        self.cfg, self.seed = cfg, seed
        self.batches_consumed = 0
        self._train_shards: list[Shard] = []
        self._val_shards: list[Shard] = []
        self._train_set: Optional[ShardWindowDataset] = None

    @property
    def tokens_per_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.ctx_len

    @property
    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def setup(self, stage: Optional[str] = None) -> None:
        cfg = self.cfg
        if cfg.urls:
            self._train_shards = url_shards(cfg.urls)
            self._val_shards = url_shards(cfg.val_urls) if cfg.val_urls else []
        else:
            self._train_shards = manifest_shards(cfg.path, "train")
            self._val_shards = manifest_shards(cfg.path, "val")
        if not self._train_shards:
            raise ShardSetError(f"no train shards in {cfg.urls or cfg.path!r}")

    def _dataset(self, shards: list[Shard], **kw) -> ShardWindowDataset:
        rank, world = self._rank_world
        return ShardWindowDataset(
            shards, self.cfg.ctx_len, self.cfg.batch_size, rank=rank, world_size=world,
            verify_checksums=self.cfg.verify_checksums, **kw,
        )

    def train_dataloader(self) -> DataLoader:
        # Not persistent: each new iterator (Lightning restarts it every epoch) re-pickles the dataset
        # with the current start_batch, so it continues where consumption stopped.
        self._train_set = self._dataset(
            self._train_shards, seed=self.seed, shuffle=self.cfg.shuffle_shards, start_batch=self.batches_consumed
        )
        return DataLoader(
            self._train_set, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        if not self._val_shards:
            where = self.cfg.val_urls or self.cfg.path
            raise ShardSetError(
                f"no val shards in {where!r}: rebuild the shard set with a validation fraction > 0"
                + (" or set val_urls" if self.cfg.urls else "")
            )
        val = self._dataset(
            self._val_shards, shuffle=False, infinite=False,
            max_windows=self.cfg.val_batches * self.cfg.batch_size,
        )
        return DataLoader(val, batch_size=self.cfg.batch_size, num_workers=0)

    def on_batch_consumed(self) -> None:
        """Count one consumed micro-batch; the live dataset follows so a restarted iterator resumes here."""
        self.batches_consumed += 1
        if self._train_set is not None:
            self._train_set.start_batch = self.batches_consumed

    def state_dict(self) -> dict:
        return {
            "batches_consumed": self.batches_consumed,
            "seed": self.seed,
            "ctx_len": self.cfg.ctx_len,
            "batch_size": self.cfg.batch_size,
            "num_workers": self.cfg.num_workers,
            "world_size": self._rank_world[1],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the stream position; refuse if the stream would no longer continue exactly."""
        now = self.state_dict()
        for key in ("seed", "ctx_len", "batch_size", "world_size", "num_workers"):
            old, new = state[key], now[key]
            if key == "num_workers":  # 0 and 1 workers give the same single stream per rank
                old, new = max(1, old), max(1, new)
            if old != new:
                raise ValueError(
                    f"cannot resume the data stream: {key} was {state[key]} in the checkpoint, now {now[key]}; "
                    f"set {CONFIG_KEYS[key]}={state[key]} to resume exactly"
                )
        self.batches_consumed = state["batches_consumed"]
        if self._train_set is not None:
            self._train_set.start_batch = self.batches_consumed
