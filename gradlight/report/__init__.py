"""Reports: pictures of gradient flow for one run, or several side by side.

:func:`build_report` reads monitor ``save_dir`` folders and writes ``report.html`` (self-contained) and the
PNG figures beside it. The parts: :mod:`~gradlight.report.summary` computes, :mod:`~gradlight.report.figures`
draws, :mod:`~gradlight.report.html` lays out, :mod:`~gradlight.report.loggers` sends figures to loggers.
"""

from __future__ import annotations

import io
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from gradlight import __version__
from gradlight.history import TruncatedHistoryWarning
from gradlight.report.figures import (
    FigureResult,
    compare_profiles_figure,
    compare_ratios_figure,
    figure_builders,
)
from gradlight.report.html import ImageBlock, RunSection, render_page
from gradlight.report.summary import (
    ReportInputError,
    Run,
    RunSpec,
    RunSummary,
    load_run,
    resolve_run_specs,
    summarize,
)

__all__ = [
    "REPORT_FILE",
    "ReportInputError",
    "Run",
    "RunSummary",
    "build_report",
    "load_run",
    "summarize",
]

REPORT_FILE = "report.html"


def _slug(label: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.") or "run"
    slug, index = base[:60], 2
    while slug in taken:
        slug, index = f"{base[:56]}-{index}", index + 1
    taken.add(slug)
    return slug


def _save(result: FigureResult, out_dir: Path, file_name: str, dpi: int) -> ImageBlock:
    buffer = io.BytesIO()
    result.figure.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    png = buffer.getvalue()
    (out_dir / file_name).write_bytes(png)
    result.figure.clear()
    return ImageBlock(result.title, result.caption, png, file_name)


def build_report(
    runs: Iterable[RunSpec] | Mapping[str, str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    title: str | None = None,
    dpi: int = 150,
    progress: bool | None = None,
) -> Path:
    """Write a gradient-flow report of one or several runs to ``out_dir/report.html`` (plus the PNGs).

    Args:
        runs: Monitor ``save_dir`` paths (or folders holding exactly one, searched two levels down),
            ``"label=path"`` strings, ``(label, path)`` pairs, or a ``{label: path}`` mapping.
        out_dir: Folder for ``report.html`` and the figures (created if needed).
        title: Page title (default: "Gradient flow: <labels>").
        dpi: Resolution of the PNG figures.
        progress: Show a progress bar on stderr while reading and drawing; ``None`` shows it when stderr is
            a terminal.

    Returns:
        The path of ``report.html``.

    Raises:
        ReportInputError: A run path does not exist, holds no (or several) histories, an empty history or
            one with nothing readable, or the labels are malformed or duplicated.

    A history torn by a killed writer is reported up to the tear, with a
    :class:`~gradlight.history.TruncatedHistoryWarning` and a warning on the page.

    Example:
        >>> from gradlight.report import build_report
        >>> build_report(["baseline=runs/a/gradlight", "resnet=runs/b/gradlight"], "reports/ab")  # doctest: +SKIP
        PosixPath('reports/ab/report.html')
    """
    if dpi < 20:
        raise ValueError(f"`dpi` must be at least 20, got {dpi!r}")
    specs = resolve_run_specs(runs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportInputError(f"--out {str(out)!r} is a file; pass a folder")
    comparing = len(specs) > 1
    builders_per_run = 6
    total = len(specs) * (1 + builders_per_run) + (2 if comparing else 0) + 1
    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(total=total, desc="reading", unit="task", file=sys.stderr, disable=not progress, leave=False)
    try:
        loaded: list[Run] = []
        for label, save_dir in specs:
            bar.set_postfix_str(label, refresh=False)
            run = load_run(save_dir, label)
            for message in run.warnings:
                category = TruncatedHistoryWarning if "truncated" in message else UserWarning
                warnings.warn(message, category, stacklevel=2)
            loaded.append(run)
            bar.update(1)
        out.mkdir(parents=True, exist_ok=True)  # only once every run is readable
        bar.set_description("drawing")
        taken: set[str] = set()
        sections: list[RunSection] = []
        for run in loaded:
            slug = _slug(run.label, taken)
            bar.set_postfix_str(run.label, refresh=False)
            images: list[ImageBlock] = []
            for build in figure_builders(run):
                result = build()
                if result is not None:
                    images.append(_save(result, out, f"{slug}_{result.name}.png", dpi))
                bar.update(1)
            sections.append(
                RunSection(run.label, run.save_dir, run.info, summarize(run), images, run.findings, run.warnings)
            )
        comparison: list[ImageBlock] = []
        if comparing:
            bar.set_postfix_str("comparison", refresh=False)
            for draw in (compare_profiles_figure, compare_ratios_figure):
                result = draw(loaded)
                comparison.append(_save(result, out, f"{result.name}.png", dpi))
                bar.update(1)
        labels = ", ".join(run.label for run in loaded)
        page = render_page(
            title or f"Gradient flow: {labels}",
            sections,
            comparison,
            generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            version=__version__,
        )
        path = out / REPORT_FILE
        path.write_text(page, encoding="utf-8")
        bar.update(1)
    finally:
        bar.close()
    return path
