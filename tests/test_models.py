"""Model construction, initialisation and the L2 kernel penalty."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fitscope.core.errors import FitscopeError
from fitscope.model.mlp import (
    FastDropout,
    build_mlp,
    count_parameters,
    keep_mask,
    kernel_weights,
    l2_penalty,
)
from fitscope.training.module import build_optimizer


def test_capacity_ladder_parameter_counts():
    # Tiny = 16 elu; Small = 16-16; Medium = 64x3; Large = 512x4 on 28 inputs, one logit.
    counts = {
        name: count_parameters(build_mlp(28, 1, width=w, depth=d))
        for name, (w, d) in {
            "tiny": (16, 1),
            "small": (16, 2),
            "medium": (64, 3),
            "large": (512, 4),
        }.items()
    }
    assert counts == {
        "tiny": 28 * 16 + 16 + 17,
        "small": 464 + 272 + 17,
        "medium": 1856 + 2 * 4160 + 65,
        "large": 14848 + 3 * 262656 + 513,
    }


def test_blocks_follow_config():
    model = build_mlp(28, 1, width=8, depth=2, dropout=0.5, batchnorm=True, activation="relu")
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "FastDropout"] * 2 + ["Linear"]


def test_glorot_and_he_init_with_zero_bias():
    torch.manual_seed(0)
    glorot = build_mlp(100, 10, width=400, depth=1, init="glorot_uniform")
    bound = math.sqrt(6 / (100 + 400))
    assert glorot[0].weight.abs().max() <= bound and glorot[0].weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(glorot[0].bias) == 0
    he = build_mlp(784, 10, width=1000, depth=1, init="he_normal")
    assert he[0].weight.std().item() == pytest.approx(math.sqrt(2 / 784), rel=0.02)
    assert he[2].weight.std().item() == pytest.approx(math.sqrt(2 / 1000), rel=0.05)


def test_l2_penalty_equals_hand_computation():
    model = build_mlp(2, 1, width=2, depth=1)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        model[0].bias.fill_(5.0)  # biases are never penalised
        model[2].weight.copy_(torch.tensor([[0.5, -2.0]]))
    hidden_only = l2_penalty(model, 0.001, include_output=False)
    assert hidden_only.item() == pytest.approx(0.001 * (1 + 4 + 9 + 1))
    everything = l2_penalty(model, 0.05, include_output=True)
    assert everything.item() == pytest.approx(0.05 * (15 + 0.25 + 4))
    assert len(kernel_weights(model, include_output=False)) == 1


def test_l2_gradient_is_2c_w():
    model = build_mlp(3, 1, width=4, depth=1)
    l2_penalty(model, 0.1, include_output=False).backward()
    torch.testing.assert_close(model[0].weight.grad, 2 * 0.1 * model[0].weight.detach())
    assert model[0].bias.grad is None


def test_fast_dropout_matches_dropout_statistics():
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    drop = FastDropout(0.5).train()
    y = drop(x)
    assert set(torch.unique(y).tolist()) == {0.0, 2.0}
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    y.sum().backward()  # the gradient flows through the kept elements only, scaled
    assert torch.equal(x.grad, y.detach())
    assert torch.equal(drop.eval()(x), x)
    assert isinstance(drop, nn.Module)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8])
def test_keep_mask_keeps_each_element_with_probability_keep(dtype, keep):
    torch.manual_seed(1)
    mask = keep_mask(torch.empty(400_001, dtype=dtype), keep)  # not a multiple of 4
    assert mask.dtype == dtype and mask.shape == (400_001,)
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}
    # 400k draws: the kept fraction's std is under 0.001
    assert mask.double().mean().item() == pytest.approx(keep, abs=0.004)
    lanes = mask[:400_000].double().view(-1, 4).mean(0)  # each 16-bit lane of a 64-bit draw
    assert lanes.tolist() == pytest.approx([keep] * 4, abs=0.008)


def test_keep_mask_at_the_extremes_of_keep():
    x = torch.empty(100_000)
    assert keep_mask(x, 1e-6).sum().item() == 0  # under one level of 2**-15: never kept
    almost_all = keep_mask(x, 0.99999).mean().item()  # capped at 32767 / 32768
    assert 0.9990 < almost_all < 1.0


def test_keep_mask_is_seeded_by_the_default_generator():
    x = torch.empty(3, 5, 7)
    torch.manual_seed(3)
    first = keep_mask(x, 0.5)
    torch.manual_seed(3)
    assert first.shape == x.shape and torch.equal(keep_mask(x, 0.5), first)
    assert not torch.equal(keep_mask(x, 0.5), first)


def test_parameters_off_cpu_and_cuda_get_the_unfused_optimizer():
    on_meta = [nn.Parameter(torch.empty(4, 4, device="meta"))]
    assert not build_optimizer(on_meta, {"name": "adam", "lr": 0.1}).defaults["fused"]


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_the_fused_optimizer_takes_the_unfused_step(name):
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    cfg = {"name": name, "lr": 0.01, "eps": 1e-7, "momentum": 0.9}
    fused = [nn.Parameter(w.clone()) for w in weights]
    plain = [nn.Parameter(w.clone()) for w in weights]
    optimizer = build_optimizer(fused, cfg)
    assert optimizer.defaults["fused"]
    if name == "adam":
        reference = torch.optim.Adam(plain, lr=0.01, eps=1e-7)
    else:
        reference = torch.optim.SGD(plain, lr=0.01, momentum=0.9)
    for _ in range(5):
        grads = [torch.randn_like(w) for w in weights]
        for params, opt in ((fused, optimizer), (plain, reference)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(fused[0], weights[0])


def test_unknown_activation_is_refused():
    with pytest.raises(FitscopeError, match="unknown activation 'swish'"):
        build_mlp(2, 1, width=2, depth=1, activation="swish")
