"""Build a shard set (see `format.py`) from text files, source trees and JSONL: `rwkvx data build`.

The output depends only on the inputs, `val_fraction` and `seed`, never on `workers` or timing:
documents are numbered in input order (directories walked in sorted order), tokenised on a process
pool whose results are consumed in submission order, and written into tars with fixed metadata.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from rwkvx_lightning.tokenizer import Tokenizer

from .format import (
    MANIFEST_NAME,
    SPLITS,
    TOKENS_EXT,
    Manifest,
    ShardInfo,
    ShardSetError,
    encode_tokens,
    sha256_file,
    shard_name,
    write_manifest,
)

log = logging.getLogger(__name__)

DEFAULT_PATTERNS = ("*.txt", "*.md", "*.py", "*.rst", "*.jsonl", "*.json")
DEFAULT_SHARD_TOKENS = 50_000_000
# Directories a walk never enters: caches, VCS/virtualenv folders, and installed third-party code.
SKIPPED_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})
# Source bytes per pool task: large enough to amortise pickling, small enough to keep workers busy.
BATCH_BYTES = 1 << 19
STAGING_PREFIX = ".building-"
SHARD_FILE = re.compile(r"(train|val)-\d{6,}\.tar")


class CorpusError(ShardSetError):
    """An input that cannot be read as documents; the message names the path (and line)."""


def default_corpus_paths() -> list[str]:
    """The running interpreter's standard library: a corpus of real code that needs no download
    (walked for *.py only; `site-packages` and `__pycache__` are skipped by every walk)."""
    return [sysconfig.get_paths()["stdlib"]]


def build_default_corpus(out_dir, **kwargs) -> Manifest:
    """Shard the standard library's Python sources (see `default_corpus_paths`)."""
    return build_shards(default_corpus_paths(), out_dir, patterns=("*.py",), **kwargs)


def build_shards(
    inputs: list[str],
    out_dir,
    *,
    val_fraction: float = 0.005,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    patterns: Iterable[str] = DEFAULT_PATTERNS,
) -> Manifest:
    """Tokenise `inputs` into a shard set in `out_dir` and return its manifest.

    Each input is a file or a directory (walked recursively for files matching `patterns`). A
    `.jsonl` file holds one document per line in its "text" field; any other file is one document.
    Whitespace-only documents are skipped. Bytes that are not UTF-8 become U+FFFD, with a warning
    naming the files. A seeded hash of each document's index sends about `val_fraction` of them to
    the val split (at least one when there are two or more documents).

    Shards are staged in a hidden directory inside `out_dir` and moved into place when all are
    written, manifest last: an interrupted build leaves no manifest. An `out_dir` that is not empty
    is refused unless `overwrite`, which replaces the shard set there and leaves other files alone.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    workers = workers or os.cpu_count() or 1
    patterns = tuple(patterns)
    files = find_input_files(inputs, patterns)
    if not files:
        raise ShardSetError(f"empty corpus: no files matching {','.join(patterns)} in {', '.join(map(str, inputs))}")
    out = _prepare_output_dir(Path(out_dir), overwrite)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        shards = _write_shards(files, staging, val_fraction, shard_tokens, workers, seed, progress)
        manifest = Manifest(
            tokenizer=Tokenizer.name,
            vocab_size=Tokenizer.vocab_size,
            documents=sum(s.documents for s in shards),
            tokens=sum(s.tokens for s in shards),
            shards=shards,
            sources=[os.path.abspath(p) for p in inputs],
        )
        if manifest.documents == 0:
            raise ShardSetError(f"empty corpus: every document in {', '.join(map(str, inputs))} is empty")
        _publish(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def find_input_files(inputs: Iterable[str], patterns: Iterable[str] = DEFAULT_PATTERNS) -> list[Path]:
    """Files in input order; a named file is taken whatever its extension, a directory contributes
    its matching files in sorted path order (hidden and `SKIPPED_DIRS` directories are not entered)."""
    patterns = tuple(patterns)
    files = []
    for given in inputs:
        path = Path(given)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(_walk(path, patterns))
        else:
            raise CorpusError(f"input path {str(given)!r} does not exist")
    return files


def _walk(directory: Path, patterns: tuple[str, ...]) -> Iterator[Path]:
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        for name in sorted(names):
            if any(fnmatch.fnmatch(name, p) for p in patterns):
                yield Path(root) / name


def read_documents(files: Iterable[Path], undecodable: list[Path]) -> Iterator[tuple[str, int]]:
    """(text, source bytes) per document; appends files that were not valid UTF-8 to `undecodable`."""
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path)
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            undecodable.append(path)
        yield text, len(raw)


def _jsonl_documents(path: Path) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield "", len(line)
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # bad JSON or bad UTF-8
                raise CorpusError(f"{path}:{lineno}: not a JSON object ({getattr(e, 'msg', e)})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CorpusError(f'{path}:{lineno}: no string "text" field')
            yield record["text"], len(line)


def _batches(documents: Iterable[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    """Group non-empty documents into pool tasks of about BATCH_BYTES; the byte count carries the
    skipped documents too, so progress reaches the input size."""
    texts, nbytes = [], 0
    for text, size in documents:
        nbytes += size
        if text.strip():
            texts.append(text)
        if nbytes >= BATCH_BYTES:
            yield texts, nbytes
            texts, nbytes = [], 0
    if texts or nbytes:
        yield texts, nbytes


_tokenizer: Tokenizer | None = None


def _process_tokenizer() -> Tokenizer:
    """One tokenizer per process (its Rust tables take ~230 MB); forked workers share the parent's."""
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = Tokenizer()
    return _tokenizer


