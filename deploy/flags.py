"""The flags several verbs share, each declared once so that its help reads the same everywhere
(as LMDeploy's `ArgumentHelper` does). A verb passes what differs, its default, in words."""

from __future__ import annotations

import argparse
from pathlib import Path

GPU_NAMES = "T4, A10, A100-40G, A100-80G, H100, H200, or a size like 24GiB"


def recipe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, metavar="RECIPE", help="the recipe file (YAML)")


def gpu(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--gpu", help=f"the GPU to fit: {GPU_NAMES} (default: {default})")


def sessions(parser: argparse.ArgumentParser, also: str = "") -> None:
    parser.add_argument("--sessions", type=int, help="full-length sessions served at once "
                        f"(default: engine.max_batch_size){also}")


def disk(parser: argparse.ArgumentParser) -> None:
    from deploy.capacity.startup import DISK_MB_S

    parser.add_argument("--disk-mb-s", type=float, default=DISK_MB_S, metavar="MB_S",
                        help="how fast the serving machine reads the weights from disk, for the "
                        f"predicted start (default {DISK_MB_S}: a cloud block volume)")


def force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="use quantized weights that failed the builder's quality gate or never "
                        "met it (logged as a warning); without it they are refused with exit 6")
