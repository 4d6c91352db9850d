"""The diagnosis on real architectures (timm, torchvision, Hugging Face): no false alarm, no silent failure.

Each test trains a model this project did not write for a few logged steps with the monitor on every step and
asserts what a user would see: no warning where the small or large gradient is there by design, and the
finding of its kind, at the right layer, where the run is broken.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from gradlight import DiagnosisConfig, GradientFlowMonitor, load_findings

QUIET: dict[str, Any] = dict(
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
)


class Classifier(L.LightningModule):
    """Any ``nn.Module`` classifier on random 32 px images whose class is the sign of one pixel sum."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        classes: int = 10,
        samples: int = 64,
    ) -> None:
        super().__init__()
        self.net = net
        self.make_optimizer = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        self.make_scheduler = scheduler
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(samples, 3, 32, 32, generator=generator)
        y = (x[:, 0, :8, :8].sum((1, 2)) > 0).long() * (classes - 1)
        self.data = TensorDataset(x, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer(self.parameters())
        if self.make_scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.make_scheduler(optimizer), "interval": "step"},
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))


def fit(module: L.LightningModule, folder: Path, steps: int, trainer: Any = None, **monitor: Any) -> pd.DataFrame:
    """Train with the monitor on every step; return the findings (warnings raised by the run are kept out)."""
    callback = GradientFlowMonitor(1, folder, **monitor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(**QUIET, accelerator="cpu", devices=1, max_steps=steps, callbacks=[callback], **(trainer or {})).fit(
            module
        )
    return load_findings(folder)


def warnings_of(findings: pd.DataFrame) -> pd.DataFrame:
    return findings[findings.severity == "warning"]


# ----------------------------------------------------------------------------- small by design: notes
def test_layerscale_branches_of_a_deit3_vit_are_a_note_naming_the_gain_not_vanishing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=4, init_values=1e-6
    )
    sgd = lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9)  # noqa: E731
    findings = fit(Classifier(vit, sgd), tmp_path, steps=6)
    assert warnings_of(findings).empty, warnings_of(findings).message.tolist()
    notes = findings[(findings.kind == "vanishing") & (findings.severity == "note")]
    gated = notes[notes.evidence.map(lambda e: e.get("explained_by") == "residual_gain")]
    assert not gated.empty
    evidence = gated.iloc[0].evidence
    assert evidence["gain"].endswith((".ls1.gamma", ".ls2.gamma"))  # named; here the patch embedding, upstream
    assert evidence["ratio"] < 1e-3 <= evidence["compensated_ratio"]  # small, and not small once the gain is out
    assert gated.iloc[0].evidence["rules"] == ["residual_gain_near_zero"]


def test_a_layerscale_gain_that_never_grows_is_a_warning(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2, init_values=1e-5
    )
    gains = [p for n, p in vit.named_parameters() if n.endswith("gamma")]
    others = [p for n, p in vit.named_parameters() if not n.endswith("gamma")]

    def optimizer(params: Any) -> torch.optim.Optimizer:  # the gains sit in a param group with lr 0
        return torch.optim.SGD([{"params": others, "lr": 0.01}, {"params": gains, "lr": 0.0}], momentum=0.9)

    findings = fit(Classifier(vit, optimizer), tmp_path, steps=8, diagnosis=DiagnosisConfig(gain_patience=5))
    stuck = warnings_of(findings)
    stuck = stuck[stuck.kind == "vanishing"]
    assert not stuck.empty
    assert stuck.iloc[0].evidence["explained_by"] == "stuck_gain"
    assert stuck.iloc[0].evidence["rules"] == ["gain_stays_near_zero"]


@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_zero_initialised_last_batchnorm_of_resnet_blocks_raises_no_warning(tmp_path: Path, family: str) -> None:
    torch.manual_seed(0)
    if family == "torchvision":
        net = resnet18(num_classes=10, zero_init_residual=True)
    else:
        net = timm.create_model("resnet10t", num_classes=10, zero_init_last=True)
    sgd = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)  # noqa: E731
    findings = fit(Classifier(net, sgd), tmp_path, steps=6)
    assert warnings_of(findings).empty, warnings_of(findings).message.tolist()


