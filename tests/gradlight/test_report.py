from __future__ import annotations

import json
import re
import warnings
from html import escape
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from gradlight.history import HistoryWriter, TruncatedHistoryWarning, load_history, read_history
from gradlight.records import GLOBAL_LAYER
from gradlight.report import ExtraSection, ReportInputError, build_report, load_run, summarize
from gradlight.report.figures import (
    RUN_COLORS,
    activation_figure,
    compare_profiles_figure,
    compare_ratios_figure,
    global_norm_figure,
    heatmap_figure,
    profile_figure,
    ratio_figure,
    run_figures,
    run_style,
    shorten_label,
    update_ratio_figure,
)
from gradlight.report.html import ImageBlock, render_page
from gradlight.report.summary import (
    layer_grid,
    parse_run_spec,
    resolve_run_dir,
    resolve_run_specs,
)
from gradlight.runfolder import load_findings, read_findings

IMG = re.compile(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"')


# ------------------------------------------------------------------------------------ synthetic runs
def write_run(
    save_dir: Path,
    profile: str = "vanishing",
    *,
    layers: int = 8,
    steps: int = 30,
    every: int = 10,
    names: list[str] | None = None,
    findings: list[dict[str, Any]] | None = None,
    run_info: bool = True,
    activations: bool = True,
    update_ratio: bool = True,
    clip: float | None = 1.0,
    keep_open: bool = False,
) -> HistoryWriter:
    """A synthetic run: `vanishing` loses 10x per layer toward the input, `mild` 0.02 decades, `healthy` none."""
    names = names or [f"net.{2 * i}" for i in range(layers)]
    layers = len(names)
    rng = np.random.default_rng(0)
    writer = HistoryWriter(save_dir)
    depths = np.arange(layers)
    for k, step in enumerate(range(0, steps * every, every)):
        if profile == "vanishing":
            grad = 10.0 ** (depths - (layers - 1)) * (1 + 0.1 * rng.random(layers)) * (1 - 0.5 * k / steps)
        elif profile == "mild":
            grad = 10.0 ** (0.02 * (depths - (layers - 1)) - 0.3 * np.sin(depths / 7.0) ** 2) * (
                1 + 0.2 * rng.random(layers)
            )
        elif profile == "exploding":
            grad = 10.0 ** (0.5 * (layers - 1 - depths)) * (1 + 0.1 * rng.random(layers))
        else:
            grad = 0.5 + 0.2 * rng.random(layers)
        param = np.full(layers, 4.0)
        metrics = {
            "grad_l2": grad,
            "grad_max_abs": grad / 3,
            "grad_nonfinite": np.zeros(layers),
            "param_l2": param,
            "update_ratio": 1e-3 * grad / grad.max() * (1 + rng.random(layers)),
        }
        if not update_ratio:
            del metrics["update_ratio"]
        writer.append_step(step, names, depths, metrics)
        if activations:
            sites = [f"{name}.act" for name in names[:-1]]
            writer.append_step(
                step,
                sites,
                depths[1:],
                {
                    "act_saturation": np.linspace(0.9, 0.1, len(sites))
                    if profile == "vanishing"
                    else np.full(len(sites), 0.02),
                    "act_dead": np.full(len(sites), np.nan),
                    "act_mean": np.zeros(len(sites)),
                    "act_std": np.ones(len(sites)),
                },
            )
        ratio = float(grad[0] / grad[-1])
        writer.append_global(
            step,
            {
                "global_grad_l2": float(np.sqrt((grad**2).sum())),
                "early_late_ratio": ratio,
                "grad_l2_min": float(grad.min()),
                "grad_l2_max": float(grad.max()),
                "loss": 1.0 / (1 + k),
            },
        )
        writer.flush()
    if not keep_open:
        writer.close()
    if run_info:
        info = {
            "gradlight_version": "0.1.0",
            "log_every_n_steps": every,
            "layers": [{"name": n, "depth": i, "num_params": 100} for i, n in enumerate(names)],
            "gradient_clip_val": clip,
            "gradient_clip_algorithm": "norm" if clip else None,
            "world_size": 1,
            "model": f"Synthetic{profile.title()}",
        }
        (save_dir / "run.json").write_text(json.dumps(info))
    if findings:
        with open(save_dir / "findings.jsonl", "w") as handle:
            for finding in findings:
                handle.write(json.dumps(finding) + "\n")
    return writer


def vanishing_finding(layer: str = "net.0", step: int = 100) -> dict[str, Any]:
    return {
        "kind": "vanishing",
        "layer": layer,
        "step": step,
        "reported_step": step + 30,
        "layers": [layer],
        "message": f"gradient of {layer} is 1e-07 of the last layer's",
        "cause": "saturating sigmoid activations stacked 8 deep",
        "remedy": "use ReLU/GELU, residual connections or normalization",
        "evidence": {"early_late_ratio": 1.2e-7, "threshold": 1e-3},
    }


def tear(writer: HistoryWriter, cut: int = 17) -> None:
    """Simulate a writer killed mid-write: no end marker and a partial last batch."""
    writer._sink.close()
    size = writer.path.stat().st_size
    with open(writer.path, "r+b") as handle:
        handle.truncate(size - cut)


# ------------------------------------------------------------------------------------------ the page
def test_single_run_report_embeds_every_figure_and_names_findings(tmp_path: Path) -> None:
    run = tmp_path / "vanishing"
    finding = vanishing_finding()
    saturated = {
        **vanishing_finding("net.2.act", 200),
        "kind": "saturated",
        "message": "net.2.act: 93% of outputs saturated",
        "remedy": "lower the init scale",
        "evidence": {"feeds": "net.4", "saturation": 0.93},
    }
    findings = [finding, saturated]
    write_run(run, findings=findings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean history gives no warning
        page_path = build_report([str(run)], tmp_path / "out", progress=False)
    assert page_path == tmp_path / "out" / "report.html"
    page = page_path.read_text()
    names = ["heatmap", "profile", "ratio", "global_norm", "update_ratio", "activations"]
    assert len(IMG.findall(page)) == len(names)
    for name in names:
        png = tmp_path / "out" / f"vanishing_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vanishing" in page and "Findings (2)" in page
    for item in findings:  # every finding in words, not only the first
        assert escape(item["message"]) in page and escape(item["remedy"]) in page, item["kind"]
    assert "early_late_ratio" in page and "1.20e-07" in page  # evidence
    assert "SyntheticVanishing" in page  # run.json
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "Comparison" not in page


def test_extra_sections_come_first_with_their_figures(tmp_path: Path) -> None:
    """A caller's own section (an experiment grid's results) sits above the runs' summary, figures embedded."""
    write_run(tmp_path / "run")
    figure = profile_figure(load_history(tmp_path / "run"))
    png = tmp_path / "mine.png"
    figure.figure.savefig(png, format="png")
    section = ExtraSection(
        "My grid", "<table><tr><td>7 variants</td></tr></table>", [ImageBlock("mine", "", png.read_bytes())]
    )
    page = build_report([tmp_path / "run"], tmp_path / "out", progress=False, extra_sections=[section]).read_text()
    assert page.index("<h2>My grid</h2>") < page.index("<td>7 variants</td>") < page.index("<h2>Summary</h2>")
    assert len(IMG.findall(page)) == 6 + 1  # the run's six figures and the section's one
    assert page.count("<h2>My grid</h2>") == 1 and page.rstrip().endswith("</html>")
    alone = render_page("Only mine", [], extra_sections=[section])
    assert "<h2>My grid</h2>" in alone and "<h2>Summary</h2>" not in alone and alone.rstrip().endswith("</html>")


def test_three_runs_compare_side_by_side(tmp_path: Path) -> None:
    for name, profile in (("a", "vanishing"), ("b", "healthy"), ("c", "exploding")):
        findings = [vanishing_finding()] if name == "a" else None
        write_run(tmp_path / name / "gradlight", profile, findings=findings, activations=False, update_ratio=False)
    runs = [f"sigmoid={tmp_path / 'a'}", f"relu={tmp_path / 'b' / 'gradlight'}", str(tmp_path / "c")]
    page = build_report(runs, tmp_path / "out", progress=False).read_text()
    assert len(IMG.findall(page)) == 3 * 4 + 2
    for label in ("sigmoid", "relu", "c"):
        assert f"Run: {label}" in page
    assert (tmp_path / "out" / "compare_profiles.png").exists()
    assert (tmp_path / "out" / "compare_ratios.png").exists()
    assert page.count("<tr><td>sigmoid</td>") == 1
    loaded = [load_run(tmp_path / n, n) for n in "abc"]
    profiles = compare_profiles_figure(loaded)
    np.testing.assert_allclose(profiles.data["a"]["last"], layer_grid(loaded[0].frame).values[:, -1])
    ratios = compare_ratios_figure(loaded)
    assert set(ratios.data) == {"a", "b", "c"}
    summaries = [summarize(run) for run in loaded]
    assert summaries[0].findings == 1 and summaries[1].findings == 0
    assert summaries[0].min_grad_l2_layer == "net.0"
    assert summaries[0].final_early_late_ratio < 1e-6 < summaries[1].final_early_late_ratio
    assert summaries[0].profile_slope == pytest.approx(1.0, abs=0.05)


def test_runs_with_different_depths_compare_on_relative_depth(tmp_path: Path) -> None:
    write_run(tmp_path / "a", layers=4)
    write_run(tmp_path / "b", layers=9)
    result = compare_profiles_figure([load_run(tmp_path / "a"), load_run(tmp_path / "b")])
    assert result.data["relative_depth"]
    assert result.data["b"]["x"][-1] == 1.0 and len(result.data["b"]["x"]) == 9


# -------------------------------------------------------------------------------- figures = history
def test_heatmap_array_equals_the_pivoted_history(tmp_path: Path) -> None:
    write_run(tmp_path, findings=[vanishing_finding("net.4", 50)])
    history = load_history(tmp_path)
    result = heatmap_figure(history, read_findings(tmp_path).records())
    grad = history[history.metric == "grad_l2"]
    pivot = grad.pivot(index="layer", columns="step", values="value")
    order = grad.drop_duplicates("layer").sort_values("depth")["layer"].tolist()
    np.testing.assert_array_equal(result.data["log10"], np.log10(pivot.loc[order].to_numpy()))
    assert result.data["layers"] == order
    assert result.data["steps"].tolist() == sorted(grad.step.unique())
    assert result.data["finding_rows"].tolist() == [order.index("net.4")]
    assert result.data["finding_steps"].tolist() == [50]
    as_object = SimpleNamespace(kind="dormant", layer="net.2", step=60)  # like gradlight.diagnosis.Finding
    assert heatmap_figure(history, [as_object]).data["finding_rows"].tolist() == [order.index("net.2")]


def test_heatmap_handles_zero_nan_and_missing(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path)
    for step in range(4):
        grad = np.array([0.0 if step == 1 else 1e-3, np.nan if step == 2 else 1.0, np.inf if step == 3 else 2.0])
        writer.append_step(step, ["a", "b", "c"], np.arange(3), {"grad_l2": grad})
    writer.append_step(4, ["a", "b"], np.arange(2), {"grad_l2": np.array([1.0, 1.0])})  # c not recorded
    writer.close()
    result = heatmap_figure(load_history(tmp_path))
    log = result.data["log10"]
    assert log[0, 1] == -np.inf and np.isnan(log[1, 2]) and log[2, 3] == np.inf and np.isnan(log[2, 4])
    legend = result.figure.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["zero", "NaN/inf", "not recorded"]
    result.figure.savefig(tmp_path / "h.png")
    profile = profile_figure(load_history(tmp_path))  # gaps on the log axis, no exception
    profile.figure.savefig(tmp_path / "p.png")


def test_profile_ratio_norm_and_layer_figures_match_history(tmp_path: Path) -> None:
    write_run(tmp_path, steps=31)
    history = load_history(tmp_path)
    profile = profile_figure(history)
    assert profile.data["steps"].tolist() == [0, 150, 300]
    grid = layer_grid(history)
    np.testing.assert_array_equal(profile.data["grad_l2"][2], grid.values[:, -1])
    np.testing.assert_allclose(profile.data["slopes"], 1.0, atol=0.06)
    ratio = ratio_figure(history)
    recorded = history[(history.layer == GLOBAL_LAYER) & (history.metric == "early_late_ratio")]
    np.testing.assert_array_equal(ratio.data["ratio"], recorded.value.to_numpy())
    norm = global_norm_figure(history, clip_value=1.0)
    assert norm.data["clip_value"] == 1.0 and len(norm.data["loss"]) == 31
    assert any("clip norm 1" in t.get_text() for t in norm.figure.axes[0].get_legend().get_texts())
    update = update_ratio_figure(history)
    assert update is not None
    np.testing.assert_array_equal(update.data["last"], layer_grid(history, "update_ratio").values[:, -1])
    acts = activation_figure(history)
    assert acts is not None and "act_dead" not in acts.data  # all NaN: panel left out
    assert acts.data["act_saturation"].shape == (7, 31)


def test_optional_figures_are_left_out_without_data(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path)
    writer.append_step(0, ["a", "b"], np.arange(2), {"grad_l2": np.array([1.0, 2.0])})
    writer.close()
    history = load_history(tmp_path)
    assert update_ratio_figure(history) is None and activation_figure(history) is None
    ratio = ratio_figure(history)  # computed from the layers when not recorded
    assert ratio.data["ratio"].tolist() == [0.5]
    page = build_report([tmp_path], tmp_path / "out", progress=False).read_text()
    assert len(IMG.findall(page)) == 4
    assert "run settings unknown" in page and "No findings" in page


def test_yolo_sized_model_renders(tmp_path: Path) -> None:
    names = [f"model.{i // 8}.cv{i % 3 + 1}.{i % 4}.{i % 2}.conv" for i in range(200)]
    names[-1] = "model.encoder.layers.11.self_attention.output_projection"
    write_run(tmp_path / "yolo", "mild", names=names, steps=12, activations=False)
    history = load_history(tmp_path / "yolo")
    result = heatmap_figure(history)
    result.figure.savefig(tmp_path / "heatmap.png", dpi=40)
    profile = profile_figure(history)
    names_shown = [t.get_text() for t in profile.figure.axes[0].get_xticklabels()]
    assert 2 <= len(names_shown) <= 24 and all(name.startswith("model.") for name in names_shown)  # names, thinned
    labels = [t.get_text() for t in result.figure.axes[0].get_yticklabels()]
    assert 10 <= len(labels) <= 50
    assert all(len(label) <= 29 for label in labels)


def test_shorten_label_keeps_the_end() -> None:
    assert shorten_label("model.23.cv3.2.2") == "model.23.cv3.2.2"
    short = shorten_label("model.encoder.layers.11.self_attention.output_projection", 24)
    assert short.startswith("…") and short.endswith("output_projection") and len(short) <= 25


def _lines(result: Any, gid: str) -> list[Any]:
    return [line for ax in result.figure.axes for line in ax.get_lines() if line.get_gid() == gid]


def _legend_texts(ax: Any) -> list[str]:
    legend = ax.get_legend()
    return [text.get_text() for text in legend.get_texts()] if legend is not None else []


def _zero_history(tmp_path: Path) -> Any:
    """Layer `a` gets exactly zero gradient from step 3 on, and stops moving from step 2 on."""
    writer = HistoryWriter(tmp_path)
    for step in range(6):
        grad = np.array([0.0 if step >= 3 else 1e-3, 1.0])
        update = np.array([0.0 if step >= 2 else 1e-4, 1e-3])
        writer.append_step(step, ["a", "b"], np.arange(2), {"grad_l2": grad, "update_ratio": update})
    writer.close()
    return load_history(tmp_path)


def test_log_plots_show_exact_zeros_on_the_bottom_edge(tmp_path: Path) -> None:
    history = _zero_history(tmp_path)
    ratio = ratio_figure(history)
    np.testing.assert_array_equal(ratio.data["ratio"][3:], 0.0)  # the data keep the zeros
    (zeros,) = _lines(ratio, "zeros")
    assert zeros.get_xdata().tolist() == [3, 4, 5]
    assert "0 (exactly)" in _legend_texts(ratio.figure.axes[0])
    ratio.figure.draw_without_rendering()
    assert ratio.figure.axes[0].get_xlim()[1] >= 5  # the axis reaches the zeros, not only the last positive step
    profile = profile_figure(history)  # steps 0, 2 and 5; at step 5 layer a (x = 0) is zero
    assert profile.data["steps"].tolist() == [0, 2, 5]
    assert [line.get_xdata().tolist() for line in _lines(profile, "zeros")] == [[0.0]]
    assert "0 (exactly)" in _legend_texts(profile.figure.axes[0])
    update = update_ratio_figure(history)
    assert update is not None and update.data["median"][0] == 0.0  # zeros count: the layer's median is 0
    assert update.data["last"].tolist() == [0.0, 1e-3]
    assert "0 (exactly)" in _legend_texts(update.figure.axes[0])
    positive = ratio_figure(load_history(_positive_run(tmp_path / "positive")))
    assert _lines(positive, "zeros") == [] and _legend_texts(positive.figure.axes[0]) == []


def _positive_run(save_dir: Path) -> Path:
    write_run(save_dir, steps=4, activations=False)
    return save_dir


def test_heatmap_marks_activation_site_findings_on_the_layer_they_feed(tmp_path: Path) -> None:
    write_run(tmp_path)
    history = load_history(tmp_path)
    findings = [
        {"kind": "saturated", "layer": "net.2.act", "step": 50, "evidence": {"feeds": "net.4"}, "layers": []},
        {"kind": "dead_units", "layer": "net.4.act", "step": 60, "layers": ["net.4.act", "net.6"]},
        {"kind": "dormant", "layer": "not.a.layer", "step": 70},  # nowhere to put it
    ]
    result = heatmap_figure(history, findings)
    order = result.data["layers"]
    assert result.data["finding_rows"].tolist() == [order.index("net.4"), order.index("net.6")]
    assert result.data["finding_steps"].tolist() == [50, 60]
    assert _legend_texts(result.figure.axes[0]) == ["saturated", "dead units"]
    as_object = SimpleNamespace(kind="saturated", layer="net.0.act", step=10, evidence={"feeds": "net.2"}, layers=[])
    assert heatmap_figure(history, [as_object]).data["finding_rows"].tolist() == [order.index("net.2")]
    assert "onset" in result.caption


def test_heatmap_colour_bar_is_labelled_at_whole_decades_up_to_the_top(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path)
    writer.append_step(0, ["a", "b", "c"], np.arange(3), {"grad_l2": np.array([2e-7, 1e-2, 10**1.5])})
    writer.close()
    result = heatmap_figure(load_history(tmp_path))
    ticks = result.data["colorbar_ticks"]
    assert ticks == [-8, -6, -4, -2, 0, 2]  # 10 decades (-7 to 2) need a stride of 2; both ends labelled
    colorbar_ax = result.figure.axes[1]
    assert colorbar_ax.get_ylim() == (-8.0, 2.0)
    assert colorbar_ax.get_yticks().tolist() == ticks
    writer = HistoryWriter(tmp_path / "short")
    writer.append_step(0, ["a", "b"], np.arange(2), {"grad_l2": np.array([2e-3, 5.0])})
    writer.close()
    assert heatmap_figure(load_history(tmp_path / "short")).data["colorbar_ticks"] == [-3, -2, -1, 0, 1]


def test_global_norm_has_a_legend_only_for_several_lines_and_a_log_loss(tmp_path: Path) -> None:
    write_run(tmp_path, steps=5, activations=False)
    history = load_history(tmp_path)
    alone = global_norm_figure(history)
    assert alone.figure.axes[0].get_legend() is None  # one line: the axis label says what it is
    assert alone.data["loss_log_scale"] and alone.figure.axes[1].get_yscale() == "log"
    assert _legend_texts(global_norm_figure(history, clip_value=1.0).figure.axes[0]) == [
        "global gradient norm",
        "clip norm 1",
    ]
    negative = history.copy()
    loss_rows = negative.index[(negative.layer == GLOBAL_LAYER) & (negative.metric == "loss")]
    negative.loc[loss_rows[0], "value"] = -0.5  # e.g. a negative log-likelihood bonus: no log scale
    linear = global_norm_figure(negative)
    assert not linear.data["loss_log_scale"] and linear.figure.axes[1].get_yscale() == "linear"


def test_activation_sites_are_markers_with_min_max_bars_not_joined(tmp_path: Path) -> None:
    write_run(tmp_path, steps=5)
    history = load_history(tmp_path)
    result = activation_figure(history)
    assert result is not None
    ax = result.figure.axes[0]
    assert all(line.get_linestyle() == "None" for line in ax.get_lines())  # no line joins two sites
    assert not any(type(c).__name__.endswith("PolyCollection") for c in ax.collections)  # no band
    # What a reader sees: one vertical bar per site, from its smallest to its largest value over the steps.
    bars = [segment for c in ax.collections for segment in getattr(c, "get_segments", list)()]
    values = result.data["act_saturation"] * 100
    spans = sorted((float(seg[0][0]), *sorted((float(seg[0][1]), float(seg[1][1])))) for seg in bars)
    expected = sorted(zip(np.arange(len(values), dtype=float), values.min(axis=1), values.max(axis=1)))
    assert len(spans) == len(expected)
    np.testing.assert_allclose(np.array(spans), np.array(expected, dtype=float))


def _labels_overlap(result: Any) -> bool:
    """Whether two neighbouring x tick labels of the drawn figure overlap on the page.

    Horizontal labels overlap when their rendered boxes do; labels rotated by ``a`` form parallel strips, which
    overlap when their horizontal spacing times ``sin(a)`` is less than the text's height.
    """
    import itertools
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = result.figure
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    labels = [label for label in figure.axes[0].get_xticklabels() if label.get_text()]
    for left, right in itertools.pairwise(labels):
        angle = math.radians(left.get_rotation())
        if angle == 0.0:
            if left.get_window_extent(renderer).overlaps(right.get_window_extent(renderer)):
                return True
            continue
        spacing = abs(right.get_window_extent(renderer).x1 - left.get_window_extent(renderer).x1)
        height = left.get_fontsize() * figure.dpi / 72
        if spacing * math.sin(angle) < height:
            return True
    return False


def test_layer_labels_stay_readable_short_or_long(tmp_path: Path) -> None:
    """Short and long layer names alike: every layer is labelled and no two labels overlap."""
    write_run(tmp_path / "short", steps=3, activations=False)
    names = [f"backbone.stage{i}.block.conv_{i}" for i in range(12)]
    write_run(tmp_path / "long", names=names, steps=3, activations=False)
    for run, count in (("short", None), ("long", len(names))):
        result = profile_figure(load_history(tmp_path / run))
        labels = [label.get_text() for label in result.figure.axes[0].get_xticklabels() if label.get_text()]
        if count is not None:
            assert len(labels) == count
        assert not _labels_overlap(result), run


def test_many_runs_stay_distinguishable(tmp_path: Path) -> None:
    assert "#f0e442" not in RUN_COLORS  # the yellow that hardly shows on white
    assert len({(run_style(i)["color"], str(run_style(i)["linestyle"])) for i in range(32)}) == 32
    runs = []
    for i in range(9):
        write_run(tmp_path / f"r{i}", steps=3, activations=False, update_ratio=False)
        runs.append(load_run(tmp_path / f"r{i}", f"run{i}"))
    for result in (compare_ratios_figure(runs), compare_profiles_figure(runs)):
        lines = [line for line in result.figure.axes[0].get_lines() if line.get_label().startswith("run")]
        assert len(lines) == 9
        assert len({(line.get_color(), str(line.get_linestyle())) for line in lines}) == 9, result.name
    ninth = next(line for line in compare_ratios_figure(runs).figure.axes[0].get_lines() if line.get_label() == "run8")
    assert ninth.get_color() == RUN_COLORS[0] and ninth.get_linestyle() == "--" and ninth.get_marker() == "s"


def test_figures_use_readable_metric_names(tmp_path: Path) -> None:
    write_run(tmp_path / "a", clip=1.0)
    write_run(tmp_path / "b", "healthy")
    runs = [load_run(tmp_path / "a"), load_run(tmp_path / "b")]
    results = [*run_figures(runs[0]), compare_profiles_figure(runs), compare_ratios_figure(runs)]
    assert len(results) == 8
    assert results[0].title == "Gradient L2 norm per layer and step"
    for result in results:
        for ax in result.figure.axes:
            texts = [ax.get_title(loc) for loc in ("left", "center", "right")] + [ax.get_xlabel(), ax.get_ylabel()]
            texts += _legend_texts(ax)
            raw = [text for text in texts if re.search(r"grad_l2|update_ratio|act_\w+|early_late", text)]
            assert raw == [], (result.name, raw)


# ----------------------------------------------------------------------------------- reading inputs
def test_truncated_history_is_reported_with_a_warning(tmp_path: Path) -> None:
    writer = write_run(tmp_path / "torn", steps=5, keep_open=True, run_info=False)
    tear(writer)
    run = load_run(tmp_path / "torn")  # the full page is checked through the CLI in test_cli.py
    assert run.truncated and "truncated" in run.warnings[0] and "steps 0-30" in run.warnings[0]
    assert summarize(run).last_step == 30  # steps 0..30 readable, 40 torn
    with pytest.warns(TruncatedHistoryWarning, match="truncated"):
        load_history(tmp_path / "torn")  # what the page says is what gradlight.history says


def test_torn_last_findings_line_is_skipped(tmp_path: Path) -> None:
    write_run(tmp_path, findings=[vanishing_finding(), vanishing_finding("net.2")])
    with open(tmp_path / "findings.jsonl", "a") as handle:
        handle.write('{"kind": "exploding", "lay')
    read = read_findings(tmp_path)
    findings, skipped = read.records(), len(read.skipped)
    assert [f["layer"] for f in findings] == ["net.0", "net.2"] and skipped == 1
    run = load_run(tmp_path)
    assert any("skipped 1 unreadable line" in w for w in run.warnings)


def test_findings_a_resumed_run_wrote_twice_are_counted_once(tmp_path: Path) -> None:
    first = vanishing_finding("net.0", 100)
    again = {**first, "reported_step": 130, "message": "recomputed after the resume"}  # same kind, layer, step
    dormant = {**vanishing_finding("net.2", 110), "kind": "dormant", "message": "net.2 does not move"}
    write_run(tmp_path, findings=[first, dormant, again])
    read = read_findings(tmp_path)
    findings, skipped = read.records(), len(read.skipped)
    api = load_findings(tmp_path)  # what gradlight.diagnosis returns
    assert skipped == 0 and len(findings) == len(api) == 2
    assert [(f["kind"], f["layer"], f["step"]) for f in findings] == list(zip(api.kind, api.layer, api.step))
    assert next(f for f in findings if f["kind"] == "vanishing")["message"] == "recomputed after the resume"
    assert all(isinstance(f["step"], int) and isinstance(f["reported_step"], int) for f in findings)
    run = load_run(tmp_path)
    assert summarize(run).findings == 2 and summarize(run).findings_by_kind == {"vanishing": 1, "dormant": 1}
    page = build_report([tmp_path], tmp_path / "out", progress=False).read_text()
    assert "Findings (2)" in page and "recomputed after the resume" in page
    assert escape(first["message"]) not in page


def test_the_report_reads_findings_with_the_run_folders_rules(tmp_path: Path) -> None:
    write_run(tmp_path)
    lines = [
        {"kind": "dormant", "layer": "net.2", "message": "no step"},  # no integer step: skipped
        {**vanishing_finding(), "message": "old copy"},
        {**vanishing_finding(), "message": "new copy"},
        [1, 2],  # not an object
    ]
    (tmp_path / "findings.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    read = read_findings(tmp_path)
    findings, skipped = read.records(), len(read.skipped)
    assert skipped == 2  # the line without a step and the one that is not an object, as gradlight.runfolder
    assert [(f["kind"], f["step"], f["message"]) for f in findings] == [("vanishing", 100, "new copy")]
    api = load_findings(tmp_path)
    assert list(api.message) == ["new copy"]


class RecordingBar:
    """Stands in for tqdm: records what the report tells its progress bars."""

    def __init__(self, bars: list[RecordingBar], **kwargs: Any) -> None:
        self.total, self.desc, self.disable = kwargs["total"], kwargs["desc"], kwargs["disable"]
        self.updates: list[int] = []
        self.postfixes: list[str] = []
        bars.append(self)

    def update(self, n: int = 1) -> None:
        self.updates.append(n)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfixes.append(text)

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _resumed_run(save_dir: Path) -> list[Path]:
    """30 record batches in a first segment, 5 in a second one (a run resumed at step 200)."""
    write_run(save_dir, findings=[vanishing_finding()])
    writer = HistoryWriter(save_dir, start_step=200)
    for step in range(200, 250, 10):
        writer.append_step(step, [f"net.{2 * i}" for i in range(8)], np.arange(8), {"grad_l2": np.ones(8)})
        writer.flush()
    writer.close()
    return sorted((save_dir / "history").glob("segment-*.arrow"))


def test_progress_advances_per_record_batch_segment_and_figure(tmp_path: Path, monkeypatch: Any) -> None:
    segments = _resumed_run(tmp_path / "a")
    write_run(tmp_path / "b", "healthy")
    bars: list[RecordingBar] = []
    monkeypatch.setattr("gradlight.report.tqdm", lambda **kwargs: RecordingBar(bars, **kwargs))
    build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out", progress=True)
    reading, drawing = bars
    assert reading.desc == "reading" and drawing.desc == "drawing" and not reading.disable
    sizes = sum(path.stat().st_size for path in segments) + sum(
        path.stat().st_size for path in (tmp_path / "b" / "history").glob("segment-*.arrow")
    )
    assert reading.total == sum(reading.updates) == sizes
    assert len(reading.updates) >= 30 + 5 + 30  # one update per record batch at least: the bar moves while reading
    assert reading.postfixes == ["a", "b"]
    assert drawing.total == 2 * 6 + 3 + 1 and drawing.updates == [1] * drawing.total  # 3 comparison figures
    assert drawing.postfixes == ["a", "b", "comparison", "report.html"]
    bars.clear()
    build_report([tmp_path / "b"], tmp_path / "quiet", progress=False)
    assert [bar.disable for bar in bars] == [True, True]


def test_progress_bars_are_drawn_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "run", steps=5, activations=False)
    build_report([tmp_path / "run"], tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "reading:" in err and "drawing:" in err and "figure" in err
    build_report([tmp_path / "run"], tmp_path / "out2", progress=False)
    assert capsys.readouterr().err == ""


def test_history_reader_reports_the_bytes_of_every_batch_and_segment(tmp_path: Path) -> None:
    segments = _resumed_run(tmp_path)
    tear(write_run(tmp_path / "torn", steps=5, keep_open=True))
    for save_dir, files in ((tmp_path, segments), (tmp_path / "torn", [writer_path(tmp_path / "torn")])):
        calls: list[int] = []
        result = read_history(save_dir, progress=calls.append)
        assert sum(calls) == sum(path.stat().st_size for path in files)  # torn tails included
        assert len(calls) >= sum(segment.rows > 0 for segment in result.segments) and all(n > 0 for n in calls)
    assert len(calls) >= 5  # the 4 complete batches of the torn segment, then its tail


def writer_path(save_dir: Path) -> Path:
    (path,) = (save_dir / "history").glob("segment-*.arrow")
    return path


def test_bad_inputs_raise_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportInputError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ReportInputError, match="no gradlight history"):
        load_run(tmp_path / "plain")
    (tmp_path / "empty" / "history").mkdir(parents=True)
    with pytest.raises(ReportInputError, match="empty"):
        load_run(tmp_path / "empty")
    HistoryWriter(tmp_path / "zero").close()
    (tmp_path / "zero" / "history" / "segment-00000.arrow").write_bytes(b"")
    with pytest.raises(ReportInputError, match="nothing is readable"):
        load_run(tmp_path / "zero")
    with pytest.raises(ReportInputError, match="single '='"):
        parse_run_spec("a=b=c")
    with pytest.raises(ReportInputError, match="empty label"):
        parse_run_spec(f"={tmp_path}")
    write_run(tmp_path / "ok")
    with pytest.raises(ReportInputError, match="duplicate run label"):
        resolve_run_specs([f"x={tmp_path / 'ok'}", f"x={tmp_path / 'ok'}"])


def test_run_folder_search(tmp_path: Path) -> None:
    write_run(tmp_path / "logs" / "version_0" / "gradlight")
    assert resolve_run_dir(tmp_path / "logs") == tmp_path / "logs" / "version_0" / "gradlight"
    assert resolve_run_dir(tmp_path / "logs" / "version_0" / "gradlight" / "history").name == "gradlight"
    write_run(tmp_path / "logs" / "version_1" / "gradlight")
    with pytest.raises(ReportInputError, match="holds 2 gradlight histories") as info:
        resolve_run_dir(tmp_path / "logs")
    assert "version_0" in str(info.value) and "version_1" in str(info.value)
    labels = resolve_run_specs([tmp_path / "logs" / "version_0", tmp_path / "logs" / "version_1"])
    assert [label for label, _ in labels] == ["version_0", "version_1"]


def test_default_labels_fall_back_to_paths_when_they_collide(tmp_path: Path) -> None:
    write_run(tmp_path / "a" / "run")
    write_run(tmp_path / "b" / "run")
    labels = [label for label, _ in resolve_run_specs([tmp_path / "a" / "run", tmp_path / "b" / "run"])]
    assert labels == [str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")]


# ------------------------------------------------------------------------------------------- loggers
class FakeExperiment:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def add_figure(self, tag: str, figure: Any, global_step: int, close: bool = True) -> None:
        self.calls.append(("figure", tag, global_step, type(figure).__name__))

    def add_histogram(self, tag: str, values: Any, global_step: int) -> None:
        self.calls.append(("histogram", tag, global_step, np.asarray(values).tolist()))


class FakeTensorBoard:
    def __init__(self) -> None:
        self.experiment = FakeExperiment()


class FakeWandb:
    def __init__(self) -> None:
        self.images: list[tuple[str, tuple[int, ...], int | None]] = []

    def log_image(self, key: str, images: list[Any], step: int | None = None) -> None:
        self.images.append((key, np.asarray(images[0]).shape, step))


class FakeMlflowClient:
    def __init__(self) -> None:
        self.figures: list[tuple[str, str]] = []

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        self.figures.append((run_id, artifact_file))


class FakeMlflow:
    run_id = "abc"

    def __init__(self) -> None:
        self.experiment = FakeMlflowClient()


class FakeCsv:
    experiment = object()


class BrokenTensorBoard:
    class experiment:
        @staticmethod
        def add_figure(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("disk full")


def test_log_figures_goes_to_every_logger_that_takes_images(tmp_path: Path) -> None:
    from gradlight.report.loggers import log_figures, logger_kind

    write_run(tmp_path, steps=4, activations=False)
    tb, wandb, mlflow, csv = FakeTensorBoard(), FakeWandb(), FakeMlflow(), FakeCsv()
    assert [logger_kind(x) for x in (tb, wandb, mlflow, csv)] == ["tensorboard", "wandb", "mlflow", "none"]
    sent = log_figures([tb, wandb, mlflow, csv], load_history(tmp_path), step=7, findings=[vanishing_finding()])
    assert sent == 6
    assert tb.experiment.calls == [
        ("figure", "gradflow/heatmap", 7, "Figure"),
        ("figure", "gradflow/profile", 7, "Figure"),
    ]
    assert [(key, shape[-1], step) for key, shape, step in wandb.images] == [
        ("gradflow/heatmap", 3, 7),
        ("gradflow/profile", 3, 7),
    ]
    assert mlflow.experiment.figures == [
        ("abc", "gradflow/heatmap/step-0000007.png"),
        ("abc", "gradflow/profile/step-0000007.png"),
    ]
    assert log_figures([csv], tmp_path, step=7) == 0  # nothing takes images: nothing is drawn
    with pytest.warns(RuntimeWarning, match="disk full"):
        assert log_figures([BrokenTensorBoard(), tb], tmp_path, step=8, figures=["profile"]) == 1
    with pytest.raises(ValueError, match="unknown figure"):
        log_figures([tb], tmp_path, step=8, figures=["pie"])


def test_gradient_histograms_go_to_tensorboard_only() -> None:
    import torch

    from gradlight.report.loggers import log_gradient_histograms

    tb, wandb = FakeTensorBoard(), FakeWandb()
    grads = {"net.0": torch.tensor([1.0, float("nan"), 3.0], dtype=torch.bfloat16), "net.2": None}
    assert log_gradient_histograms([tb, wandb], grads, step=3) == 1
    assert tb.experiment.calls == [("histogram", "gradflow/grad/net.0", 3, [1.0, 3.0])]
