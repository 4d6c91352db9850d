"""The loss as evidence, on a real model (Hugging Face GPT-2 built from a config): a loss climbing while the
gradients are ordinary, a loss stuck at chance, and a healthy noisy loss (small batches, warm-up, a cosine
restart) that must raise nothing."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from gradlight import DiagnosisConfig, Finding, GradientFlowRecorder
from gradlight.diagnosis.detectors.loss_curve import mann_kendall_z

LOSS_KINDS = {"loss_rising", "loss_oscillating", "loss_plateau"}


def _gpt2(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    hf_logging.set_verbosity_error()
    config = GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def _batches(vocab: int, batch: int, learnable: bool) -> Iterator[torch.Tensor]:
    """Learnable: arithmetic sequences mod ``vocab``; else uniform random tokens (nothing to learn: chance)."""
    generator = torch.Generator().manual_seed(0)
    while True:
        if not learnable:
            yield torch.randint(0, vocab, (batch, 16), generator=generator)
            continue
        start = torch.randint(0, vocab, (batch, 1), generator=generator)
        stride = torch.randint(1, 4, (batch, 1), generator=generator)
        yield (start + stride * torch.arange(16)) % vocab


def _train(
    steps: int,
    vocab: int = 128,
    batch: int = 8,
    learnable: bool = True,
    flip: bool = False,
    make_optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> tuple[list[Finding], list[float]]:
    """A plain loop with the recorder on every step; ``flip`` runs backward on ``-loss`` and reports ``loss``."""
    model = _gpt2(vocab)
    optimizer = (make_optimizer or (lambda p: torch.optim.AdamW(p, lr=1e-3)))(model.parameters())
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    recorder = GradientFlowRecorder(model, None, log_every_n_steps=1, warn=lambda message: None)
    data = _batches(vocab, batch, learnable)
    findings: list[Finding] = []
    losses: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            tokens = next(data)
            loss = model(tokens, labels=tokens).loss
            (-loss if flip else loss).backward()
            recorder.capture(step, optimizer)
            optimizer.step()
            findings += recorder.end_step(loss)
            optimizer.zero_grad()
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
    recorder.close()
    return findings, losses


def _of(findings: list[Finding], kind: str) -> list[Finding]:
    return [f for f in findings if f.kind == kind and f.is_warning]


@pytest.mark.parametrize("how", ["flipped_sign", "maximize"])
def test_a_loss_that_climbs_while_gradients_are_ordinary_is_loss_rising(how: str) -> None:
    if how == "flipped_sign":  # backward on -loss, the loss reported as is
        findings, losses = _train(50, flip=True)
        expected_rule = "ascent"
    else:
        findings, losses = _train(50, make_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, maximize=True))
        expected_rule = "optimizer_maximizes"
    assert losses[-1] > losses[0]  # the fault is in effect
    rising = _of(findings, "loss_rising")
    assert len(rising) == 1, [f.message for f in findings]
    finding = rising[0]
    assert finding.layer == "__global__" and finding.reported_step < 50
    assert finding.evidence["rules"][0] == expected_rule
    assert finding.evidence["loss_recent"] > finding.evidence["loss_initial"]
    assert not _of(findings, "exploding")  # ordinary gradients: the loss is the only evidence
    assert "climb" in finding.cause


def test_a_loss_stuck_at_chance_is_a_plateau_naming_the_chance_level() -> None:
    findings, losses = _train(120, vocab=8, learnable=False)  # random tokens: nothing to learn beyond ln(8)
    assert abs(sum(losses[-20:]) / 20 - math.log(8)) < 0.05
    plateau = _of(findings, "loss_plateau")
    assert len(plateau) == 1, [f.message for f in findings]
    finding = plateau[0]
    assert finding.evidence["chance_classes"] == 8
    assert finding.evidence["rules"] == ["chance_level", "learns_nothing"]
    assert finding.reported_step >= DiagnosisConfig().loss_min_steps
    assert not {f.kind for f in findings if f.is_warning} - {"loss_plateau"}


def test_a_noisy_healthy_loss_with_warm_up_and_a_cosine_restart_raises_nothing() -> None:
    def schedule(optimizer: torch.optim.Optimizer) -> Any:
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, 0.05, 1.0, total_iters=20)
        cosine = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=40)  # restarts at 60, 100, 140
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[20])

    findings, losses = _train(
        150, batch=2, make_optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), make_scheduler=schedule
    )
    assert losses[-1] < losses[0]  # it trains
    steps = torch.tensor(losses)
    assert (steps[1:] > steps[:-1]).float().mean() > 0.3  # and the loss is noisy: it goes up on many steps
    assert [f.message for f in findings if f.kind in LOSS_KINDS] == []
    assert [f.message for f in findings if f.is_warning] == []


def test_the_trend_statistic_counts_order_not_size() -> None:
    rising = torch.arange(20.0).numpy()
    spiky = rising.copy()
    spiky[5] = 1e6  # one outlier batch changes the trend statistic by a few pairs only
    assert mann_kendall_z(rising) > 5 and abs(mann_kendall_z(spiky) - mann_kendall_z(rising)) < 1
    flat_noise = torch.randn(20, generator=torch.Generator().manual_seed(0)).numpy()
    assert abs(mann_kendall_z(flat_noise)) < 3


def test_loss_rules_can_be_turned_off_and_their_fields_are_validated() -> None:
    assert DiagnosisConfig(loss_window=None).loss_window is None
    with pytest.raises(ValueError, match="loss_window"):
        DiagnosisConfig(loss_window=2)
    with pytest.raises(ValueError, match="loss_rise"):
        DiagnosisConfig(loss_rise=0)
    with pytest.raises(ValueError, match="dead_min_samples"):
        DiagnosisConfig(dead_min_samples=0)
