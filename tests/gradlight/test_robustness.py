"""Setups a user can build that used to crash training, lose records or stay silent (issue 23).

Every statistic is compared with a reference computed here, independently of gradlight.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradlight import GradientFlowRecorder, load_findings, load_history
from gradlight.diagnosis import ModelProfile
from gradlight.history import CorruptHistoryWarning, HistoryWriter, TruncatedHistoryWarning, read_history
from gradlight.recorder import HistoryExistsError
from gradlight.stats import gradient_statistics, nonfinite_counts, plain_gradients
from gradlight.tracker import GradientFlowTracker


def _train(
    model: nn.Module,
    save_dir: Path | None,
    steps: int,
    make_loss: Callable[[nn.Module], torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    **kwargs: object,
) -> tuple[GradientFlowRecorder, dict[int, dict[str, torch.Tensor]]]:
    """A plain loop; returns the recorder and each step's gradients (cloned before the step)."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.05)
    recorder = GradientFlowRecorder(model, save_dir, log_every_n_steps=1, **kwargs)  # type: ignore[arg-type]
    grads: dict[int, dict[str, torch.Tensor]] = {}
    for step in range(steps):
        loss = make_loss(model)
        loss.backward()
        grads[step] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        recorder.capture(step, optimizer)
        optimizer.step()
        recorder.end_step(loss)
        optimizer.zero_grad()
    recorder.close()
    return recorder, grads


def _value(history: object, step: int, layer: str, metric: str) -> float:
    rows = history[(history.step == step) & (history.layer == layer) & (history.metric == metric)]  # type: ignore[index]
    assert len(rows) == 1
    return float(rows.value.iloc[0])


# ------------------------------------------------------------------------------------------- sparse gradients
def test_uncoalesced_sparse_gradient_statistics_are_those_of_the_coalesced_gradient() -> None:
    # index 1 appears twice: the gradient applied there is 3 + 1 = 4 (raw values would give norm sqrt(9+1+4))
    grad = torch.sparse_coo_tensor([[1, 1, 3]], [3.0, 1.0, -2.0], (5,), check_invariants=True)
    assert not grad.is_coalesced()
    dense = grad.to_dense()
    squares, largest = gradient_statistics([grad, torch.tensor([1.0, -6.0])])
    assert squares.tolist() == pytest.approx([float(dense.pow(2).sum()), 37.0], rel=1e-6)
    assert largest.tolist() == [float(dense.abs().max()), 6.0]
    overflowing = torch.sparse_coo_tensor([[0, 0]], [float("inf"), 1.0], (3,), check_invariants=True)
    assert nonfinite_counts([overflowing]).tolist() == [1.0]


def test_sparse_embedding_with_sgd_records_the_coalesced_gradient(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 4, sparse=True))
    index = torch.tensor([[1, 1, 2, 5], [5, 1, 7, 7]])  # repeated indices: an uncoalesced gradient
    _, grads = _train(model, tmp_path, 3, lambda m: m(index).pow(2).sum())
    history = load_history(tmp_path)
    for step, step_grads in grads.items():
        dense = step_grads["0.weight"].to_dense()
        assert _value(history, step, "0", "grad_l2") == pytest.approx(float(dense.norm()), rel=1e-6)
        assert _value(history, step, "0", "grad_max_abs") == pytest.approx(float(dense.abs().max()), rel=1e-6)
        assert _value(history, step, "0", "grad_nonfinite") == 0.0


# ------------------------------------------------------------------------------------------ complex parameters
def test_complex_gradient_statistics_are_those_of_the_magnitudes() -> None:
    grad = torch.tensor([3 + 4j, -1j, 0j], dtype=torch.cfloat)
    squares, largest = gradient_statistics([grad])
    assert squares.tolist() == pytest.approx([26.0])
    assert largest.tolist() == pytest.approx([5.0])
    assert plain_gradients([grad])[0].tolist() == pytest.approx([5.0, 1.0, 0.0])


