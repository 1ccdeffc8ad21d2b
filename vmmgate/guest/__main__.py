"""Command line: ``python -m vmmgate.guest build [--force] [--out DIR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vmmgate.guest.image import GuestBuildError, ensure_guest


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the command; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m vmmgate.guest",
        description="Build the vmmgate demo guest image.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build", help="build the kernel + initramfs (if not up to date)"
    )
    build.add_argument(
        "--force", action="store_true", help="rebuild even if up to date"
    )
    build.add_argument(
        "--out", type=Path, help="output directory (default: the state dir)"
    )
    args = parser.parse_args(argv)
    try:
        image = ensure_guest(
            args.out, force=args.force, say=lambda msg: print(msg, flush=True)
        )
    except GuestBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"kernel: {image.kernel}\ninitrd: {image.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
