"""EMA against a float64 reference, its schedule, swapping and state; the ZeRO-3 partition reassembly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vae_train.ema import EMA, full_weights


def test_ema_matches_float64_reference_with_start_and_every() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    ema = EMA(model, decay=0.9, start_step=2, every_steps=3)
    reference: dict[str, torch.Tensor] = {}
    for step in range(1, 12):
        with torch.no_grad():  # a fake optimizer step
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.update(step)
        if step >= 2 and (step - 2) % 3 == 0:
            current = {n: p.detach().double().clone() for n, p in model.named_parameters()}
            reference = current if not reference else {n: 0.9 * reference[n] + 0.1 * current[n] for n in current}
    assert ema.initialized and sorted(ema.shadow) == sorted(reference)
    for name, value in ema.shadow.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), reference[name], rtol=0, atol=1e-6)


def test_swapped_puts_the_ema_in_and_restores_the_weights_bitwise() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    ema = EMA(model, decay=0.5)
    with ema.swapped():  # before the first update: nothing to swap
        pass
    ema.update(0)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(1.0)
    moved = model.weight.detach().clone()
    with ema.swapped():
        assert torch.equal(model.weight, raw["weight"])
    assert torch.equal(model.weight, moved)


def test_state_round_trip_and_layout_mismatch() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    ema.update(0)
    other = EMA(nn.Linear(3, 2), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.initialized and all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    partitioned_state = dict(ema.state_dict(), partitioned=True)
    with pytest.raises(ValueError, match="ZeRO stage"):
        other.load_state_dict(partitioned_state)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_full_weights_undoes_zero3_partitioning() -> None:
    """ZeRO-3 gives rank r the r-th equal slice of the flattened parameter padded to a multiple of the world size."""
    weight = torch.arange(10.0).view(2, 5)
    world = 3
    part = -(-weight.numel() // world)
    padded = torch.cat([weight.flatten(), torch.zeros(part * world - weight.numel())])
    states = [{"partitioned": True, "shapes": {"w": [2, 5]}, "tensors": {"w": padded[r * part:(r + 1) * part]}}
              for r in range(world)]
    assert torch.equal(full_weights(states)["w"], weight)
