"""`rwkvx data build` and `rwkvx data inspect`; the top-level CLI mounts them with
`add_data_subcommands(subparsers)`, and each handler returns the exit code."""

from __future__ import annotations

import argparse
import sys
import time

from .build import DEFAULT_PATTERNS, DEFAULT_SHARD_TOKENS, build_default_corpus, build_shards
from .format import ShardSetError
from .inspect_shards import format_summary, inspect_shard_set

USAGE_ERROR = 2


def add_data_subcommands(subparsers) -> None:
    data = subparsers.add_parser("data", help="build and inspect tokenised shard sets")
    commands = data.add_subparsers(dest="data_command", metavar="{build,inspect}", required=True)

    build = commands.add_parser(
        "build",
        help="tokenise text, source files and JSONL into a shard set",
        description="Tokenise INPUT files and directories into webdataset shards plus manifest.json in --out. "
        "A .jsonl file holds one document per line in its 'text' field; any other file is one document.",
    )
    build.add_argument("inputs", nargs="*", metavar="INPUT", help="files or directories (walked recursively)")
    build.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty or absent)")
    build.add_argument(
        "--default-corpus",
        action="store_true",
        help="use this Python's standard library sources (*.py) instead of INPUTs: needs no download",
    )
    build.add_argument(
        "--include",
        type=globs,
        default=DEFAULT_PATTERNS,
        metavar="GLOBS",
        help=f"comma-separated file name patterns taken from directories (default: {','.join(DEFAULT_PATTERNS)})",
    )
    build.add_argument("--val-fraction", type=fraction, default=0.005, metavar="F", help="share of documents for val (default: 0.005)")
    build.add_argument(
        "--shard-tokens", type=positive_int, default=DEFAULT_SHARD_TOKENS, metavar="N", help="tokens per shard (default: %(default)s)"
    )
    build.add_argument("--workers", type=positive_int, default=None, metavar="N", help="tokenising processes (default: all cores)")
    build.add_argument("--seed", type=int, default=0, help="seed of the train/val assignment (default: 0)")
    build.add_argument("--overwrite", action="store_true", help="replace the shard set already in --out")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=run_build)

    inspect = commands.add_parser("inspect", help="summarise a shard set and verify its shards")
    inspect.add_argument("directory", metavar="DIR")
    inspect.add_argument("--no-verify", action="store_true", help="read the manifest only; skip reading and hashing shards")
    inspect.set_defaults(func=run_inspect)


def run_build(args: argparse.Namespace) -> int:
    if args.default_corpus == bool(args.inputs):
        return _error("data build", "give INPUT paths or --default-corpus (exactly one of them)")
    options = dict(
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    start = time.perf_counter()
    try:
        if args.default_corpus:
            manifest = build_default_corpus(args.out, **options)
        else:
            manifest = build_shards(args.inputs, args.out, patterns=args.include, **options)
    except (ShardSetError, OSError) as e:
        return _error("data build", e)
    seconds = time.perf_counter() - start
    print(
        f"wrote {manifest.documents:,} documents, {manifest.tokens:,} tokens in {len(manifest.shards)} shards "
        f"to {args.out} ({seconds:.1f} s)"
    )
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    try:
        summary = inspect_shard_set(args.directory, verify=not args.no_verify)
    except (ShardSetError, OSError) as e:
        return _error("data inspect", e)
    print(format_summary(summary))
    return 0


def _error(command: str, message) -> int:
    print(f"rwkvx {command}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


# argparse names a rejected value by its type function: "invalid fraction value: 'x'".
def globs(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value
