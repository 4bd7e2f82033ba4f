"""Summarise and verify a shard set: `rwkvx data inspect`.

(Named `inspect_shards` so it cannot shadow the standard library's `inspect`.)
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from .format import SPLITS, TOKENS_EXT, Manifest, ShardInfo, ShardSetError, decode_tokens, read_manifest, sha256_file


def inspect_shard_set(directory, verify: bool = True) -> dict:
    """Counts per split and document lengths. With `verify`, every shard is read and checked
    (see `verify_shards`) and the document lengths are exact; without, only the manifest is read
    and the min/max lengths are unknown (None)."""
    manifest = read_manifest(directory)
    splits = {
        split: {
            "shards": len(manifest.split(split)),
            "documents": sum(s.documents for s in manifest.split(split)),
            "tokens": sum(s.tokens for s in manifest.split(split)),
        }
        for split in SPLITS
    }
    lengths = np.concatenate(verify_shards(directory, manifest)) if verify else None
    return {
        "directory": str(directory),
        "format": manifest.format,
        "tokenizer": manifest.tokenizer,
        "vocab_size": manifest.vocab_size,
        "documents": manifest.documents,
        "tokens": manifest.tokens,
        "shards": len(manifest.shards),
        "splits": splits,
        "doc_tokens": {
            "min": int(lengths.min()) if verify else None,
            "mean": manifest.tokens / manifest.documents,
            "max": int(lengths.max()) if verify else None,
        },
        "verified": verify,
        "sources": manifest.sources,
    }


def verify_shards(directory, manifest: Manifest | None = None) -> list[np.ndarray]:
    """Check that every shard in the manifest is present, has the recorded sha256, opens as a tar
    of token arrays and holds the recorded document and token counts, and that the totals add up.
    Returns each shard's document lengths; raises ShardSetError naming the first bad shard."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    lengths = [_verify_shard(directory, shard) for shard in manifest.shards]
    documents = sum(s.documents for s in manifest.shards)
    tokens = sum(s.tokens for s in manifest.shards)
    if (documents, tokens) != (manifest.documents, manifest.tokens):
        raise ShardSetError(
            f"{directory}: manifest totals ({manifest.documents} documents, {manifest.tokens} tokens) "
            f"differ from the sum over its shards ({documents}, {tokens})"
        )
    return lengths


def _verify_shard(directory: Path, shard: ShardInfo) -> np.ndarray:
    path = directory / shard.name
    if not path.is_file():
        raise ShardSetError(f"shard {shard.name} is listed in the manifest but missing from {directory}")
    lengths = _document_lengths(path)
    if (len(lengths), int(lengths.sum())) != (shard.documents, shard.tokens):
        raise ShardSetError(
            f"shard {path} holds {len(lengths)} documents / {int(lengths.sum())} tokens, "
            f"the manifest says {shard.documents} / {shard.tokens} (truncated or replaced?)"
        )
    digest = sha256_file(path)
    if digest != shard.sha256:
        raise ShardSetError(f"shard {path} is corrupt: sha256 {digest} differs from the manifest's {shard.sha256}")
    return lengths


def _document_lengths(path: Path) -> np.ndarray:
    """Token count of every document in one tar shard, reading each array in full."""
    lengths = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.name.endswith(f".{TOKENS_EXT}"):
                    raise ShardSetError(f"shard {path} has an unexpected member {member.name!r}")
                lengths.append(decode_tokens(tar.extractfile(member).read()).size)
    except ShardSetError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # ValueError: a damaged .npy
        raise ShardSetError(f"shard {path} is truncated or corrupt: {e}") from e
    return np.array(lengths, dtype=np.int64)


def format_summary(summary: dict) -> str:
    """The summary as a few aligned lines for a terminal."""
    lengths = summary["doc_tokens"]
    lines = [
        f"shard set   {summary['directory']} ({summary['format']})",
        f"tokenizer   {summary['tokenizer']} (vocab {summary['vocab_size']:,})",
        f"total       {summary['documents']:,} documents, {summary['tokens']:,} tokens, {summary['shards']} shards",
    ]
    for split, s in summary["splits"].items():
        lines.append(f"{split:<11} {s['documents']:,} documents, {s['tokens']:,} tokens, {s['shards']} shards")
    lines.append(
        f"doc tokens  min {_count(lengths['min'])}, mean {lengths['mean']:,.1f}, max {_count(lengths['max'])}"
    )
    lines.append("verified    " + ("all shards read, counts and sha256 match" if summary["verified"] else "no: manifest only, shards not read"))
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"