def test_complex_linear_is_recorded_as_magnitudes_without_a_casting_warning(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, dtype=torch.cfloat), nn.Linear(8, 1))
    x = torch.randn(4, 8, dtype=torch.cfloat)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, grads = _train(model, tmp_path, 3, lambda m: m[1](m[0](x).abs()).pow(2).sum(), optimizer)
    assert not [w for w in caught if "complex" in str(w.message).lower()]
    history = load_history(tmp_path)
    for step, step_grads in grads.items():
        weight, bias = (torch.view_as_real(step_grads[f"0.{n}"]).double() for n in ("weight", "bias"))
        expected = float((weight.pow(2).sum() + bias.pow(2).sum()).sqrt())
        largest = float(torch.cat([step_grads["0.weight"].abs().flatten(), step_grads["0.bias"].abs()]).max())
        assert _value(history, step, "0", "grad_l2") == pytest.approx(expected, rel=1e-5)
        assert _value(history, step, "0", "grad_max_abs") == pytest.approx(largest, rel=1e-6)


def test_model_profile_reads_complex_weights_without_casting_them() -> None:
    model = nn.Sequential(nn.Linear(8, 8, dtype=torch.cfloat), nn.Linear(8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "discards the imaginary part" warning fails the test
        profile = ModelProfile.from_tracker(GradientFlowTracker(model))
    assert profile is not None


# ------------------------------------------------------------------------------------------------ lost records
def _regression(seed: int) -> Callable[[nn.Module], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def loss(model: nn.Module) -> torch.Tensor:
        x = torch.randn(8, 4, generator=generator)
        return (model(x) - x.sum(1, keepdim=True)).pow(2).mean()

    return loss


def test_state_dict_flushes_so_a_run_killed_after_its_checkpoint_resumes_without_a_gap(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    recorder = GradientFlowRecorder(model, tmp_path, log_every_n_steps=1, flush_every_n_records=100)
    loss_fn = _regression(0)
    checkpoint = {}
    for step in range(10):
        loss = loss_fn(model)
        loss.backward()
        recorder.capture(step, optimizer)
        optimizer.step()
        recorder.end_step(loss)
        optimizer.zero_grad()
        if step == 5:
            checkpoint = {"step": step, "model": model.state_dict(), "recorder": recorder.state_dict()}
            checkpoint["model"] = {k: v.clone() for k, v in checkpoint["model"].items()}
    del recorder  # killed at step 9: never closed, its buffered records lost
    model.load_state_dict(checkpoint["model"])
    resumed = GradientFlowRecorder(model, tmp_path, log_every_n_steps=1)
    resumed.load_state_dict(checkpoint["recorder"])
    for step in range(checkpoint["step"] + 1, 12):
        loss = loss_fn(model)
        loss.backward()
        resumed.capture(step, optimizer)
        optimizer.step()
        resumed.end_step(loss)
        optimizer.zero_grad()
    resumed.close()
    history = load_history(tmp_path, metrics=["grad_l2"])
    rows = history[history.layer == "0"]
    assert rows.step.tolist() == list(range(12))  # every step, once


def test_epoch_loop_whose_step_restarts_keeps_every_epoch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    recorder = GradientFlowRecorder(model, tmp_path, log_every_n_steps=2)
    loss_fn = _regression(0)
    captured = []
    with pytest.warns(UserWarning, match=r"step 0 came after step 4 \(last recorded: 4\).*recorded as step 5") as seen:
        for _epoch in range(3):
            for step in range(5):  # the README's `for step, (x, y) in enumerate(loader)`
                loss = loss_fn(model)
                loss.backward()
                captured.append(recorder.capture(step, optimizer))
                optimizer.step()
                recorder.end_step(loss)
                optimizer.zero_grad()
    recorder.close()
    assert sum("went back" in str(w.message) for w in seen) == 1  # once, not at every epoch
    steps = sorted(load_history(tmp_path, metrics=["grad_l2"]).step.unique().tolist())
    assert steps == [0, 2, 4, 6, 8, 10, 12, 14]
    assert sum(captured) == 8


def test_epoch_loop_resumed_from_a_checkpoint_continues_the_numbering(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    recorder = GradientFlowRecorder(model, tmp_path, log_every_n_steps=1)
    loss_fn = _regression(0)
    state = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in range(2):
            for step in range(3):
                loss = loss_fn(model)
                loss.backward()
                recorder.capture(step, optimizer)
                optimizer.step()
                recorder.end_step(loss)
                optimizer.zero_grad()
            if epoch == 0:
                state = recorder.state_dict()
        del recorder  # killed in the second epoch; resumed from the end of the first
        resumed = GradientFlowRecorder(model, tmp_path, log_every_n_steps=1)
        resumed.load_state_dict(state)
        for step in range(3):
            loss = loss_fn(model)
            loss.backward()
            resumed.capture(step, optimizer)
            optimizer.step()
            resumed.end_step(loss)
            optimizer.zero_grad()
        resumed.close()
    steps = load_history(tmp_path, metrics=["grad_l2"]).step.tolist()
    assert steps == [0, 1, 2, 3, 4, 5]


# --------------------------------------------------------------------------------------- silent API results
def test_load_findings_of_a_path_that_is_not_a_run_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"typo.*does not exist"):
        load_findings(tmp_path / "typo")
    with pytest.raises(FileNotFoundError, match="no gradlight history in"):
        load_findings(tmp_path)
    _train(nn.Linear(2, 1), tmp_path / "off", 1, lambda m: m(torch.ones(1, 2)).sum(), diagnose=False)
    with pytest.raises(FileNotFoundError, match="diagnose=False"):
        load_findings(tmp_path / "off")
    _train(nn.Linear(2, 1), tmp_path / "on", 1, lambda m: m(torch.ones(1, 2)).sum())
    assert load_findings(tmp_path / "on").empty  # a run that found nothing is still an empty frame


def _frozen() -> nn.Module:
    return nn.Linear(2, 1).requires_grad_(False)


class _NoParameters(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(1, keepdim=True)


@pytest.mark.parametrize(
    ("build", "exclude", "message"),
    [
        (lambda: nn.Linear(2, 1), ["*"], r"`exclude` \('\*',\) leaves no parameter to monitor"),
        (_frozen, [], "every parameter of the model is frozen"),
        (_NoParameters, [], "the model has no parameters"),
        (lambda: nn.Linear(2, 1), ["head.*"], "`exclude` pattern 'head.\\*' matches no parameter name"),
    ],
    ids=["exclude-all", "all-frozen", "no-parameters", "exclude-matches-nothing"],
)
def test_a_setup_that_records_nothing_or_excludes_nothing_warns_at_construction(
    tmp_path: Path, build: Callable[[], nn.Module], exclude: list[str], message: str
) -> None:
    model = build()
    with pytest.warns(UserWarning, match=message):
        recorder = GradientFlowRecorder(model, tmp_path, log_every_n_steps=1, exclude=exclude)
    x = torch.ones(3, 2, requires_grad=True)  # training goes on: no crash at any step
    for step in range(3):
        model(x).sum().backward()
        recorder.capture(step, list(model.parameters()))
        recorder.end_step(0.0)
    recorder.close()


def test_a_healthy_setup_gets_no_setup_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradientFlowRecorder(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), tmp_path, exclude=["0.*"])


def test_a_reused_save_dir_is_reported_at_construction(tmp_path: Path) -> None:
    _train(nn.Linear(2, 1), tmp_path, 1, lambda m: m(torch.ones(1, 2)).sum())
    with pytest.warns(UserWarning, match="already holds a history.*load_state_dict"):
        recorder = GradientFlowRecorder(nn.Linear(2, 1), tmp_path)
    with pytest.raises(HistoryExistsError):
        recorder.open()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradientFlowRecorder(nn.Linear(2, 1), tmp_path, overwrite=True)


# --------------------------------------------------------------------------------------- damaged history files
def _segment_with_batch_offsets(save_dir: Path, steps: int) -> tuple[Path, list[int]]:
    """A closed segment of one batch per step, and the file size after each batch."""
    writer = HistoryWriter(save_dir)
    ends = []
    for step in range(steps):
        writer.append_step(step, ["fc1", "fc2"], np.array([0, 1]), {"grad_l2": np.array([0.5, 1.0]) * (step + 1)})
        writer.flush()
        ends.append(writer.path.stat().st_size)
    writer.close()
    return writer.path, ends


@pytest.mark.parametrize("where", ["message", "values"])
def test_zeroed_bytes_inside_a_segment_are_reported_as_corruption_keeping_earlier_rows(
    tmp_path: Path, where: str
) -> None:
    path, ends = _segment_with_batch_offsets(tmp_path, 5)
    data = bytearray(path.read_bytes())
    start = ends[1] if where == "message" else ends[2] - 24  # a batch's framing, or the last values of a batch
    data[start : start + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = load_history(tmp_path)
    corrupt = [w for w in caught if issubclass(w.category, CorruptHistoryWarning)]
    assert len(corrupt) == 1 and str(path) in str(corrupt[0].message)
    assert not [w for w in caught if issubclass(w.category, TruncatedHistoryWarning)]
    assert sorted(history.step.unique().tolist()) == [0, 1]  # the two batches before the damage
    assert (history.metric != "").all() and (history.layer != "").all()
    assert history.value.tolist() == [0.5, 1.0, 1.0, 2.0]
    assert read_history(tmp_path).corrupt


def test_a_segment_of_random_bytes_is_corruption_not_a_torn_write(tmp_path: Path) -> None:
    path, _ = _segment_with_batch_offsets(tmp_path, 3)
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(0).bytes(size))
    with pytest.warns(CorruptHistoryWarning, match="segment-00000.arrow is corrupt"):
        history = load_history(tmp_path)
    assert history.empty
    (segment,) = read_history(tmp_path).segments
    assert segment.corrupt and not segment.truncated


def test_a_torn_tail_is_still_a_torn_write(tmp_path: Path) -> None:
    path, ends = _segment_with_batch_offsets(tmp_path, 3)
    with open(path, "r+b") as handle:
        handle.truncate(ends[1] + 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = load_history(tmp_path)
    assert [w.category for w in caught] == [TruncatedHistoryWarning]
    assert sorted(history.step.unique().tolist()) == [0, 1]


def test_no_damage_anywhere_in_a_segment_crashes_the_reader_or_returns_a_wrong_value(tmp_path: Path) -> None:
    path, _ = _segment_with_batch_offsets(tmp_path, 4)
    data = path.read_bytes()
    original = read_history(tmp_path).frame
    for start in range(0, len(data) - 8, 23):
        damaged = bytearray(data)
        damaged[start : start + 16] = bytes(len(damaged[start : start + 16]))
        path.write_bytes(bytes(damaged))
        result = read_history(tmp_path)
        kept = result.frame
        if not (result.corrupt or result.truncated):
            assert kept.equals(original), f"zeroed at {start}: damage read as data"
            continue
        assert result.corrupt, f"zeroed at {start}: damage in the middle read as a torn write"
        # what is kept is whole batches from the start, with their values
        assert kept.empty or kept.equals(original.iloc[: len(kept)]), f"zeroed at {start}"


def test_resume_at_an_earlier_step_is_a_resume_not_a_restart(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    recorder = GradientFlowRecorder(model, tmp_path, log_every_n_steps=1)
    loss_fn = _regression(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the step went back" warning: the caller said it goes back
        for steps in (range(6), range(3, 5)):
            if steps.start:
                recorder.resume_at(steps.start)
            for step in steps:
                loss = loss_fn(model)
                loss.backward()
                recorder.capture(step, optimizer)
                optimizer.step()
                recorder.end_step(loss)
                optimizer.zero_grad()
            recorder.close()
    assert load_history(tmp_path, metrics=["grad_l2"]).step.tolist() == [0, 1, 2, 3, 4]
