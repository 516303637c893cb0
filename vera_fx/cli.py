"""The vera-fx command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vera-fx", description="VeRA / PVeRA adapters as a torch.fx pass")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="fine-tune the real all-MiniLM-L6-v2 with VeRA", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
