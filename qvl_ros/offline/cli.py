"""The `qvl-ros` command: one entry point, one subcommand per tool.

    qvl-ros extract INPUT [INPUT ...] --out OUTPUT --topics /cam0/image_raw /cam1/image_raw

A subcommand is registered in ``_SUBCOMMANDS`` as (name, help, module): the module provides
``add_arguments(parser)`` and ``run_cli(args, prog) -> int``, and keeps its heavy imports (torch,
rosbags) inside functions, so ``qvl-ros --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

_SUBCOMMANDS = (
    ("extract", "extract features (and captions) from camera topics of rosbag2 recordings",
     "qvl_ros.offline.extract"),
    ("merge", "merge the shards of a sharded extraction into one bag (and one export)",
     "qvl_ros.offline.merge"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qvl-ros", description="Batched Qwen2.5-VL / Qwen2-VL tools for ROS 2.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"qvl_ros {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text, module in _SUBCOMMANDS:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module, _prog=f"qvl-ros {name}")
        importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return importlib.import_module(args._module).run_cli(args, prog=args._prog)


if __name__ == "__main__":
    sys.exit(main())
