"""The ``gradlight`` command line: ``gradlight report [RUN ...] --out DIR``.

Subcommands register themselves in :data:`SUBCOMMANDS` (name -> function adding a parser to the
subparsers); each sets ``func`` to a handler ``(args) -> exit code``. Bad input prints one line to stderr
and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["EXIT_BAD_INPUT", "SUBCOMMANDS", "build_parser", "main"]

EXIT_BAD_INPUT = 2

_REPORT_DESCRIPTION = """\
Draw the gradient flow of one or several monitored runs into a self-contained HTML page (images embedded,
opens from disk without network) with the PNG figures beside it: a heat map of every layer's gradient
norm over the steps, the gradient-flow profile, the early-to-late ratio, the global norm (with the clip
value), update ratios and activation statistics when recorded, the diagnosis findings in words, and, for
several runs, their profiles and ratios overlaid with a summary table.
"""

_REPORT_EPILOG = """\
examples:
  gradlight report lightning_logs/version_0/gradlight --out report/
  gradlight report --out report/          (the one run below the current folder)
  gradlight report sigmoid=runs/sigmoid relu=runs/relu --out compare/

exit status: 0 on success (a truncated history is reported up to the tear, with a warning),
2 on bad input (missing path, no history, empty or unreadable history, a history written by a newer
gradlight, bad or duplicate labels).
"""


def _add_report(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write an HTML report (and PNG figures) of one or several runs",
        description=_REPORT_DESCRIPTION,
        epilog=_REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="a run folder (a monitor's or recorder's save_dir, the folder holding history/), or a folder with "
        "exactly one run folder up to three levels down (a Lightning log_dir or default_root_dir, an "
        "Ultralytics runs folder); write LABEL=PATH to name the run in the report (default: the folder "
        "name). Without RUN: the one run below the current folder (e.g. lightning_logs/version_0/gradlight)",
    )
    parser.add_argument(
        "-o",
        "--out",
        required=True,
        metavar="DIR",
        help="output folder for report.html and the PNG figures (created if missing; files are overwritten)",
    )
    parser.add_argument("--title", default=None, help="page title (default: 'Gradient flow: <labels>')")
    parser.add_argument(
        "--dpi", type=int, default=150, help="resolution of the PNG figures in dots per inch (default: 150)"
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const=True,
        default=None,
        help="show a progress bar on stderr while reading and drawing (default: when stderr is a terminal)",
    )
    progress.add_argument(
        "--no-progress", dest="progress", action="store_const", const=False, help="never show the progress bar"
    )
    parser.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from gradlight.report import build_report

    if args.dpi < 20:
        return _fail(f"--dpi must be at least 20, got {args.dpi}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = build_report(args.runs or ["."], args.out, title=args.title, dpi=args.dpi, progress=args.progress)
    for warning in caught:
        print(f"gradlight report: warning: {warning.message}", file=sys.stderr)
    print(path)
    return 0


#: Subcommand name -> function adding its parser to ``subparsers``.
SUBCOMMANDS: dict[str, Callable[[Any], None]] = {"report": _add_report}


def build_parser() -> argparse.ArgumentParser:
    """The ``gradlight`` argument parser with every subcommand.

    Example:
        >>> build_parser().parse_args(["report", "runs/a", "--out", "out"]).runs
        ['runs/a']
    """
    parser = argparse.ArgumentParser(
        prog="gradlight",
        description="gradlight: see how gradients flow through your network while it trains. "
        "Tools for the histories a GradientFlowMonitor writes.",
        epilog="Run 'gradlight <command> --help' for a command's options.",
    )
    from gradlight import __version__

    parser.add_argument("--version", action="version", version=f"gradlight {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def _fail(message: str) -> int:
    print(f"gradlight: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradlight`` command line; returns the exit code.

    Example:
        >>> main(["report", "runs/exp1/gradlight", "--out", "report"])  # doctest: +SKIP
        0
    """
    from gradlight.report.summary import ReportInputError
    from gradlight.runfolder import UnsupportedFormatError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args))
    except (ReportInputError, UnsupportedFormatError) as err:
        return _fail(str(err))
    except OSError as err:
        print(f"gradlight: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gradlight: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
