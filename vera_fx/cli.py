"""The ``vera-fx`` command: inspect a model's adapter sites, run the demo, merge an adapter into a model.

Bad paths and arguments end with a one-line error on stderr and exit status 2 (never a traceback). Arguments are
parsed before torch is imported, so ``--help``, ``--version`` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import vera_fx  # cheap: its names load on first use, so --help / --version never import torch

logger = logging.getLogger(__name__)

# Files of a tokenizer that `merge` copies next to the merged weights, so that the folder loads alone.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model", "chat_template.jinja", "generation_config.json")
# The user's input (status 2): bad folders and files, configs that do not fit the model, missing optional
# packages. Any other RuntimeError (a CaptureError) ends with status 1.
_USER_ERRORS = (OSError, ValueError, TypeError, KeyError, ImportError)


class UsageError(Exception):
    """A bad path or argument: reported on one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer such as 256")
    return value


def _target_modules(text: str) -> Any:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected module names separated by commas, "
                                         "e.g. query,value, or all-linear")
    return "all-linear" if names == ["all-linear"] else names


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vera-fx`` and its subcommands."""
    parser = _Parser(prog="vera-fx", description="VeRA and PVeRA adapters as a torch.fx graph-rewriting pass.",
                     epilog="Run 'vera-fx COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"vera-fx {vera_fx.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show progress logs")

    p = sub.add_parser("inspect", parents=[common],
                       help="transform a local transformers model and print its adapter sites",
                       description="Load a saved transformers model folder, attach a VeRA / PVeRA adapter and "
                                   "print the table of adapted sites with parameter counts.",
                       epilog="example: vera-fx inspect ./my-model --target-modules query,value --r 64")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder of a saved model (config.json and weights)")
    p.add_argument("--method", choices=("vera", "pvera"), default="vera", help="adapter method (default vera)")
    p.add_argument("--target-modules", type=_target_modules, default=None, metavar="A,B",
                   help="module-name suffixes separated by commas, or all-linear (default: the "
                        "architecture's query and value projections)")
    p.add_argument("--r", type=_positive_int, default=256, metavar="N", help="rank of the shared projections "
                   "(default 256)")
    p.add_argument("--all-sites", action="store_true", help="list every linear-like call, adapted or not")
    p.add_argument("--dot", metavar="FILE", default=None,
                   help="also write the graph as DOT text to FILE (SVG when FILE ends in .svg; needs graphviz)")
    p.add_argument("--adapters-only", action="store_true",
                   help="with --dot: draw only the adapter nodes and their neighbours")

    sub.add_parser("demo", add_help=False, help="fine-tune the real all-MiniLM-L6-v2 with VeRA "
                   "(options: vera-fx demo --help)")

    m = sub.add_parser("merge", parents=[common], help="merge a saved adapter into its base model and save the result",
                       description="Load MODEL_DIR, load the adapter saved in ADAPTER_DIR (PEFT's layout: "
                                   "adapter_config.json + adapter_model.safetensors), add its weight deltas to the "
                                   "base weights and write the plain model to OUT_DIR with save_pretrained "
                                   "(safetensors), together with the tokenizer files of MODEL_DIR.",
                       epilog="example: vera-fx merge ./base ./my-adapter ./merged")
    m.add_argument("model_dir", metavar="MODEL_DIR", help="folder of the base model")
    m.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder of the saved adapter")
    m.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the merged model to (new or empty)")
    m.add_argument("--overwrite", action="store_true", help="write into OUT_DIR even when it is not empty")
    return parser


def _check_dir(label: str, path: str, must_have: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{label}={path!r} does not exist: give the path of a local folder")
    if not p.is_dir():
        raise UsageError(f"{label}={path!r} is not a folder: give the folder that holds the files, not a file")
    if not (p / must_have).is_file():
        raise UsageError(f"{label}={path!r} has no {must_have}: give a folder written by save_pretrained")
    return p


def _load_model(path: Path) -> Any:
    """The model saved in the folder ``path``, as the class its config.json names (AutoModel otherwise)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = AutoModel
    logger.info("loading %s from %s", getattr(cls, "__name__", cls), path)
    return cls.from_pretrained(path, local_files_only=True).eval()


def _inspect(args: argparse.Namespace) -> int:
    dot = Path(args.dot) if args.dot else None
    if dot is not None:  # checked before the (slow) load and capture
        if not dot.parent.is_dir():
            raise UsageError(f"--dot={args.dot!r}: the folder {str(dot.parent)!r} does not exist; create it first")
        if dot.suffix.lower() == ".svg" and shutil.which("dot") is None:
            raise UsageError(f"--dot={args.dot!r} asks for SVG, but graphviz's dot binary is not installed: "
                             "install graphviz, or write a .dot file")
    model = _load_model(_check_dir("MODEL_DIR", args.model_dir, "config.json"))
    config_cls = vera_fx.PveraConfig if args.method == "pvera" else vera_fx.VeraConfig
    config = config_cls(r=args.r, target_modules=args.target_modules)
    gm = vera_fx.transform(model, config)
    print(vera_fx.summary(gm, include_unadapted=args.all_sites))
    if dot is not None:
        vera_fx.view(gm, adapters_only=args.adapters_only).save(dot)
        print(f"wrote the graph to {dot}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    src = _check_dir("MODEL_DIR", args.model_dir, "config.json")
    _check_dir("ADAPTER_DIR", args.adapter_dir, "adapter_config.json")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT_DIR={args.out_dir!r} is a file: give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"OUT_DIR={args.out_dir!r} is not empty: choose a new folder or pass --overwrite")
    if src.resolve() == out.resolve():
        raise UsageError(f"OUT_DIR={args.out_dir!r} is MODEL_DIR: write the merged model to another folder")
    model = _load_model(src)
    gm = vera_fx.from_pretrained(model, args.adapter_dir)
    n_sites = len(vera_fx.sites(gm))
    vera_fx.merge_into(model, gm)  # in place: model now holds W + ΔW
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    copied = [name for name in _TOKENIZER_FILES if (src / name).is_file() and not (out / name).exists()]
    for name in copied:
        shutil.copy2(src / name, out / name)
    print(f"merged the adapter of {args.adapter_dir} ({n_sites} sites) into {type(model).__name__}; "
          f"wrote {out} (safetensors{', tokenizer' if copied else ''})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``vera-fx`` with ``argv`` (default: the process arguments); returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)  # None: the process arguments
    if rest and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="vera-fx: %(levelname)s: %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for the Hub
    prog = f"vera-fx {args.command}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.showwarning = lambda message, *_, **__: print(f"vera-fx: warning: {message}", file=sys.stderr)
        try:
            if args.command == "demo":  # imported for this command only (it imports torch)
                return int(importlib.import_module("vera_fx.demo").main(rest) or 0)
            return _inspect(args) if args.command == "inspect" else _merge(args)
        except UsageError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except (*_USER_ERRORS, RuntimeError) as e:
            if args.verbose:
                raise
            internal = not isinstance(e, _USER_ERRORS)  # a CaptureError: not the user's input
            first = next(iter(str(e).strip().splitlines()), "") or type(e).__name__
            print(f"{prog}: error: {first}{' (run with -v for details)' if internal else ''}", file=sys.stderr)
            return 1 if internal else 2
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
