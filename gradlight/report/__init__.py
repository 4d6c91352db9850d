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
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gradlight import __version__
from gradlight.history import TruncatedHistoryWarning
from gradlight.report.figures import (
    FigureResult,
    compare_gains_figure,
    compare_profiles_figure,
    compare_ratios_figure,
    figure_builders,
)
from gradlight.report.html import ExtraSection, ImageBlock, RunSection, render_page
from gradlight.report.summary import (
    ReportInputError,
    Run,
    RunSpec,
    RunSummary,
    history_bytes,
    load_run,
    resolve_run_specs,
    summarize,
)

__all__ = [
    "REPORT_FILE",
    "ExtraSection",
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
    extra_sections: Sequence[ExtraSection] = (),
) -> Path:
    """Write a gradient-flow report of one or several runs to ``out_dir/report.html`` (plus the PNGs).

    Args:
        runs: Monitor ``save_dir`` paths (or folders holding exactly one, searched two levels down),
            ``"label=path"`` strings, ``(label, path)`` pairs, or a ``{label: path}`` mapping.
        out_dir: Folder for ``report.html`` and the figures (created if needed).
        title: Page title (default: "Gradient flow: <labels>").
        dpi: Resolution of the PNG figures.
        progress: Show progress bars on stderr: while reading (in bytes, advancing per record batch and
            history segment read) and while drawing (per figure); ``None`` shows them when stderr is a
            terminal.
        extra_sections: Sections of your own (:class:`~gradlight.report.html.ExtraSection`: a title, HTML
            you wrote, figures) shown first, above the runs' summary; e.g. an experiment grid's results.

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
    show = sys.stderr.isatty() if progress is None else bool(progress)
    loaded = _load_runs(specs, show)
    out.mkdir(parents=True, exist_ok=True)  # only once every run is readable
    builders = [figure_builders(run) for run in loaded]
    comparing = len(loaded) > 1
    comparisons = (compare_profiles_figure, compare_ratios_figure, compare_gains_figure)
    total = sum(len(run_builders) for run_builders in builders) + (len(comparisons) if comparing else 0) + 1
    with _bar(show, total=total, desc="drawing", unit="figure") as bar:
        sections = [
            _draw_run(run, run_builders, out, slug, dpi, bar)
            for run, run_builders, slug in zip(loaded, builders, _slugs(loaded))
        ]
        comparison: list[ImageBlock] = []
        if comparing:
            bar.set_postfix_str("comparison", refresh=False)
            for draw in comparisons:
                result = draw(loaded)
                if result is not None:  # the gains need a backward signal in at least one run
                    comparison.append(_save(result, out, f"{result.name}.png", dpi))
                bar.update(1)
        bar.set_postfix_str(REPORT_FILE, refresh=False)
        labels = ", ".join(run.label for run in loaded)
        page = render_page(
            title or f"Gradient flow: {labels}",
            sections,
            comparison,
            extra_sections=extra_sections,
            generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            version=__version__,
        )
        path = out / REPORT_FILE
        path.write_text(page, encoding="utf-8")
        bar.update(1)
    return path


def _bar(show: bool, *, total: int, desc: str, unit: str, **kwargs: Any) -> Any:
    """A progress bar on stderr (a silent one when ``show`` is false); use it as a context manager."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not show, leave=False, **kwargs)


def _load_runs(specs: list[tuple[str, Path]], show: bool) -> list[Run]:
    """Read every run, the bar advancing by the bytes of each record batch and segment read."""
    loaded: list[Run] = []
    total = sum(history_bytes(save_dir) for _, save_dir in specs)
    with _bar(show, total=total, desc="reading", unit="B", unit_scale=True, unit_divisor=1024) as bar:
        for label, save_dir in specs:
            bar.set_postfix_str(label, refresh=False)
            run = load_run(save_dir, label, progress=bar.update)
            for message in run.warnings:
                category = TruncatedHistoryWarning if "truncated" in message else UserWarning
                warnings.warn(message, category, stacklevel=3)
            loaded.append(run)
    return loaded


def _slugs(runs: list[Run]) -> list[str]:
    taken: set[str] = set()
    return [_slug(run.label, taken) for run in runs]


def _draw_run(
    run: Run, builders: list[Callable[[], FigureResult | None]], out: Path, slug: str, dpi: int, bar: Any
) -> RunSection:
    """Draw and save one run's figures, the bar advancing per figure."""
    bar.set_postfix_str(run.label, refresh=False)
    images: list[ImageBlock] = []
    for build in builders:
        result = build()
        if result is not None:
            images.append(_save(result, out, f"{slug}_{result.name}.png", dpi))
        bar.update(1)
    return RunSection(run.label, run.save_dir, run.info, summarize(run), images, run.findings, run.warnings)
