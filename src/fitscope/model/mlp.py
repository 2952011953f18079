"""The one place that builds a model: an MLP described by config."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from fitscope.core.errors import FitscopeError

ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
INITS = ("glorot_uniform", "he_normal", "torch_default")


# The bit pattern of 1.0 in each float type, and the integer type of the same width.
_ONE_BITS = {
    torch.bfloat16: (torch.int16, 0x3F80),
    torch.float16: (torch.int16, 0x3C00),
    torch.float32: (torch.int32, 0x3F800000),
    torch.float64: (torch.int64, 0x3FF0000000000000),
}
_KEEP_LEVELS = 1 << 15  # a mask element is kept with probability round(keep * 2**15) / 2**15


def keep_mask(x: torch.Tensor, keep: float) -> torch.Tensor:
    """A 0/1 mask shaped and typed like ``x``, each element 1 with probability ``keep``
    (to within 2**-15): four 15-bit draws from each 64-bit ``random_`` of the default
    generator (CPU and CUDA; elsewhere, e.g. MPS, whose int64 draws are 32-bit, a
    ``rand_like`` mask).

    Why: ``rand_like(x) < keep`` draws 32 bits per element and converts them to floats,
    then a bool mask multiplies slowly; on a 500x512 bf16 batch that took 1.35 ms a layer
    and this 0.33 ms (docs/benchmarks.md, issue 22). The mask is built in integers and
    read as floats: 1.0's bit pattern where a draw falls under the threshold, else 0.
    """
    if x.device.type not in ("cpu", "cuda"):
        return (torch.rand_like(x) < keep).to(x.dtype)
    count = x.numel()
    threshold = min(round(keep * _KEEP_LEVELS), _KEEP_LEVELS - 1)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=x.device).random_()
    # random_ leaves an int64's sign bit clear: the 15 low bits of each 16-bit lane.
    draws = words.view(torch.int16)[:count] & (_KEEP_LEVELS - 1)
    kept = draws.sub_(threshold).bitwise_right_shift_(15)  # -1 (all ones) where kept, else 0
    if x.dtype not in _ONE_BITS:
        return (kept != 0).to(x.dtype).view(x.shape)
    int_type, one = _ONE_BITS[x.dtype]
    return kept.to(int_type).bitwise_and_(one).view(x.dtype).view(x.shape)


class FastDropout(nn.Module):
    """Inverted dropout (``x * mask / keep``, the maths of ``nn.Dropout``) with the cheap
    :func:`keep_mask`: a ``rand_like`` mask took 4x (bf16) and 2.5x (fp32) as long on a
    500x512 layer, ``nn.Dropout`` longer still (docs/benchmarks.md). Draws from the
    default generator, which checkpoints save, so a resumed run draws the same masks."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        return x * keep_mask(x, keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def build_mlp(
    in_features: int,
    out_features: int,
    *,
    width: int,
    depth: int,
    activation: str = "elu",
    dropout: float = 0.0,
    batchnorm: bool = False,
    init: str = "glorot_uniform",
) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units, then a linear output layer (logits).

    Each hidden block is Linear -> [BatchNorm] -> activation -> [Dropout].
    """
    if activation not in ACTIVATIONS:
        raise FitscopeError(
            f"unknown activation {activation!r}. Fix: use one of {list(ACTIVATIONS)}"
        )
    if init not in INITS:
        raise FitscopeError(f"unknown init {init!r}. Fix: use one of {list(INITS)}")
    layers: list[nn.Module] = []
    fan_in = in_features
    for _ in range(depth):
        layers.append(nn.Linear(fan_in, width))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(FastDropout(dropout))
        fan_in = width
    layers.append(nn.Linear(fan_in, out_features))
    model = nn.Sequential(*layers)
    _initialize(model, init)
    return model


def build_mlp_for(data: Any, model: Any, reg: Any, in_features: int, init: str | None = None):
    """``build_mlp`` from the typed ``data``, ``model`` and ``regularization`` sections of
    the config (fitscope.pipeline.schema), as a run trains it.

    ``init`` overrides ``model.init`` (e.g. ``torch_default`` before loading weights).
    """
    outputs = 1 if data.task == "binary" else data.num_classes
    return build_mlp(
        in_features,
        outputs,
        width=model.width,
        depth=model.depth,
        activation=model.activation,
        dropout=reg.dropout,
        batchnorm=reg.batchnorm,
        init=init or model.init,
    )


def build_mlp_from_config(
    cfg: Mapping[str, Any], in_features: int, init: str | None = None
) -> nn.Sequential:
    """The MLP of a saved resolved config (model.pt's ``config``, a pending record's), a
    plain mapping read back from a file: :func:`build_mlp_for` on its sections."""
    sections = (SimpleNamespace(**cfg[k]) for k in ("data", "model", "regularization"))
    return build_mlp_for(*sections, in_features, init=init)


def _initialize(model: nn.Module, init: str) -> None:
    if init == "torch_default":
        return
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if init == "glorot_uniform":  # Keras Dense default
                nn.init.xavier_uniform_(module.weight)
            else:  # he_normal: std = sqrt(2 / fan_in), as in "Deep Learning from Scratch"
                nn.init.normal_(module.weight, std=math.sqrt(2.0 / module.in_features))
            nn.init.zeros_(module.bias)


def kernel_weights(model: nn.Module, *, include_output: bool) -> list[torch.Tensor]:
    """The Linear weight matrices an L2 kernel penalty applies to (never biases)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    chosen = linears if include_output else linears[:-1]
    return [m.weight for m in chosen]


def l2_penalty(model: nn.Module, coefficient: float, *, include_output: bool) -> torch.Tensor:
    """``coefficient * sum(W**2)`` over kernels, like Keras ``kernel_regularizer=l2(c)``."""
    weights = kernel_weights(model, include_output=include_output)
    if coefficient == 0.0 or not weights:
        return torch.zeros((), device=next(model.parameters()).device)
    return coefficient * sum(w.pow(2).sum() for w in weights)


def epoch_flop(
    in_features: int, out_features: int, width: int, depth: int, train_rows: int, val_rows: int
) -> float:
    """The matmul FLOPs of one epoch of a ``width`` x ``depth`` MLP: 2 per multiply-add of
    every Linear layer, 3x that for a training row (forward, input and weight gradients),
    1x for a validation row. What a study's hardware floor counts (nothing else is free)."""
    dims = [in_features, *([width] * depth), out_features]
    macs = sum(a * b for a, b in itertools.pairwise(dims))
    return 2.0 * macs * (3 * train_rows + val_rows)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ProbabilityModel(nn.Module):
    """Wraps an MLP so predictions are probabilities (sigmoid or softmax), for serving."""

    def __init__(self, mlp: nn.Module, task: str) -> None:
        super().__init__()
        self.mlp = mlp
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.mlp(x)
        if self.task == "binary":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)


def model_from_weights(config: dict[str, Any], state: dict[str, Any], num_features: int):
    """The :class:`ProbabilityModel` a run saved: its MLP rebuilt from the resolved
    ``config`` with the saved ``state`` (``state_dict`` and ``task``) loaded into it."""
    mlp = build_mlp_from_config(config, num_features, init="torch_default")
    mlp.load_state_dict(state["state_dict"])
    return ProbabilityModel(mlp, state["task"])
