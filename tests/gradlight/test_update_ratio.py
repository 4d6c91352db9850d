"""The copy-free update norms equal a real parameter copy's, for every reconstructed optimizer variant."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import gradlight.compiled as compiled_kernels
import gradlight.update_ratio as update_ratio
from gradlight.memory import LiveBytes
from gradlight.tracker import GradientFlowTracker
from gradlight.update_ratio import UpdateNorms


class Net(nn.Module):
    """A few layers of different sizes (one larger than the small chunks below) and one never used."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 3))
        self.norm = nn.LayerNorm(12)
        self.unused = nn.Linear(5, 5)  # never in the loss: grad stays None, no optimizer touches it

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.norm(x))


def _loss(net: nn.Module, step: int) -> Tensor:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 12, generator=generator)
    return (net(x) - torch.randn(16, 3, generator=generator)).square().mean()


def _copy_squares(params: list[nn.Parameter], before: list[Tensor]) -> Tensor:
    """Independent reference: the squared norm of what the step changed, from a real copy."""
    return torch.stack([(p.detach().double() - b.double()).square().sum() for p, b in zip(params, before)])


def _run(
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], steps: int = 3, **norms_kwargs: Any
) -> tuple[list[Tensor], list[Tensor], UpdateNorms]:
    torch.manual_seed(0)
    net = Net()
    params = list(net.parameters())
    optimizer = make(params)
    updates = UpdateNorms(**norms_kwargs)
    ours, reference = [], []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        _loss(net, step).backward()
        updates.before_step(params, optimizer)
        before = [p.detach().clone() for p in params]
        optimizer.step()
        ours.append(updates.after_step())
        reference.append(_copy_squares(params, before))
    return ours, reference, updates


