"""`rwkvx`: train from a recipe, and build or inspect shard sets.

    rwkvx train demo                                  # bundled recipe (recipes/demo.yaml)
    rwkvx train my.yaml trainer.max_steps=100 run.dir=runs/x
    rwkvx train demo --print-config                   # the resolved config, nothing run
    rwkvx data build --default-corpus --out data/stdlib
    rwkvx data inspect data/stdlib
"""

from __future__ import annotations

import argparse
import logging
import sys

from rwkvx_data.cli import add_data_subcommands
from rwkvx_lightning.config import load_config, to_yaml


def run_train(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from rwkvx_lightning.train import train  # heavy imports only when training

        train(cfg)
    except ValueError as e:  # ConfigError, ShardSetError, a data position that cannot resume: one line, no traceback
        print(f"rwkvx train: error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkvx", description="Train RWKV-X hybrid language models.")
    sub = parser.add_subparsers(dest="command", metavar="{train,data}", required=True)
    train = sub.add_parser("train", help="train from a recipe (a YAML file or a bundled recipe name)")
    train.add_argument("recipe", help="recipe file, or the name of a bundled recipe such as 'demo'")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. trainer.max_steps=100")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=run_train)
    add_data_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come before or after --print-config
    if extra and args.command == "train" and not any(x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