def test_attention_query_key_projections_at_init_raise_no_warning(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    findings = fit(LanguageModel(LlamaForCausalLM(config)), tmp_path, steps=6)
    assert warnings_of(findings).empty, warnings_of(findings).message.tolist()
    profile_layers = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"}
    notes = findings[findings.evidence.map(lambda e: e.get("explained_by") == "attention_logits")]
    assert notes.empty or set(notes.iloc[0].layers) & profile_layers or notes.iloc[0].layers


class LanguageModel(L.LightningModule):
    """A Hugging Face causal LM on a learnable token task (every token repeats the one 4 positions back)."""

    def __init__(self, model: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        generator = torch.Generator().manual_seed(0)
        prefix = torch.randint(3, 64, (64, 4), generator=generator)
        self.data = TensorDataset(prefix.repeat(1, 8))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_clipping_active_on_every_step_is_a_note_and_raise_does_not_raise_on_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = resnet18(num_classes=10)
    findings = fit(
        Classifier(net), tmp_path, steps=5, trainer={"gradient_clip_val": 1e-3}, on_anomaly="raise"
    )  # a raise on a note would fail the fit
    (note,) = findings.itertuples()
    assert (note.kind, note.severity, note.layer) == ("exploding", "note", "__global__")
    assert note.evidence["clip_ratio"] > 10 and note.evidence["rules"] == ["clipping_active"]
    import json

    lines = [json.loads(line) for line in (tmp_path / "findings.jsonl").read_text().splitlines()]
    assert [line["severity"] for line in lines] == ["note"]


def test_parameters_owned_by_the_root_module_are_not_the_reference(tmp_path: Path) -> None:
    class WithTemperature(Classifier):
        def __init__(self) -> None:
            super().__init__(
                timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2)
            )
            self.temperature = nn.Parameter(torch.tensor(1.0))  # owned by the LightningModule, used at the loss

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x) / self.temperature, y)

    torch.manual_seed(0)
    monitor_dir = tmp_path / "gl"
    findings = fit(WithTemperature(), monitor_dir, steps=6)
    assert warnings_of(findings).empty, warnings_of(findings).message.tolist()


# ------------------------------------------------------------------------------------- no gradient
def test_a_detached_backbone_stage_is_reported_as_no_gradient(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = resnet18(num_classes=10)
    net.layer1.register_forward_hook(lambda module, args, output: output.detach())  # cuts everything before it
    findings = fit(Classifier(net), tmp_path, steps=5)
    (row,) = findings[findings.kind == "no_gradient"].itertuples()
    assert row.layer == "net.conv1" and row.severity == "warning"
    assert "net.layer1.0.conv1" in row.layers and "net.layer2.0.conv1" not in row.layers
    assert row.evidence["cut_off"][0] == "net.conv1" and row.evidence["rules"][0] == "graph_cut"
    assert row.step == 0 and row.reported_step == 2


def test_a_module_never_called_is_reported_and_a_frozen_one_is_not(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = resnet18(num_classes=10)
    net.spare_head = nn.Linear(512, 10)  # built and handed to the optimizer, never called in forward
    for param in net.layer4.parameters():  # intentionally frozen
        param.requires_grad_(False)
    findings = fit(Classifier(net), tmp_path, steps=5)
    (row,) = findings[findings.kind == "no_gradient"].itertuples()
    assert row.layers == ["net.spare_head"]
    assert row.evidence["never_called"] == ["net.spare_head"] and row.evidence["rules"][0] == "never_called"
    assert not any("layer4" in layer for layer in findings.layer)


# ----------------------------------------------------------------------------------------- stalled
def test_a_learning_rate_so_small_that_nothing_moves_is_stalled(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sgd = lambda params: torch.optim.SGD(params, lr=1e-12)  # noqa: E731
    findings = fit(Classifier(resnet18(num_classes=10), sgd), tmp_path, steps=7)
    (row,) = warnings_of(findings).itertuples()
    assert (row.kind, row.layer, row.step) == ("stalled", "__global__", 0)
    assert row.evidence["learning_rate"] == 1e-12 and row.evidence["rules"][0] == "learning_rate_too_small"


def test_a_schedule_that_ends_at_zero_is_not_stalled(tmp_path: Path) -> None:
    torch.manual_seed(0)
    steps = 16

    def schedule(optimizer: torch.optim.Optimizer) -> Any:  # linear decay to exactly 0, then 0
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / 8))

    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU(), nn.Linear(64, 10))
    findings = fit(Classifier(net, scheduler=schedule), tmp_path, steps=steps)
    assert warnings_of(findings).empty, warnings_of(findings).message.tolist()


