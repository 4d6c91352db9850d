"""How a report is laid out: one self-contained HTML page (inline CSS, images as base64 PNG, no network)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradlight.records import GLOBAL_LAYER
from gradlight.report.summary import SLOPE_UNIT, RunSummary

__all__ = ["ExtraSection", "ImageBlock", "RunSection", "format_number", "format_value", "render_page"]


@dataclass
class ImageBlock:
    """One figure on the page.

    Attributes:
        title: Heading above the figure.
        caption: How to read it.
        png: The PNG bytes, embedded in the page.
        file: The PNG's file name beside the page (shown as a link).
    """

    title: str
    caption: str
    png: bytes
    file: str = ""


@dataclass
class ExtraSection:
    """A section the caller adds to the page, above the runs' summary (e.g. an experiment's own results).

    Attributes:
        title: Heading of the section (escaped).
        html: Its body, inserted as given: HTML the caller wrote (tables, paragraphs); never user input.
        images: Figures shown after the body.

    Example:
        >>> ExtraSection("Grid", "<p>7 runs</p>").title
        'Grid'
    """

    title: str
    html: str = ""
    images: Sequence[ImageBlock] = ()


@dataclass
class RunSection:
    """Everything the page shows about one run."""

    label: str
    save_dir: Path
    info: Mapping[str, Any]
    summary: RunSummary
    images: list[ImageBlock] = field(default_factory=list)
    findings: Sequence[Mapping[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def format_number(value: Any) -> str:
    """Format a number for a table: 3 significant digits, scientific when very small or large.

    Example:
        >>> format_number(0.000012345), format_number(3.14159), format_number(float("nan"))
        ('1.23e-05', '3.14', 'n/a')
    """
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #222;
       max-width: 1040px; margin: 2em auto; padding: 0 1.2em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { margin-bottom: 0.3em; } .meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #444; margin-top: 0.3em; }
.warning { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.5em 0.8em; margin: 0.5em 0; }
.finding { border: 1px solid #e3e3e3; border-radius: 4px; padding: 0.6em 0.9em; margin: 0.7em 0; }
.kind { display: inline-block; font-size: 0.8em; font-weight: 600; padding: 0.05em 0.5em; border-radius: 3px;
        color: white; background: #666; text-transform: uppercase; letter-spacing: 0.03em; }
.kind-vanishing { background: #3b6fb6; } .kind-exploding { background: #c0392b; }
.kind-non_finite { background: #8e44ad; } .kind-dormant { background: #7f8c8d; }
.kind-saturated { background: #d68910; } .kind-dead_units { background: #2c3e50; }
.finding dl { margin: 0.3em 0; } .finding dt { font-weight: 600; float: left; width: 5.5em; clear: left; }
.finding dd { margin-left: 6em; } code { font-size: 0.9em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(block: ImageBlock) -> str:
    encoded = base64.b64encode(block.png).decode("ascii")
    link = f' <a href="{_e(block.file)}">PNG</a>' if block.file else ""
    return (
        f'<figure><img src="data:image/png;base64,{encoded}" alt="{_e(block.title)}">'
        f"<figcaption><b>{_e(block.title)}.</b> {_e(block.caption)}{link}</figcaption></figure>"
    )


def _summary_table(summaries: Sequence[RunSummary]) -> str:
    if not summaries:
        return ""
    rows = [summary.as_row() for summary in summaries]
    header = "".join(f"<th>{_e(name)}</th>" for name in rows[0])
    body = []
    for row in rows:
        cells = []
        for value in row.values():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cells.append(f'<td class="num">{_e(format_number(value))}</td>' if numeric else f"<td>{_e(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def format_value(value: Any, limit: int = 12) -> str:
    """Format an evidence value: numbers as :func:`format_number`, lists and dicts item by item.

    Example:
        >>> format_value({"net.0": 9.796801148046394e-07, "net.2": 0.5}), format_value(["a", "b"])
        ('net.0: 9.80e-07, net.2: 0.5', 'a, b')
    """
    if isinstance(value, Mapping):
        items = [f"{key}: {format_value(item, limit)}" for key, item in list(value.items())[:limit]]
        more = f", ... ({len(value) - limit} more)" if len(value) > limit else ""
        return ", ".join(items) + more
    if isinstance(value, (list, tuple)):
        items = [format_value(item, limit) for item in list(value)[:limit]]
        more = f", ... ({len(value) - limit} more)" if len(value) > limit else ""
        return ", ".join(items) + more
    return format_number(value)


def _evidence(evidence: Mapping[str, Any]) -> str:
    if not evidence:
        return ""
    items = "; ".join(f"<code>{_e(key)}</code> = {_e(format_value(value))}" for key, value in evidence.items())
    return f"<dt>Evidence</dt><dd>{items}</dd>"


def _findings(findings: Sequence[Mapping[str, Any]]) -> str:
    if not findings:
        return "<p>No findings: the diagnosis raised nothing for this run (or did not run).</p>"
    blocks = []
    for finding in sorted(findings, key=lambda item: (int(item.get("step", -1)), str(item.get("layer", "")))):
        kind = str(finding.get("kind", ""))
        where = []
        if int(finding.get("step", -1)) >= 0:
            where.append(f"step {int(finding['step'])}")
        if finding.get("layer") == GLOBAL_LAYER:
            where.append("whole model")
        elif finding.get("layer"):
            where.append(f"layer <code>{_e(finding['layer'])}</code>")
        details = ""
        if finding.get("cause"):
            details += f"<dt>Cause</dt><dd>{_e(finding['cause'])}</dd>"
        if finding.get("remedy"):
            details += f"<dt>Remedy</dt><dd>{_e(finding['remedy'])}</dd>"
        details += _evidence(finding.get("evidence") or {})
        affected = finding.get("layers")
        if isinstance(affected, list) and len(affected) > 1:
            shown = ", ".join(f"<code>{_e(name)}</code>" for name in affected[:12])
            more = f" and {len(affected) - 12} more" if len(affected) > 12 else ""
            details += f"<dt>Affected</dt><dd>{len(affected)} layers: {shown}{more}</dd>"
        blocks.append(
            f'<div class="finding"><span class="kind kind-{_e(kind)}">{_e(kind.replace("_", " "))}</span> '
            f"{' · '.join(where)}<p>{_e(finding.get('message', ''))}</p><dl>{details}</dl></div>"
        )
    return "".join(blocks)


_INFO_KEYS = (
    ("model", "model"),
    ("log_every_n_steps", "logged every n steps"),
    ("gradient_clip_val", "gradient clip value"),
    ("gradient_clip_algorithm", "clip algorithm"),
    ("world_size", "world size"),
    ("precision", "precision"),
    ("accumulate_grad_batches", "gradient accumulation"),
    ("gradlight_version", "gradlight version"),
)


def _run_info(section: RunSection) -> str:
    cells = [f"<tr><th>save_dir</th><td><code>{_e(section.save_dir)}</code></td></tr>"]
    for key, label in _INFO_KEYS:
        if section.info.get(key) is not None:
            cells.append(f"<tr><th>{_e(label)}</th><td>{_e(section.info[key])}</td></tr>")
    layers = section.info.get("layers")
    if isinstance(layers, list) and layers:
        params = sum(int(layer.get("num_params", 0) or 0) for layer in layers if isinstance(layer, dict))
        cells.append(f"<tr><th>monitored layers</th><td>{len(layers)} ({params:,} parameters)</td></tr>")
    if not section.info:
        cells.append("<tr><th>run.json</th><td>missing: run settings unknown</td></tr>")
    return f"<table>{''.join(cells)}</table>"


def _warnings(warnings: Sequence[str]) -> str:
    return "".join(f'<div class="warning">⚠ {_e(warning)}</div>' for warning in warnings)


def render_page(
    title: str,
    sections: Sequence[RunSection],
    comparison: Sequence[ImageBlock] = (),
    *,
    extra_sections: Sequence[ExtraSection] = (),
    generated: str = "",
    version: str = "",
) -> str:
    """Render the report page.

    Args:
        title: Page title.
        sections: One section per run, in order.
        comparison: Comparison figures (shown when there are several runs).
        extra_sections: The caller's own sections, shown first, above the runs' summary.
        generated: When the report was made (free text).
        version: gradlight version.

    Returns:
        The HTML text; it references nothing outside itself except the optional PNG links.

    Example:
        >>> page = render_page("My runs", [])
        >>> page.startswith("<!DOCTYPE html>")
        True
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">gradlight {_e(version)} · {_e(generated)} · {len(sections)} run(s): '
        + ", ".join(f"<b>{_e(section.label)}</b>" for section in sections)
        + "</p>",
    ]
    all_warnings = [warning for section in sections for warning in section.warnings]
    parts.append(_warnings(all_warnings))
    for extra in extra_sections:
        parts.append(f"<section><h2>{_e(extra.title)}</h2>{extra.html}")
        parts.extend(_img(block) for block in extra.images)
        parts.append("</section>")
    if not sections:
        parts.append("</body></html>")
        return "\n".join(parts)
    parts.append("<h2>Summary</h2>")
    parts.append(_summary_table([section.summary for section in sections]))
    parts.append(
        '<p class="meta">Early/late ratio: first over last layer gradient norm (1 = balanced). Smallest '
        f"layer gradient norm (L2) and profile slope ({SLOPE_UNIT} of gradient norm; positive = vanishing "
        "toward the input) are at the last recorded step.</p>"
    )
    if comparison:
        parts.append("<h2>Comparison</h2>")
        parts.extend(_img(block) for block in comparison)
    for section in sections:
        parts.append(f"<h2>Run: {_e(section.label)}</h2>")
        parts.append(_warnings(section.warnings))
        parts.append(_run_info(section))
        parts.append(f"<h3>Findings ({len(section.findings)})</h3>")
        parts.append(_findings(section.findings))
        parts.append("<h3>Figures</h3>")
        parts.extend(_img(block) for block in section.images)
    parts.append("</body></html>")
    return "\n".join(parts)
