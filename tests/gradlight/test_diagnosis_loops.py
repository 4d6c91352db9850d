"""Training loops beyond one optimizer and one full forward pass: several optimizers, skipped layers, runaways.

Issue 23: a GAN under manual optimization, models that skip whole layers by design, and a plain loop that
never zeroes its gradients. Each test trains a real setup and asserts what a user would see.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradlight import GradientFlowMonitor, load_findings, load_history

QUIET: dict[str, Any] = dict(
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
)


# ------------------------------------------------------------------------------------ several optimizers
class GAN(L.LightningModule):
    """The GAN of Lightning's manual-optimization docs, on 2-D data: a generator and a discriminator.

    ``toggle=True`` follows the "multiple optimizers" example (``toggle_optimizer`` around each network's
    step); ``detach_generator=True`` is the bug: the generator's loss is computed on ``fake.detach()``, so the
    generator gets no gradient on any of its steps (written, as in ``LightningOptimizer``'s docstring
    example, without toggling, since a toggled discriminator would leave that loss without a graph at all).
    """

    def __init__(self, toggle: bool = True, detach_generator: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.toggle, self.detach_generator = toggle, detach_generator
        self.generator = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(512, 2, generator=generator) * 0.5 + torch.tensor([2.0, -1.0]))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        g_opt, d_opt = self.optimizers()  # type: ignore[misc]
        z = torch.randn(real.shape[0], 4)
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        # generator
        if self.toggle:
            self.toggle_optimizer(g_opt)
        fake = self.generator(z)
        g_opt.zero_grad()
        g_loss = bce(self.discriminator(fake.detach() if self.detach_generator else fake), ones)
        self.manual_backward(g_loss)
        g_opt.step()
        if self.toggle:
            self.untoggle_optimizer(g_opt)
        # discriminator
        if self.toggle:
            self.toggle_optimizer(d_opt)
        d_opt.zero_grad()
        d_loss = (bce(self.discriminator(real), ones) + bce(self.discriminator(self.generator(z).detach()), zeros)) / 2
        self.manual_backward(d_loss)
        d_opt.step()
        if self.toggle:
            self.untoggle_optimizer(d_opt)

    def configure_optimizers(self) -> Any:
        g = torch.optim.Adam(self.generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
        d = torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
        return g, d

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32, shuffle=True)


def fit_gan(model: GAN, save_dir: Path, batches: int, every: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(save_dir=save_dir, log_every_n_steps=every, log_figures_every_n_epochs=None)
    trainer = L.Trainer(max_steps=2 * batches, callbacks=[monitor], accelerator="cpu", **QUIET)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model)
    return load_history(save_dir), load_findings(save_dir)


def steps_of(history: pd.DataFrame, prefix: str) -> set[int]:
    layers = history[history.layer.str.startswith(prefix)]
    return set(layers[layers.metric == "grad_l2"].step.tolist())


def test_a_gan_with_toggled_optimizers_records_both_networks_on_their_own_steps(tmp_path: Path) -> None:
    history, findings = fit_gan(GAN(), tmp_path, batches=12)
    generator, discriminator = steps_of(history, "generator."), steps_of(history, "discriminator.")
    # Lightning counts every optimizer's step: the generator steps at even steps, the discriminator at odd ones
    assert generator == set(range(0, 24, 2)) and discriminator == set(range(1, 24, 2))
    layers = set(history[history.metric == "grad_l2"].layer)
    assert {"generator.0", "generator.4", "discriminator.0", "discriminator.2"} <= layers
    assert findings[findings.severity == "warning"].empty, findings.message.tolist()


def test_several_optimizers_are_each_recorded_once_per_logging_interval(tmp_path: Path) -> None:
    # an even interval would meet only the generator's (even) steps if the interval counted steps alone
    history, findings = fit_gan(GAN(), tmp_path, batches=12, every=4)
    assert steps_of(history, "generator.") == {0, 4, 8, 12, 16, 20}
    assert steps_of(history, "discriminator.") == {1, 5, 9, 13, 17, 21}


def test_a_generator_cut_off_by_detach_is_reported_on_its_own_steps(tmp_path: Path) -> None:
    history, findings = fit_gan(GAN(toggle=False, detach_generator=True), tmp_path, batches=8)
    warned = findings[(findings.kind == "no_gradient") & (findings.severity == "warning")]
    assert len(warned) == 1, findings.message.tolist()
    (row,) = warned.itertuples()
    assert set(row.layers) == {"generator.0", "generator.2", "generator.4"}
    # counted over the generator's own steps (0, 2, 4), not reset by the discriminator's in between
    assert row.step == 0 and row.reported_step == 4
    assert row.evidence["cut_off"] and row.evidence["rules"][0] == "graph_cut"
    assert not any(layer.startswith("discriminator") for layer in findings.layer)