# ------------------------------------------------------------------------------------------- lazy
def test_a_model_with_lazy_modules_trains_with_the_monitor_and_the_diagnosis(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(10):
        layers += [nn.LazyLinear(32), nn.Sigmoid()]
    net = nn.Sequential(*layers, nn.LazyLinear(10))
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    findings = fit(Classifier(net, sgd), tmp_path, steps=4)
    vanishing = warnings_of(findings)
    vanishing = vanishing[vanishing.kind == "vanishing"]
    assert vanishing.iloc[0].layer == "net.1"  # profiled after the first forward: the deep sigmoid stack is seen
    assert "saturating_activation" in vanishing.iloc[0].evidence["rules"]


# ------------------------------------------------------------------------------------ detection head
def _yolo_findings(ablate: bool, steps: int = 5) -> list[Any]:
    """An untrained yolo11n (3 classes) on random 64 px images with one small box each, SGD, every step."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    from casestudies.detection.ablations import Ablation
    from gradlight import GradientDiagnosis, GradientFlowTracker, ModelProfile

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=3, verbose=False)
    model.args = get_cfg(DEFAULT_CFG)
    if ablate:
        Ablation(residual=False, batchnorm=False, activation="sigmoid").apply(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    tracker = GradientFlowTracker(model)
    diagnosis = GradientDiagnosis()
    found = []
    for step in range(steps):
        batch = {
            "img": torch.rand(4, 3, 64, 64),
            "cls": torch.randint(0, 3, (4, 1)).float(),
            "bboxes": torch.tensor([[0.5, 0.5, 0.15, 0.15]]).repeat(4, 1),  # small boxes: the finest scale only
            "batch_idx": torch.arange(4).float(),
        }
        optimizer.zero_grad()
        if step == 0:
            tracker.start_discovery()
        loss, _ = model.loss(batch)
        loss.sum().backward()
        if step == 0:
            tracker.stop_discovery()
            diagnosis.profile = ModelProfile.from_tracker(tracker)
        tracker.capture(step, [p for g in optimizer.param_groups for p in g["params"]], owner=optimizer)
        optimizer.step()
        found += diagnosis.update(tracker.finalize(), loss=float(loss.sum()))
    return found


def test_detection_head_scales_without_targets_are_quiet_and_a_stripped_sigmoid_yolo_vanishes() -> None:
    healthy = _yolo_findings(ablate=False)
    assert [f for f in healthy if f.is_warning] == []  # the P4/P5 box branches get ~1e-9 of the head's gradient
    stripped = _yolo_findings(ablate=True)
    vanishing = [f for f in stripped if f.kind == "vanishing" and f.is_warning]
    assert vanishing and vanishing[0].layer == "model.0.conv" and vanishing[0].step == 0


class SequenceRegressor(L.LightningModule):
    """An ``nn.LSTM`` that learns a sequence's mean; one batch late in the run carries outlier targets."""

    def __init__(self, outlier_step: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 32, batch_first=True)
        self.head = nn.Linear(32, 1)
        self.outlier_step = outlier_step
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(512, 12, 4, generator=generator)
        self.data = TensorDataset(x, x.mean((1, 2)).unsqueeze(1))
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.outlier_step:
            y = y + 30.0  # mislabelled batch: a large loss and a large gradient on one step of a converged run
        loss = nn.functional.mse_loss(self.head(self.lstm(x)[0][:, -1]), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_one_large_loss_batch_late_in_a_converged_run_is_not_exploding(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SequenceRegressor(outlier_step=150)
    findings = fit(model, tmp_path, steps=165)
    assert max(model.losses[140:150]) < 0.01 < 100 < model.losses[150]  # converged, then one batch far off
    assert warnings_of(findings).empty, warnings_of(findings).message.tolist()
    from gradlight import load_history

    norms = load_history(tmp_path, metrics=["global_grad_l2"]).set_index("step").value
    assert norms[150] > 100 * norms[140:150].median()  # the growth rule's factor: the spike is there...
    assert norms[151:].max() < 100 * norms[140:150].median()  # ...and it does not stay up
