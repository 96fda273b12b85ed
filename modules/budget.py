"""Token budgets: counts or ratios of N, validated with messages that name the offending value."""

from __future__ import annotations

import math

import torch


def check_budget_spec(value: int | float, name: str) -> None:
    """Reject budgets that are wrong whatever N is (type, sign, ratio above 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an int count or a float ratio of N, got {value!r}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value} is a ratio of N and must lie in (0, 1]")
    if isinstance(value, int) and value <= 0:
        raise ValueError(f"{name}={value} must be a positive number of tokens")


def resolve_budget(value: int | float, num_tokens: int, name: str = "n") -> int:
    """An int count or a float ratio of `num_tokens` -> a count in [1, num_tokens]."""
    check_budget_spec(value, name)
    if isinstance(value, float):
        return max(1, min(num_tokens, math.floor(value * num_tokens + 0.5)))
    if value > num_tokens:
        raise ValueError(f"{name}={value} exceeds the N={num_tokens} visual tokens available")
    return value


def effective_budget(n1: int, n2: int | None, layer: int, num_layers: int) -> float:
    """FLOPs-equivalent visual tokens per decoder layer of a two-stage plan: n1 tokens in layers 0..K-1, n2 after,
    i.e. (K n1 + (L - K) n2) / L; n1 when there is no stage 2."""
    if n2 is None:
        return float(n1)
    return (layer * n1 + (num_layers - layer) * n2) / num_layers


def topk_order(scores: torch.Tensor, n: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The `n` best-scoring tokens per row, best first.

    Ranks valid tokens before padding tokens (so padding is chosen only once every valid token is), then by
    score descending, then by lower index (stable sort). scores: (B, N); valid: (B, N) bool or None.
    """
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    if valid is not None:
        rank_valid = (~valid).gather(-1, order).to(torch.uint8)
        order = order.gather(-1, torch.sort(rank_valid, dim=-1, stable=True).indices)
    return order[:, :n]


def topk_keep(scores: torch.Tensor, n: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The `n` tokens of `topk_order`, sorted ascending (spatial order)."""
    return topk_order(scores, n, valid).sort(dim=-1).values
