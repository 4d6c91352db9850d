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
import pytest
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

    ``zero_grad=False`` is the other bug: manual optimization leaves ``zero_grad()`` to the user, who forgot it.
    ``toggle=True`` follows the "multiple optimizers" example (``toggle_optimizer`` around each network's
    step); ``detach_generator=True`` is the bug: the generator's loss is computed on ``fake.detach()``, so the
    generator gets no gradient on any of its steps (written, as in ``LightningOptimizer``'s docstring
    example, without toggling, since a toggled discriminator would leave that loss without a graph at all).
    """

    def __init__(self, toggle: bool = True, detach_generator: bool = False, zero_grad: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.toggle, self.detach_generator, self.zeroes_grads = toggle, detach_generator, zero_grad
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
        if self.zeroes_grads:
            g_opt.zero_grad()
        g_loss = bce(self.discriminator(fake.detach() if self.detach_generator else fake), ones)
        self.manual_backward(g_loss)
        g_opt.step()
        if self.toggle:
            self.untoggle_optimizer(g_opt)
        # discriminator
        if self.toggle:
            self.toggle_optimizer(d_opt)
        if self.zeroes_grads:
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
    assert findings[findings.severity == "warning"].empty, findings.message.tolist()


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
    assert steps_of(history, "discriminator.") == set(range(1, 16, 2)) and not steps_of(history, "generator.")


def test_a_gan_that_never_zeroes_its_gradients_gets_a_finding_per_optimizer(tmp_path: Path) -> None:
    """A whole-model finding is reported once per optimizer, naming it: one network's does not hide the other's."""
    _, findings = fit_gan(GAN(zero_grad=False), tmp_path, batches=12)
    exploding = findings[(findings.kind == "exploding") & (findings.layer == "__global__")]
    optimizers = [row.evidence.get("optimizer") for row in exploding.itertuples()]
    assert sorted(optimizers) == ["discriminator.0.weight", "generator.0.weight"], findings.message.tolist()
    for row in exploding.itertuples():
        assert row.evidence["rules"] == ["gradients_not_zeroed"]
        assert f"the optimizer of `{row.evidence['optimizer']}`" in row.message
        assert row.step % 2 == (0 if row.evidence["optimizer"].startswith("generator") else 1)


# ------------------------------------------------------------------------------ layers skipped by design
class AudioClassifier(L.LightningModule):
    """A small wav2vec2 (Hugging Face, built from a config) classifying two tones in noise, with LayerDrop.

    ``layer_never_runs=True`` is its broken twin: the last encoder layer is taken out of the encoder's layer
    list but kept on the model, so it is built and handed to the optimizer and never called.
    ``stable_layer_norm=True`` puts the LayerNorms before each block (pre-LN, the configuration of
    wav2vec2-large and XLS-R) instead of after it.
    """

    def __init__(self, layerdrop: float, layer_never_runs: bool = False, stable_layer_norm: bool = False) -> None:
        super().__init__()
        from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

        torch.manual_seed(0)
        config = Wav2Vec2Config(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(16, 16),
            conv_kernel=(10, 3),
            conv_stride=(5, 2),
            num_feat_extract_layers=2,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            layerdrop=layerdrop,
            mask_time_prob=0.0,
            num_labels=2,
            classifier_proj_size=16,
            do_stable_layer_norm=stable_layer_norm,
        )
        self.net = Wav2Vec2ForSequenceClassification(config)
        if layer_never_runs:
            encoder = self.net.wav2vec2.encoder
            self.net.spare_layer = encoder.layers[-1]
            encoder.layers = nn.ModuleList(list(encoder.layers)[:-1])
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 2, (128,), generator=generator)
        time = torch.linspace(0, 1, 1600)
        audio = torch.sin(2 * torch.pi * (20 + 40 * labels[:, None]) * time)
        self.data = TensorDataset(audio + 0.3 * torch.randn(128, 1600, generator=generator), labels)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        audio, labels = batch
        return self.net(audio, labels=labels).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16, shuffle=True)


def fit_steps(model: L.LightningModule, save_dir: Path, steps: int) -> pd.DataFrame:
    torch.manual_seed(0)
    monitor = GradientFlowMonitor(save_dir=save_dir, log_every_n_steps=1, log_figures_every_n_epochs=None)
    trainer = L.Trainer(max_steps=steps, callbacks=[monitor], accelerator="cpu", **QUIET)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model)
    return load_findings(save_dir)


def test_layerdrop_that_skips_whole_layers_at_random_is_not_a_missing_gradient(tmp_path: Path) -> None:
    findings = fit_steps(AudioClassifier(layerdrop=0.5), tmp_path, steps=30)
    history = load_history(tmp_path)
    grads = history[history.metric == "grad_l2"]
    # the encoder's layers did skip steps (no row on those steps): the gradient came and went
    ran = grads[grads.layer == "net.wav2vec2.encoder.layers.2.attention.k_proj"].step.nunique()
    assert 5 < ran < 25
    assert findings[findings.severity == "warning"].empty, findings.message.tolist()


@pytest.mark.parametrize("stable_layer_norm", [False, True], ids=["post_ln", "pre_ln"])
def test_a_healthy_wav2vec2_trained_until_its_loss_is_nearly_solved_is_not_vanishing(
    tmp_path: Path, stable_layer_norm: bool
) -> None:
    """Past ~30 steps the encoder's gradient falls 3 decades below the head's while the loss falls (0.69 to 0.13
    at step 39): behind the LayerNorms the gradient loses its component along the normalised representation
    (97% of it at the last LayerNorm once the representation points where the head wants) and is divided by
    the residual stream's growing scale. AdamW still moves those layers (update ratio 1e-2 to 0.6 of the head's):
    solved, not starved. Pre-LN: the blocks' LayerNorm parameters sit behind the branch's first matrices from
    step 0 (3 decades below the head). Before the rule read the update ratio, both warned `vanishing`."""
    findings = fit_steps(AudioClassifier(layerdrop=0.0, stable_layer_norm=stable_layer_norm), tmp_path, steps=40)
    assert findings[findings.severity == "warning"].empty, findings.message.tolist()
    loss = load_history(tmp_path).query("metric == 'loss'").sort_values("step").value.to_numpy()
    assert loss[-5:].mean() < 0.5 * loss[:5].mean()  # it learns
    moving = [row for row in findings.itertuples() if row.evidence.get("explained_by") == "adaptive_update"]
    assert moving, findings.message.tolist()  # the gradients were small: the update ratio explained them
    for row in moving:
        assert row.kind == "vanishing" and row.severity == "note"
        assert row.evidence["ratio"] < 1e-3 <= row.evidence["update_fraction"]
        assert row.evidence["rules"] == ["adaptive_update_moves"] and "LayerNorm" in row.evidence["normalization"]


def test_a_layer_that_never_runs_beside_layerdrop_is_no_gradient_with_the_observed_cause(tmp_path: Path) -> None:
    findings = fit_steps(AudioClassifier(layerdrop=0.5, layer_never_runs=True), tmp_path, steps=30)
    warned = findings[(findings.kind == "no_gradient") & (findings.severity == "warning")]
    assert len(warned) == 1, findings.message.tolist()
    (row,) = warned.itertuples()
    assert all(layer.startswith("net.spare_layer.") for layer in row.layers) and len(row.layers) == 8
    assert row.evidence["never_called"] == row.layers and row.evidence["rules"] == ["never_called"]
    # counted over the window: it was watched, and did not run, on every step it was reported for
    observed = row.evidence["observed"][row.layer]
    assert observed["not_ran"] == observed["steps"] >= 10 and observed["ran"] == 0
    assert row.step == 0 and row.reported_step >= 10


# ------------------------------------------------------------------------------------------ slow divergence
def images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 3, 32, 32, generator=generator)
    return x, (x[:, 0, :8, :8].sum((1, 2)) > 0).long() * 9


def plain_loop(zero_grad: bool, steps: int, recorder: bool = True) -> list[Any]:
    """torchvision's resnet18 in a plain loop (SGD with momentum); ``zero_grad=False`` is the beginner's bug.

    With ``recorder=False`` the diagnosis is fed by a bare tracker: nothing checks whether gradients are zeroed.
    """
    from torchvision.models import resnet18

    from gradlight import GradientFlowRecorder
    from gradlight.diagnosis import GradientDiagnosis, ModelProfile
    from gradlight.tracker import GradientFlowTracker

    torch.manual_seed(0)
    x, y = images()
    net = resnet18(num_classes=10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    rec = GradientFlowRecorder(net, None, log_every_n_steps=1, on_anomaly="ignore") if recorder else None
    tracker = GradientFlowTracker(net) if rec is None else None
    diagnosis = GradientDiagnosis(profile=ModelProfile.from_model(net))
    found: list[Any] = []
    batches = torch.Generator().manual_seed(1)
    for step in range(steps):
        index = torch.randint(0, 256, (16,), generator=batches)
        loss = nn.functional.cross_entropy(net(x[index]), y[index])
        if zero_grad:
            optimizer.zero_grad()
        loss.backward()
        if rec is not None:
            rec.capture(step, optimizer)
            optimizer.step()
            found += rec.end_step(loss)
        else:
            assert tracker is not None
            tracker.capture(step, net.parameters())
            optimizer.step()
            found += diagnosis.update(tracker.finalize(), loss=loss.item())
    return found


def test_a_plain_loop_that_never_zeroes_its_gradients_is_reported_with_that_cause() -> None:
    findings = [f for f in plain_loop(zero_grad=False, steps=20) if f.is_warning]
    assert [f.kind for f in findings] == ["exploding"], [f.message for f in findings]
    (finding,) = findings
    assert finding.evidence["rules"] == ["gradients_not_zeroed"] and finding.evidence["grads_carried"]
    assert "not being zeroed between steps" in finding.cause and finding.reported_step < 20


def test_without_the_zeroing_check_the_runaway_is_a_slow_divergence_and_says_no_more() -> None:
    findings = [f for f in plain_loop(zero_grad=False, steps=20, recorder=False) if f.is_warning]
    assert [f.kind for f in findings] == ["exploding"], [f.message for f in findings]
    (finding,) = findings
    assert finding.evidence["rules"] == ["slow_divergence"] and not finding.evidence["grads_carried"]
    assert "not being zeroed" not in finding.cause and finding.reported_step < 20


def test_the_same_loop_with_zero_grad_is_quiet() -> None:
    for recorder in (True, False):
        findings = [f for f in plain_loop(zero_grad=True, steps=20, recorder=recorder) if f.is_warning]
        assert not findings, [f.message for f in findings]


# ------------------------------------------------------------------------- exploding: two misfires (issue 24)
def circle_mlp_run(steps: int, depth: int = 6) -> list[Any]:
    """AUTOTRAINER's Circle task with a deep sigmoid MLP and Adam: early layers start vanishing, then recover."""
    from gradlight.diagnosis import GradientDiagnosis, ModelProfile
    from gradlight.tracker import GradientFlowTracker

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    n = 1000
    radius = torch.cat(
        [torch.rand(n // 2, generator=generator) * 0.5, 0.8 + torch.rand(n // 2, generator=generator) * 0.5]
    )
    angle = torch.rand(n, generator=generator) * 6.28
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    y = torch.cat([torch.zeros(n // 2), torch.ones(n // 2)]).long()
    layers: list[nn.Module] = [nn.Linear(2, 16), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    net = nn.Sequential(*layers, nn.Linear(16, 2))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.03)
    tracker, diagnosis = GradientFlowTracker(net), GradientDiagnosis(profile=ModelProfile.from_model(net))
    found: list[Any] = []
    for step in range(steps):
        index = torch.randint(0, n, (32,), generator=generator)
        loss = nn.functional.cross_entropy(net(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        tracker.capture(step, net.parameters())
        optimizer.step()
        found += diagnosis.update(tracker.finalize(), loss=loss.item())
    return found


def test_a_layer_recovering_from_a_vanishing_start_is_not_exploding() -> None:
    findings = circle_mlp_run(steps=400)
    assert "vanishing" in {f.kind for f in findings}  # the start is vanishing, and reported as such
    exploding = [f.message for f in findings if f.kind == "exploding"]
    assert not exploding, exploding


def blown_up_run(constant_init: bool, steps: int = 4) -> list[Any]:
    """An MLP on unnormalised 0-255 pixels (and, optionally, a constant initialisation), SGD at lr 0.01."""
    from gradlight import GradientFlowRecorder

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(1024, 784, generator=generator) * 255).round()
    y = (x @ torch.randn(784, 10, generator=generator)).argmax(1)
    net = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    if constant_init:
        for module in net:
            if isinstance(module, nn.Linear):
                nn.init.constant_(module.weight, 0.01)
                nn.init.zeros_(module.bias)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    recorder = GradientFlowRecorder(net, None, log_every_n_steps=1, on_anomaly="ignore")
    found: list[Any] = []
    for step in range(steps):
        index = torch.randint(0, 1024, (32,), generator=generator)
        loss = nn.functional.cross_entropy(net(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        recorder.capture(step, optimizer)
        optimizer.step()
        found += recorder.end_step(loss)
    return found


def test_a_network_that_blows_up_in_its_first_step_is_exploding_at_the_second() -> None:
    for constant_init in (False, True):
        exploding = [f for f in blown_up_run(constant_init) if f.kind == "exploding" and f.is_warning]
        assert len(exploding) == 1, (constant_init, [f.message for f in exploding])
        (finding,) = exploding
        assert finding.step == 0 and finding.reported_step == 1 and finding.layer == "4"
        assert finding.evidence["rules"][0] == "one_step_blowup" and "0-255" in finding.cause


def test_the_zeroing_check_gives_no_evidence_and_no_error_on_non_finite_gradients() -> None:
    from gradlight.carry_probe import CarryProbe

    weight = nn.Parameter(torch.ones(3))
    (2 * weight).sum().backward()
    probe = CarryProbe.start([weight])
    assert probe is not None
    (weight * torch.tensor([1.0, float("nan"), 1.0])).sum().backward()  # the zoo's NaN runs crashed here
    assert probe.carried() is None
    weight.grad = None
    (2 * weight).sum().backward()
    probe = CarryProbe.start([weight])
    assert probe is not None
    weight.grad = None  # zero_grad(set_to_none=True)
    (3 * weight).sum().backward()
    assert probe.carried() is False
