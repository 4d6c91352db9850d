"""The anomaly policy alone: decide (pure), agree (one all-reduce), act; no model, recorder or diagnosis."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from gradlight import Collectives, Finding, GradientAnomalyError
from gradlight.anomaly import AnomalyPolicy, Decision
from gradlight.diagnosis import resolve_actions


def _finding(kind: str, layer: str = "fc") -> Finding:
    return Finding(kind, layer, 3, 3, f"{kind} in {layer}", "a cause", "a remedy")


def _policy(on_anomaly: str | dict[str, str], collectives: Collectives | None = None) -> AnomalyPolicy:
    messages: list[str] = []
    policy = AnomalyPolicy(resolve_actions(on_anomaly), collectives or Collectives(), messages.append)
    policy.messages = messages  # type: ignore[attr-defined]
    return policy


def test_decide_sorts_warning_findings_by_their_action() -> None:
    policy = _policy({"non_finite": "raise", "exploding": "stop", "default": "warn"})
    nan, boom, vanish = _finding("non_finite"), _finding("exploding"), _finding("vanishing")
    decision = policy.decide([nan, boom, vanish])
    assert decision.to_raise == (nan,) and decision.to_stop == (boom,)
    assert decision.warn == (boom, vanish)  # "stop" warns too; "raise" says it in the exception
    assert decision.raise_ and decision.stop
    assert policy.messages == [] and not policy.should_stop  # type: ignore[attr-defined]  # deciding acts on nothing


def test_decide_ignores_notes_and_ignored_kinds() -> None:
    policy = _policy({"vanishing": "ignore", "default": "raise"})
    note = Finding("exploding", "fc", 0, 0, "m", "c", "r", severity="note")
    decision = policy.decide([note, _finding("vanishing")])
    assert decision == Decision((note, _finding("vanishing")))
    assert not decision.raise_ and not decision.stop and decision.warn == ()


def test_a_final_decision_only_warns() -> None:
    decision = _policy("stop").decide([_finding("exploding")], final=True)
    assert decision.warn and not decision.stop and not decision.raise_


def test_act_warns_flushes_then_stops_or_raises() -> None:
    flushed: list[int] = []
    policy = _policy("stop")
    policy.act(policy.decide([_finding("exploding")]), step=7, flush=lambda: flushed.append(1))
    assert policy.should_stop and flushed == [1]
    assert policy.messages[-1] == "gradlight: stopping the run at step 8 (exploding)."  # type: ignore[attr-defined]
    raising = _policy("raise")
    with pytest.raises(GradientAnomalyError):
        raising.act(raising.decide([_finding("non_finite")]), step=7, flush=lambda: flushed.append(2))
    assert flushed == [1, 2]


def test_agree_takes_another_ranks_stop() -> None:
    def other_rank_stops(flags: Tensor) -> Tensor:
        return flags + torch.tensor([0.0, 1.0])

    policy = _policy("stop", Collectives(world_size=2, global_rank=1, all_reduce_sum=other_rank_stops))
    agreed = policy.agree(policy.decide([]))
    assert agreed.stop and not agreed.raise_
    policy.act(agreed, step=1, flush=lambda: None)
    assert policy.should_stop and policy.messages == []  # type: ignore[attr-defined]  # rank one does not warn


def test_agree_needs_no_collective_when_no_action_stops_or_raises() -> None:
    def fail(flags: Tensor) -> Tensor:
        raise AssertionError("no collective expected")

    policy = _policy("warn", Collectives(world_size=2, global_rank=0, all_reduce_sum=fail))
    decision = policy.decide([_finding("exploding")])
    assert policy.agree(decision) is decision
