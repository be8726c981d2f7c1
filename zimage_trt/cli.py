"""`zimage-trt`: the one command. Each family of subcommands is a module of its own (cli_export: make-tiny,
export, lora, build; cli_run: generate, parity, bench, demo; cli_serve: serve), its argument groups shared
through cli_args; a subcommand is a small function whose heavy imports happen inside it.

Errors a user can fix print as one line (`error: ...`) with exit status 2, and so does any OSError (a full disk,
a read-only folder); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from zimage_trt.common.errors import UserError

from . import cli_export, cli_run, cli_serve


def _quiet_libraries() -> None:
    # Local folders only, and no library chatter over our own progress bars.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zimage-trt",
        description="Z-Image-Turbo on TensorRT: export to ONNX, build engines per GPU, generate, check parity.",
        epilog="Typical flow: export --model DIR --out BUNDLE; build --bundle BUNDLE --out ENGINES; "
        "generate --bundle BUNDLE --engines ENGINES --backend tensorrt --prompt TEXT --out IMG.png",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    cli_export.add_parsers(sub)
    cli_run.add_parsers(sub)
    cli_serve.add_parsers(sub)
    cli_run.add_demo_parser(sub)
    return parser


def main(argv=None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    if args.command == "parity" and args.model is None and not (args.against or args.against_engines):
        print("error: parity needs --model DIR (the original model, for the reference), or --against BUNDLE",
              file=sys.stderr)
        return 2
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The commands name the file and the fix where they write; this is the net for any other file error
        # (a full disk, a read-only or unreadable folder): one line, never a traceback.
        from zimage_trt.common.files import os_error_line

        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
