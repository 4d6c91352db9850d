"""How statistics combine across ranks, chosen from the Trainer's strategy.

Single-process and DDP runs hold whole gradients on every rank, so no collective is needed.
"""

from __future__ import annotations

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from gradlight.stats import CrossRankReduction, LocalReduction

__all__ = ["SHARDING_MODES", "resolve_reduction"]

SHARDING_MODES = ("auto", "none")


def resolve_reduction(strategy: object, sharding: str | CrossRankReduction = "auto") -> CrossRankReduction:
    """Pick the cross-rank reduction for ``strategy``; a ``CrossRankReduction`` passed in is used as is.

    Raises:
        ValueError: If ``sharding`` is an unknown mode.
    """
    if not isinstance(sharding, str):
        return sharding
    if sharding not in SHARDING_MODES:
        raise ValueError(
            f"`sharding` must be one of {SHARDING_MODES} or a CrossRankReduction, got {sharding!r}."
        )
    name = type(strategy).__name__
    if sharding == "auto" and ("FSDP" in name or "ModelParallel" in name or "DeepSpeed" in name):
        rank_zero_warn(
            f"gradlight: {name} shards gradients; per-layer statistics are this rank's shard only."
        )
    return LocalReduction()
