"""The on-disk contract between the shard builder (`rwkvx data build`) and the training loader.

A shard set is a directory holding webdataset tar shards and one `manifest.json`:

    DIR/manifest.json
    DIR/train-000000.tar, DIR/train-000001.tar, ...
    DIR/val-000000.tar, ...

Each tar member pair is one *document* (never a fixed window, so one shard set serves any context
length): `<key>.tokens.npy` is a 1-D little-endian uint16 (vocab <= 65536) or uint32 numpy array of
token ids *without* the end-of-document token; the loader appends `EOD_TOKEN` (0) after every
document when it packs windows. `<key>` is the document's global index, zero padded.

The manifest records how the set was made and what is in it, so a reader can check a shard before
trusting it (sha256) and can skip whole shards by token count when resuming.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = "rwkvx-shards/1"
MANIFEST_NAME = "manifest.json"
TOKENS_EXT = "tokens.npy"
EOD_TOKEN = 0
SPLITS = ("train", "val")


class ShardSetError(ValueError):
    """A shard set that is missing, empty, inconsistent or corrupt; the message names the culprit."""


@dataclass
class ShardInfo:
    name: str  # file name relative to the shard set directory, e.g. "train-000000.tar"
    split: str  # "train" or "val"
    documents: int
    tokens: int  # tokens stored, excluding the end-of-document tokens the loader adds
    sha256: str


@dataclass
class Manifest:
    tokenizer: str
    vocab_size: int
    documents: int
    tokens: int
    shards: list[ShardInfo] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    format: str = FORMAT_VERSION

    def split(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        return cls(**d)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def encode_tokens(tokens, vocab_size: int) -> bytes:
    """Serialise one document's token ids as .npy bytes."""
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"token id out of range [0, {vocab_size}): min {arr.min()}, max {arr.max()}")
    buf = io.BytesIO()
    np.save(buf, arr.astype(token_dtype(vocab_size)), allow_pickle=False)
    return buf.getvalue()


def decode_tokens(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> None:
    """Write atomically: a crash leaves the old manifest or the new one, never half of one."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and sanity-check a local shard set's manifest; errors name the directory or shard."""
    d = Path(directory)
    if not d.exists():
        raise ShardSetError(f"data directory {str(d)!r} does not exist (build one with `rwkvx data build`)")
    path = d / MANIFEST_NAME
    if not path.is_file():
        raise ShardSetError(f"no {MANIFEST_NAME} in {str(d)!r}: not a shard set (build one with `rwkvx data build`)")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ShardSetError(f"{path} is not a valid manifest: {e}") from e
    if manifest.format != FORMAT_VERSION:
        raise ShardSetError(f"{path}: format {manifest.format!r}, expected {FORMAT_VERSION!r}")
    if manifest.documents == 0 or manifest.tokens == 0:
        raise ShardSetError(f"shard set {str(d)!r} is empty (0 documents or 0 tokens)")
    return manifest