def _encode_batch(batch: tuple[list[str], int]) -> tuple[list[tuple[int, bytes]], int]:
    """(token count, .npy bytes) per document. Runs in pool workers, one document at a time: the
    processes are the parallelism, and `encode_batch`'s thread pool does not survive fork."""
    tokenizer = _process_tokenizer()
    texts, nbytes = batch
    encoded = []
    for text in texts:
        ids = tokenizer.encode(text)
        encoded.append((len(ids), encode_tokens(ids, Tokenizer.vocab_size)))
    return encoded, nbytes


@contextlib.contextmanager
def _ordered_map(workers: int):
    """A `map(fn, items)` on `workers` processes that yields results in input order and keeps at
    most 2 * workers tasks in flight, so reading never runs far ahead of tokenising."""
    _process_tokenizer()
    if workers == 1:
        yield map
        return
    # Fork (where it is safe) so workers inherit the loaded tokenizer instead of each loading one.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    with context.Pool(workers) as pool:

        def ordered(fn, items):
            pending = deque()
            for item in items:
                pending.append(pool.apply_async(fn, (item,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

        yield ordered


def _write_shards(files, staging, val_fraction, shard_tokens, workers, seed, progress) -> list[ShardInfo]:
    undecodable: list[Path] = []
    batches = _batches(read_documents(files, undecodable))
    router = _SplitRouter({s: _ShardWriter(staging, s, shard_tokens) for s in SPLITS}, val_fraction, seed)
    total_bytes = sum(f.stat().st_size for f in files)
    start = time.perf_counter()
    # The pool is started before tqdm starts its monitor thread: fork and threads do not mix.
    with _ordered_map(workers) as ordered_map, tqdm(
        total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenising", disable=not progress
    ) as bar:
        for encoded, nbytes in ordered_map(_encode_batch, batches):
            for ntokens, npy in encoded:
                router.add(ntokens, npy)
            bar.update(nbytes)
            rate = router.tokens / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{router.tokens:,} tokens, {rate / 1e6:.2f}M tokens/s", refresh=False)
    if undecodable:
        shown = ", ".join(map(str, undecodable[:5])) + (f" and {len(undecodable) - 5} more" if len(undecodable) > 5 else "")
        log.warning("%d file(s) not valid UTF-8, bad bytes replaced by U+FFFD: %s", len(undecodable), shown)
    return router.finish()


class _SplitRouter:
    """Numbers documents and sends each to the train or val writer.

    Val is chosen by a seeded hash of the index, so the split does not depend on the document's
    content or on batching. Document 0 is always train, and the latest train document is held back
    one step so it can become val when the hash picked none: both splits exist whenever there are
    two documents and val_fraction > 0.
    """

    def __init__(self, writers: dict[str, "_ShardWriter"], val_fraction: float, seed: int):
        self.writers = writers
        self.val_fraction = val_fraction
        self.seed = seed
        self.documents = 0
        self.tokens = 0
        self._held: tuple[int, int, bytes] | None = None

    def add(self, ntokens: int, npy: bytes) -> None:
        doc = (self.documents, ntokens, npy)
        self.documents += 1
        self.tokens += ntokens
        if doc[0] > 0 and self._hash_fraction(doc[0]) < self.val_fraction:
            self.writers["val"].add(*doc)
            return
        if self._held is not None:
            self.writers["train"].add(*self._held)
        self._held = doc

    def finish(self) -> list[ShardInfo]:
        if self._held is not None:
            val_missing = self.val_fraction > 0 and self.documents >= 2 and self.writers["val"].documents == 0
            self.writers["val" if val_missing else "train"].add(*self._held)
        return [shard for split in SPLITS for shard in self.writers[split].finish()]

    def _hash_fraction(self, index: int) -> float:
        digest = hashlib.blake2b(f"{self.seed}:{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64


class _ShardWriter:
    """Writes one split's documents into tar shards, starting a new shard once one holds
    `shard_tokens` tokens (documents are never cut, so shards run slightly over)."""

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory = directory
        self.split = split
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self.documents = 0
        self._tar: tarfile.TarFile | None = None
        self._shard_documents = 0
        self._shard_tokens = 0

    def add(self, index: int, ntokens: int, npy: bytes) -> None:
        if self._tar is None:
            self._tar = tarfile.open(self.directory / shard_name(self.split, len(self.shards)), "w")
            self._shard_documents = self._shard_tokens = 0
        # TarInfo's defaults (mtime 0, uid/gid 0, no owner names) keep shards byte-identical across runs.
        member = tarfile.TarInfo(f"{index:010d}.{TOKENS_EXT}")
        member.size = len(npy)
        self._tar.addfile(member, io.BytesIO(npy))
        self.documents += 1
        self._shard_documents += 1
        self._shard_tokens += ntokens
        if self._shard_tokens >= self.shard_tokens:
            self._close_shard()

    def finish(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def _close_shard(self) -> None:
        self._tar.close()
        path = Path(self._tar.name)
        self.shards.append(ShardInfo(path.name, self.split, self._shard_documents, self._shard_tokens, sha256_file(path)))
        self._tar = None


def _prepare_output_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise ShardSetError(f"output path {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ShardSetError(f"output directory {str(out)!r} is not empty; pass overwrite=True (--overwrite) to replace the shard set in it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _publish(staging: Path, out: Path, manifest: Manifest) -> None:
    """Replace `out`'s shard set with the staged one. The old manifest goes first and the new one
    comes last, so no manifest ever lists shards that are missing or from another build."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for old in out.iterdir():
        if SHARD_FILE.fullmatch(old.name):
            old.unlink()
        elif old.name.startswith(STAGING_PREFIX) and old.name != staging.name:  # left by an interrupted build
            shutil.rmtree(old, ignore_errors=True)
    for shard in manifest.shards:
        os.replace(staging / shard.name, out / shard.name)
    write_manifest(out, manifest)