SGD_VARIANTS = {
    "plain": {},
    "weight_decay": {"weight_decay": 0.1},
    "maximize_decay": {"maximize": True, "weight_decay": 0.1},
    "momentum": {"momentum": 0.9},
    "momentum_dampening_decay": {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05},
    "nesterov_decay": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
    "nesterov_maximize": {"momentum": 0.8, "nesterov": True, "maximize": True},
}
ADAM_VARIANTS = {
    "adam": (torch.optim.Adam, {}),
    "adam_l2": (torch.optim.Adam, {"weight_decay": 0.1}),
    "adam_amsgrad_maximize": (torch.optim.Adam, {"amsgrad": True, "maximize": True}),
    "adam_decoupled": (torch.optim.Adam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    "adamw": (torch.optim.AdamW, {}),
    "adamw_decay": (torch.optim.AdamW, {"weight_decay": 0.3}),
    "adamw_amsgrad_maximize": (torch.optim.AdamW, {"amsgrad": True, "maximize": True, "weight_decay": 0.1}),
}
IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


#: Tensors of at least this many elements take the compiled kernel in the tests (the Net's three largest):
#: both the fused and the eager kernels run in one step.
TEST_FUSED_MIN_NUMEL = 100


def _use_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(update_ratio, "FUSED_MIN_NUMEL", TEST_FUSED_MIN_NUMEL)
    monkeypatch.setattr(compiled_kernels, "FAILURES", {})


@pytest.fixture(params=["per_tensor", "multi_tensor", "compiled"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Every kernel path on CPU: eager tensor by tensor (CPU's), eager multi-tensor (accelerators'), and the
    ``torch.compile``'d kernel for the larger tensors beside the eager ones for the others."""
    if request.param == "multi_tensor":
        monkeypatch.setattr(update_ratio, "_per_tensor", lambda device: False)
    if request.param == "compiled":
        _use_fused(monkeypatch)
        return {"kernel": "fused"}
    return {"kernel": "eager"}


def _assert_kernel(updates: UpdateNorms, options: dict[str, str]) -> None:
    expected = "fused: torch.compile" if options["kernel"] == "fused" else "eager: forced"
    assert updates.kernel_info is not None and updates.kernel_info.startswith(expected), updates.kernel_info


def _assert_equal_to_copy(ours: list[Tensor], reference: list[Tensor]) -> None:
    for step, (mine, exact) in enumerate(zip(ours, reference)):
        assert mine.dtype == torch.float64 and mine.shape == exact.shape
        assert (exact > 0).sum() >= 6, "the step must move every used tensor"
        torch.testing.assert_close(mine, exact, rtol=1e-3, atol=1e-30, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("chunk", [None, 500])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
def test_sgd_matches_copy(variant: str, impl: str, chunk: int | None, kernels: dict[str, str]) -> None:
    options = {**SGD_VARIANTS[variant], **IMPLEMENTATIONS[impl]}
    ours, reference, updates = _run(lambda p: torch.optim.SGD(p, lr=0.05, **options), chunk_numel=chunk, **kernels)
    _assert_equal_to_copy(ours, reference)
    assert updates.methods["0"].describe() == f"optimizer: SGD ({impl})"
    _assert_kernel(updates, kernels)


@pytest.mark.parametrize("chunk", [None, 500])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("variant", list(ADAM_VARIANTS))
def test_adam_matches_copy(variant: str, impl: str, chunk: int | None, kernels: dict[str, str]) -> None:
    kind, options = ADAM_VARIANTS[variant]
    make = lambda p: kind(p, lr=1e-2, **options, **IMPLEMENTATIONS[impl])  # noqa: E731
    ours, reference, updates = _run(make, chunk_numel=chunk, **kernels)
    _assert_equal_to_copy(ours, reference)
    assert updates.methods["0"].describe() == f"optimizer: {kind.__name__} ({impl})"
    _assert_kernel(updates, kernels)


@pytest.mark.parametrize("variant", ["adam_l2", "adamw_decay", "adamw_amsgrad_maximize"])
def test_adam_with_step_counters_on_the_device_matches_copy(
    variant: str, kernels: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The branch taken when the counters live on an accelerator (fused/capturable there), forced on CPU."""

    def as_device_vector(steps: list[Tensor | None], tensors: list[Tensor]) -> Tensor:
        return torch.stack([s if s is not None else torch.zeros(()) for s in steps]).double()

    monkeypatch.setattr(update_ratio, "_read_steps", as_device_vector)
    kind, options = ADAM_VARIANTS[variant]
    ours, reference, updates = _run(lambda p: kind(p, lr=1e-2, **options), chunk_numel=700, **kernels)
    _assert_equal_to_copy(ours, reference)
    _assert_kernel(updates, kernels)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    ],
    ids=["sgd", "sgd_fused", "adamw", "adamw_fused"],
)
def test_a_step_not_taken_is_a_zero_update(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
    net = Net()
    params = list(net.parameters())
    optimizer = make(params)
    updates = UpdateNorms()
    _loss(net, 0).backward()
    optimizer.step()  # state exists now
    _loss(net, 1).backward()
    updates.before_step(params, optimizer)
    before = [p.detach().clone() for p in params]  # no step: e.g. a GradScaler skipping an overflow
    ours = updates.after_step()
    if not isinstance(optimizer, torch.optim.SGD) or not optimizer.param_groups[0]["fused"]:
        assert torch.equal(ours, _copy_squares(params, before))  # all zeros
        assert not ours.any()
    else:  # fused SGD leaves no trace of a step not taken: why it takes the copy under a GradScaler
        assert ours.any()


@pytest.mark.parametrize("fused", [False, True])
def test_adam_under_a_grad_scaler_matches_copy_and_skips_overflow(fused: bool) -> None:
    """Fused Adam unscales inside its kernel (the gradients keep the scale) and rewinds its counter on overflow."""
    torch.manual_seed(0)
    net = Net()
    params = list(net.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    updates = UpdateNorms()
    for step in range(4):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(_loss(net, step)).backward()
        if step == 2:
            params[0].grad[0, 0] = float("inf")  # an overflow: the scaler skips this step
        updates.before_step(params, optimizer, grad_scale=scaler.get_scale())
        before = [p.detach().clone() for p in params]
        scaler.step(optimizer)
        scaler.update()
        ours, exact = updates.after_step(), _copy_squares(params, before)
        if step == 2:
            assert not exact.any() and not ours.any()
        else:
            torch.testing.assert_close(ours, exact, rtol=1e-3, atol=1e-30)
    assert updates.methods["0"].method == "optimizer"


class MyAdam(torch.optim.Adam):
    """A subclass may change ``step``: it is not reconstructed."""


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: torch.optim.RMSprop(p, lr=1e-2), "torch.optim.rmsprop.RMSprop is not reconstructed"),
        (lambda p: MyAdam(p, lr=1e-2), "MyAdam is not reconstructed"),
        (lambda p: torch.optim.Adam(p, lr=torch.tensor(1e-2)), "a tensor lr"),
        (lambda p: torch.optim.SGD(p, lr=0.5, weight_decay=2.0), "lr * weight_decay = 1 >= 1"),
    ],
    ids=["rmsprop", "subclass", "tensor_lr", "huge_decay"],
)
def test_other_optimizers_fall_back_to_the_copy(
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], reason: str
) -> None:
    ours, reference, updates = _run(make)
    assert updates.methods["0"].method == "copy"
    assert reason in updates.methods["0"].reason
    for mine, exact in zip(ours, reference):
        torch.testing.assert_close(mine, exact, rtol=1e-5, atol=1e-30)  # float32 differences
    with pytest.raises(ValueError, match="method='optimizer' cannot reconstruct the update of param group 0"):
        _run(make, method="optimizer")


def test_forced_copy_and_mixed_groups_keep_the_order() -> None:
    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        first, rest = params[:3], params[3:-2]  # the unused layer's two tensors are outside the optimizer
        return torch.optim.SGD(
            [{"params": first, "lr": torch.tensor(0.05)}, {"params": rest, "momentum": 0.9}], lr=0.05, foreach=False
        )

    ours, reference, updates = _run(make)
    assert {k: v.method for k, v in updates.methods.items()} == {"0": "copy", "1": "optimizer", "outside": "copy"}
    _assert_equal_to_copy(ours, reference)
    forced, reference, updates = _run(lambda p: torch.optim.AdamW(p, lr=1e-2), method="copy")
    assert updates.methods["0"].describe() == "copy: forced (method='copy')"
    _assert_equal_to_copy(forced, reference)


def test_bfloat16_parameters_copy_by_default_because_rounding_swallows_updates() -> None:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.full((4096,), 1.0, dtype=torch.bfloat16))  # ulp(1) = 2**-7 in bfloat16
    optimizer = torch.optim.SGD([weight], lr=1e-3)
    auto, forced = UpdateNorms(), UpdateNorms(method="optimizer")
    weight.grad = torch.ones_like(weight)  # a step of 1e-3, far below half an ulp: every element keeps its value
    auto.before_step([weight], optimizer)
    forced.before_step([weight], optimizer)
    optimizer.step()
    assert auto.methods["0"].describe() == "copy: torch.bfloat16 parameters: rounding can swallow an update"
    assert auto.after_step().item() == 0.0  # what was applied
    assert forced.after_step().item() == pytest.approx(4096 * 1e-6, rel=1e-6)  # what the optimizer computed


@pytest.mark.parametrize("kind", [torch.optim.SGD, torch.optim.AdamW])
def test_the_optimizer_state_is_left_alone(kind: type[torch.optim.Optimizer]) -> None:
    net = Net()
    params = list(net.parameters())
    optimizer = kind(params, lr=1e-2)
    updates = UpdateNorms()
    for step in range(2):
        _loss(net, step).backward()
        updates.before_step(params, optimizer)
        optimizer.step()
        updates.after_step()
    used = {id(p) for p in params if p.grad is not None}
    assert len(used) == len(params) - 2  # the unused layer's weight and bias
    assert {id(p) for p in optimizer.state} <= used  # no entry added for the tensors never stepped


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="method='fast' is not supported: use one of 'auto', 'optimizer', 'copy'"):
        UpdateNorms(method="fast")
    with pytest.raises(ValueError, match="chunk_numel=0 must be a positive integer"):
        UpdateNorms(chunk_numel=0)
    with pytest.raises(RuntimeError, match="after_step\\(\\) called without before_step\\(\\)"):
        UpdateNorms().after_step()


def _hook_peak(copy_free: bool) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Peak new bytes inside a tracker's logged step (capture + finalize), the parameter bytes, and the
    recorded update ratios beside the exact ones (from a real copy taken outside the measurement)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256), nn.GELU(), nn.Linear(256, 8))
    params = list(net.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    tracker = GradientFlowTracker(net, update_method="auto" if copy_free else "copy")
    net(torch.randn(8, 256)).square().mean().backward()
    optimizer.step()  # state exists: the measured step is a steady-state one
    net(torch.randn(8, 256)).square().mean().backward()
    before = [p.detach().clone() for p in params]
    with LiveBytes() as capture:
        tracker.capture(step=1, params=params, owner=optimizer)
    optimizer.step()
    with LiveBytes() as finalize:
        record = tracker.finalize()
    exact = _copy_squares(params, before).reshape(-1, 2).sum(1).sqrt().numpy() / record.metrics["param_l2"]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return max(capture.peak, finalize.peak) + capture.current, param_bytes, record.metrics["update_ratio"], exact


def test_a_logged_step_with_the_copy_free_ratio_allocates_no_parameter_sized_memory() -> None:
    peak, param_bytes, ours, exact = _hook_peak(copy_free=True)  # the tracker's default: from the optimizer
    assert peak < 0.05 * param_bytes, f"{peak} bytes at the peak for {param_bytes} parameter bytes"
    np.testing.assert_allclose(ours, exact, rtol=1e-3)
    copy_peak, _, copied, _ = _hook_peak(copy_free=False)  # the measurement sees the copy when there is one
    assert copy_peak >= param_bytes
    np.testing.assert_allclose(copied, exact, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.0, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.0),
        lambda p: torch.optim.AdamW(p, lr=0.0, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.0, weight_decay=0.1, foreach=False),
    ],
    ids=["sgd", "adam", "adamw", "adamw_for_loop"],
)
def test_a_learning_rate_of_zero_is_a_zero_update(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
    """A schedule that ends at 0 (or a frozen param group) gives zero updates, never a division by the lr."""
    net = Net()
    params = list(net.parameters())
    optimizer = make(params)
    updates = UpdateNorms("optimizer")
    for step in range(2):
        optimizer.zero_grad()
        _loss(net, step).backward()
        before = [p.detach().clone() for p in params]
        updates.before_step(params, optimizer)
        optimizer.step()
        ours = updates.after_step()
        assert torch.equal(ours, _copy_squares(params, before)) and not ours.any()


# ------------------------------------------------------------------------------------------- fused kernels
FUSED_VARIANTS = {
    **{f"sgd_{name}": (torch.optim.SGD, {"lr": 0.05, **options}) for name, options in SGD_VARIANTS.items()},
    **{name: (kind, {"lr": 1e-2, **options}) for name, (kind, options) in ADAM_VARIANTS.items()},
}
#: Variants whose update is one norm of one tensor (plain SGD: the gradient; momentum SGD: the buffer): no kernel
#: to fuse.
ONE_NORM = {"sgd_plain", "sgd_momentum", "sgd_momentum_dampening_decay"}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("variant", list(FUSED_VARIANTS))
def test_fused_and_eager_reconstructions_agree_on_every_variant(
    variant: str, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind, options = FUSED_VARIANTS[variant]
    make = lambda p: kind(p, **options, **IMPLEMENTATIONS[impl])  # noqa: E731
    eager, reference, _ = _run(make, kernel="eager")
    _use_fused(monkeypatch)
    calls: list[str] = []
    original = compiled_kernels.CompiledKernels.run

    def counted(self: Any, name: str, args: list[tuple[Tensor, ...]], device: torch.device) -> Any:
        calls.extend(name for _ in args)
        return original(self, name, args, device)

    monkeypatch.setattr(compiled_kernels.CompiledKernels, "run", counted)
    fused, _, updates = _run(make, kernel="fused")
    assert updates.kernel_info == "fused: torch.compile (Inductor C++) on cpu"
    assert (len(calls) == 0) == (variant in ONE_NORM), calls  # 3 steps x the Net's 3 tensors above 100 elements
    for step, (mine, theirs) in enumerate(zip(fused, eager)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-30, msg=lambda m, s=step: f"step {s}: {m}")
    _assert_equal_to_copy(fused, reference)


def test_one_compilation_serves_every_tensor_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamic shapes on flat inputs, scalars in their own vector: sizes and offsets do not recompile."""
    from torch._dynamo.utils import counters

    _use_fused(monkeypatch)
    compiled = compiled_kernels.CompiledKernels()
    flat = torch.rand(3 * 50_000)
    coef = torch.tensor([1e-8, 0.1], dtype=torch.float64)
    compiled.run("adam", [(flat[:1000], flat[1000:2000], flat[2000:3000], coef)], torch.device("cpu"))  # warm
    graphs = counters["stats"]["unique_graphs"]
    calls = []
    for start, size in ((7, 100), (0, 20_000), (1001, 33_333), (5, 49_000)):
        m, v, p = (flat[start + k * size : start + (k + 1) * size] for k in range(3))
        calls.append((m, v, p, torch.tensor([1e-8 * size, 0.01 * start], dtype=torch.float64)))
    sums = compiled.run("adam", calls, torch.device("cpu"))
    assert sums is not None and counters["stats"]["unique_graphs"] == graphs
    for got, (m, v, p, c) in zip(sums, calls):
        want = (m.double() / (v.double().sqrt() + c[0]) + c[1] * p.double()).square().sum()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)


def test_a_compiled_call_serves_a_batch_of_tensors_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to ``BATCH`` tensors per compiled call, one dtype per call, results back in the callers' order."""
    _use_fused(monkeypatch)
    batches: list[int] = []
    original = torch.compile

    def counting(function: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        compiled = original(function, **options)

        def run(*columns: list[Tensor]) -> Any:
            batches.append(len(columns[0]))
            return compiled(*columns)

        return run

    monkeypatch.setattr(torch, "compile", counting)
    generator = torch.Generator().manual_seed(0)
    dtypes = [torch.float32] * 6 + [torch.float64] * 3 + [torch.float32] * 5  # 11 float32, 3 float64, interleaved
    tensors = [torch.randn(100 + 37 * i, generator=generator).to(dtype) for i, dtype in enumerate(dtypes)]
    tensors[4][7] = float("nan")  # stays in its own result
    out = compiled_kernels.CompiledKernels().run("gradient", [(t,) for t in tensors], torch.device("cpu"))
    assert out is not None and len(out) == len(tensors)
    assert batches == [compiled_kernels.BATCH] * 3  # 8 + 3 float32 (padded), 3 float64 (padded)
    for i, (tensor, (sq, top)) in enumerate(zip(tensors, out)):
        if i == 4:
            assert sq.isnan() and top.isnan()
            continue
        torch.testing.assert_close(sq, tensor.double().square().sum(), rtol=1e-12, atol=0.0)
        assert float(top) == float(tensor.abs().max())


def test_each_kernel_is_batched_once_under_a_code_object_of_its_own() -> None:
    """Dynamo keeps at most 8 compiled variants per code object: the kernels must not share one."""
    wrappers = {name: compiled_kernels._batched(f, name) for name, f in compiled_kernels.FUNCTIONS.items()}
    assert len({wrapper.__code__ for wrapper in wrappers.values()}) == len(compiled_kernels.FUNCTIONS)
    assert compiled_kernels._batched(compiled_kernels.FUNCTIONS["adam"], "adam") is wrappers["adam"]


def _failing_compile(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("no compiler here (injected)")


def test_a_failing_compilation_falls_back_to_the_eager_kernels_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    _use_fused(monkeypatch)
    monkeypatch.setattr(torch, "compile", _failing_compile)
    with pytest.warns(RuntimeWarning, match="could not be compiled on cpu; using the eager kernels"):
        ours, reference, updates = _run(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    _assert_equal_to_copy(ours, reference)
    assert updates.kernel_info == "eager: torch.compile failed (RuntimeError: no compiler here (injected))"
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("a failed compilation is not retried"))
    _, _, again = _run(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    assert again.kernel_info == updates.kernel_info


def test_the_kernel_argument_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="kernel='fast' is not supported: use one of 'auto', 'fused', 'eager'"):
        UpdateNorms(kernel="fast")
    with pytest.raises(ValueError, match="`update_kernel` must be one of"):
        from gradlight.recorder import RecorderOptions

        RecorderOptions(update_kernel="triton")
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")
    with pytest.raises(ValueError, match=r"kernel='fused' needs torch\.compile, but torch\.compile is disabled"):
        UpdateNorms(kernel="fused")
    _, _, updates = _run(lambda p: torch.optim.AdamW(p, lr=1e-2))  # "auto" falls back, and says why
    assert updates.kernel_info == "eager: torch.compile is disabled (TORCH_COMPILE_DISABLE)"


def _largest_allocation(fn: Callable[[], Any]) -> int:
    """The largest single CPU allocation ``fn`` makes, from the allocator's own reports (the profiler's memory
    events: they see the compiled code's buffers too, which a dispatch mode does not)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((event.cpu_memory_usage for event in prof.events() if event.cpu_memory_usage > 0), default=0)


def _fused_logged_step(monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, GradientFlowTracker]:
    """Largest allocation of a steady-state logged step (capture + optimizer step excluded + finalize) with the
    default fused kernel, and the smallest parameter the fused kernel reads, in bytes."""
    monkeypatch.setattr(compiled_kernels, "FAILURES", {})
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 8))
    params = list(net.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    tracker = GradientFlowTracker(net)
    for step in range(3):  # the first logged step compiles; the third is measured
        net(torch.randn(8, 256)).square().mean().backward()
        if step < 2:
            tracker.capture(step=step, params=params, owner=optimizer)
            optimizer.step()
            tracker.finalize()
        else:
            largest = _largest_allocation(lambda: tracker.capture(step=2, params=params, owner=optimizer))
            optimizer.step()
            largest = max(largest, _largest_allocation(tracker.finalize))
        optimizer.zero_grad()
    fused = min(p.numel() * p.element_size() for p in params if p.numel() >= update_ratio.FUSED_MIN_NUMEL)
    return largest, fused, tracker


def test_a_fused_logged_step_allocates_no_parameter_sized_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    largest, smallest_fused, tracker = _fused_logged_step(monkeypatch)
    assert tracker.updates is not None and tracker.updates.kernel_info is not None
    assert tracker.updates.kernel_info.startswith("fused"), tracker.updates.kernel_info
    assert largest < smallest_fused / 4, f"{largest} bytes allocated at once; the fused tensors are >= {smallest_fused}"
    # The measure sees a kernel that is not fused: "compiling" to the plain eager function makes the temporaries
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    unfused, _, _ = _fused_logged_step(monkeypatch)
    assert unfused >= 256 * 512 * 4


def test_nothing_compiles_on_a_step_that_is_not_logged(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradlight.recorder import GradientFlowRecorder
    from gradlight.runfolder import read_run_info

    _use_fused(monkeypatch)
    step = -1
    compiled_at: list[int] = []
    run_at: list[int] = []
    original_compile, original_run = torch.compile, compiled_kernels.CompiledKernels.run
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiled_at.append(step) or original_compile(*a, **k))

    def spy(self: Any, *args: Any) -> Any:
        run_at.append(step)
        return original_run(self, *args)

    monkeypatch.setattr(compiled_kernels.CompiledKernels, "run", spy)
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    recorder = GradientFlowRecorder(net, tmp_path, log_every_n_steps=3, diagnose=False)
    for step in range(7):
        _loss(net, step).backward()
        recorder.capture(step, optimizer)
        optimizer.step()
        recorder.end_step()
        optimizer.zero_grad()
    recorder.close()
    assert compiled_at == [0] and run_at == [0, 3, 6]
    info = read_run_info(tmp_path)
    assert info is not None and info.extra["update_ratio_kernel"] == "fused: torch.compile (Inductor C++) on cpu"


def test_the_recorder_writes_a_forced_eager_kernel_to_the_run_info(tmp_path: Any) -> None:
    from gradlight.recorder import GradientFlowRecorder
    from gradlight.runfolder import read_run_info

    net = Net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    recorder = GradientFlowRecorder(net, tmp_path, log_every_n_steps=1, diagnose=False, update_kernel="eager")
    _loss(net, 0).backward()
    recorder.capture(0, optimizer)
    optimizer.step()
    recorder.end_step()
    recorder.close()
    info = read_run_info(tmp_path)
    assert info is not None and info.extra["update_ratio_kernel"] == "eager: forced (kernel='eager')"
