"""The factorized layer: a dense weight rewritten as a low-rank chain.

W (out x in) ~ up . mid[-1] ... mid[0] . down, with
  down: k x in, mid[i]: k x k (depth - 2 of them), up: out x k (+ the original bias).
Each factor is an `nn.Linear`, so the forward pass is a few plain matmuls and the state
dict keys are ordinary (`<name>.down.weight`, `<name>.mid.0.weight`, `<name>.up.weight`).
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.core.intmm import Packed, pack_for_cpu, runs_packed
from compressor.core.linalg import spectral_factors
from compressor.core.quantize import SCALE_DTYPE, QuantSpec, QuantWeight
from compressor.errors import DlncError

__all__ = [
    "MIN_DEPTH",
    "Factor",
    "FactorizedLinear",
    "QuantLinear",
    "check_depth",
    "dense_layer",
    "dense_weight_of",
    "in_linear_layout",
    "layout_of",
]

MIN_DEPTH = 2
"""A chain has at least two factors (down, up); deeper ones add square inner factors."""


def check_depth(depth: int) -> int:
    """`depth` if it is a valid chain depth, else a `DlncError` naming the parameter."""
    if depth < MIN_DEPTH:
        raise DlncError(f"`depth` must be >= {MIN_DEPTH}, got {depth}")
    return depth


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """The weight of a dense layer in `nn.Linear` layout (out x in).

    transformers' `Conv1D` (GPT-2) stores its weight transposed (in x out); a
    `FactorizedLinear` gives its end-to-end weight, the product of its factors.
    """
    if isinstance(module, FactorizedLinear):
        return module.dense_weight()
    return in_linear_layout(module.weight, layout_of(module))


def in_linear_layout(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """A stored weight of `layout` ("linear" or "conv1d") as out x in (the transpose of a
    `Conv1D`'s); applied twice it gives the stored weight back."""
    return weight.t() if layout == "conv1d" else weight


def layout_of(module: nn.Module) -> str:
    """'conv1d' for transformers' transposed `Conv1D`, 'linear' otherwise."""
    return "conv1d" if type(module).__name__ == "Conv1D" else "linear"


@torch.no_grad()
def dense_layer(weight: torch.Tensor, bias: torch.Tensor | None, layout: str) -> nn.Module:
    """A dense layer of `layout` ("linear": `nn.Linear`, "conv1d": transformers' `Conv1D`)
    holding `weight` (out x in) and `bias`, on their device and in their dtype."""
    out_f, in_f = weight.shape
    if layout == "conv1d":
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(out_f, in_f).to(weight.device, weight.dtype)
        dense.weight.copy_(weight.t())
    else:
        kw = {"dtype": weight.dtype, "device": weight.device}
        dense = nn.Linear(in_f, out_f, bias is not None, **kw)
        dense.weight.copy_(weight)
    if bias is not None:
        dense.bias.copy_(bias)
    return dense


class Factor(nn.Linear):
    """One factor of a chain: an `nn.Linear` (LoRA, pruning and quantization tools see the
    type they know) that skips its random initialisation on the meta device, where it is
    wasted work: a skeleton's factors are filled by the loader (`from_pretrained`,
    `load_state_dict(assign=True)`), and building them is most of a skeleton's cost."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class QuantLinear(nn.Module):
    """A linear layer (linear layout) whose weight is stored quantized: integer codes and a
    float16 scale and 8-bit zero point per group of inputs (`QuantSpec`, compressor/core/
    quantize.py; codes of other widths than 4 and 8 bits, a byte each, stay in memory: an
    export refuses them). The weight stays quantized in memory; a forward of a few rows on a
    CPU with native bfloat16 runs torch's integer kernels on the codes (compressor/core/
    intmm.py, their copy of the codes made on first use), any other dequantizes it for one
    matmul. Used as a factor of a `FactorizedLinear` and for a targeted layer left dense
    (`layout` records what it replaced: a transposed `Conv1D` runs the same map)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if spec.bits == 4 and in_features % 2:
            raise ValueError(f"4-bit codes are stored two a byte: {in_features} inputs is odd")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.layout = "linear"
        shapes = spec.stored_shapes(out_features, in_features)
        for key, dtype in (
            ("qweight", torch.uint8),
            ("scales", SCALE_DTYPE),
            ("zeros", torch.uint8),
        ):
            self.register_buffer(key, torch.zeros(shapes[key], dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_quantized(
        cls, q: QuantWeight, spec: QuantSpec, bias: torch.Tensor | None = None
    ) -> QuantLinear:
        """The layer of a `QuantWeight` `q` quantized by `spec`, and a bias."""
        layer = cls(q.in_features, q.scales.shape[0], spec, bias is not None, device="meta")
        layer.qweight, layer.scales, layer.zeros = q.qweight, q.scales, q.zeros
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The weight (out x in) the codes stand for, in the bias's dtype (float32 without)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return self.quantized().dequantize(dtype)

    def quantized(self) -> QuantWeight:
        """The stored weight (the buffers themselves)."""
        return QuantWeight(self.qweight, self.scales, self.zeros, self.spec.bits, self.in_features)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """A dense layer of the original kind, its weight dequantized."""
        return dense_layer(self.weight, self.bias, self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        packed = self._packed() if runs_packed(x) else None
        if packed is None:
            return nn.functional.linear(x, self.quantized().dequantize(x.dtype), bias)
        y = packed.matmul(x)
        return y if bias is None else y + bias

    def _packed(self) -> Packed | None:
        """The codes in the integer kernel's layout (None: no kernel takes them), made again
        when the codes change (a load into the buffers)."""
        key = (self.qweight.data_ptr(), self.qweight._version, self.scales._version)
        if getattr(self, "_packed_key", None) != key:
            self._packed_cache = pack_for_cpu(self.quantized())
            self._packed_key = key
        return self._packed_cache

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.spec.bits}, group={self.spec.group}"
        )


class FactorizedLinear(nn.Module):
    """A linear layer whose weight is a chain of `depth` factors of inner width `rank`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        depth: int = 2,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_depth(depth)
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"`rank` must be in [1, {min(in_features, out_features)}] for a "
                f"{out_features}x{in_features} layer, got {rank}"
            )
        kw = {"dtype": dtype, "device": device}
        self.layout = "linear"  # "conv1d" when it replaced a transposed GPT-2 Conv1D
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = Factor(in_features, rank, bias=False, **kw)
        self.mid = nn.ModuleList(Factor(rank, rank, bias=False, **kw) for _ in range(depth - 2))
        self.up = Factor(rank, out_features, bias=bias, **kw)

    @property
    def depth(self) -> int:
        return len(self.mid) + 2

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        rank: int,
        depth: int = 2,
        factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> FactorizedLinear:
        """Spectral initialization from a dense `nn.Linear` or `Conv1D`.

        `factors` = (up, down) overrides the plain SVD (e.g. an activation-aware one).
        The inner factors start at the identity, so the chain equals up @ down.
        """
        weight = dense_weight_of(module)
        bias = module.bias
        layer = cls(
            weight.shape[1],
            weight.shape[0],
            rank,
            depth,
            bias is not None,
            dtype=weight.dtype,
            device="meta",
        ).to_empty(device=weight.device)  # fmt: skip  (every factor is set below)
        up, down = factors if factors is not None else spectral_factors(weight, rank)
        layer.load_factors(up, down)
        layer.layout = layout_of(module)
        if bias is not None:
            layer.up.bias.data.copy_(bias.detach())
        return layer

    @torch.no_grad()
    def load_factors(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """Set the chain to up @ I ... I @ down."""
        self.up.weight.copy_(up)
        self.down.weight.copy_(down)
        for m in self.mid:
            m.weight.copy_(torch.eye(self.rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        for m in self.mid:
            x = m(x)
        return self.up(x)

    @torch.no_grad()
    def collapsed_up(self) -> torch.Tensor:
        """up . mid[-1] ... mid[0], in float32 or wider, as one out x k matrix."""
        dtype = torch.promote_types(self.up.weight.dtype, torch.float32)
        a = self.up.weight.to(dtype)
        for m in reversed(self.mid):
            a = a @ m.weight.to(dtype)
        return a

    @torch.no_grad()
    def collapse(self) -> FactorizedLinear:
        """The same map as a depth-2 chain (what is exported)."""
        if not self.mid:
            return self
        p = self.up.weight
        out = FactorizedLinear(
            self.in_features, self.out_features, self.rank, 2, self.up.bias is not None,
            dtype=p.dtype, device=p.device,
        )  # fmt: skip
        out.up.weight.copy_(self.collapsed_up())
        out.down.weight.copy_(self.down.weight)
        out.layout = self.layout
        if self.up.bias is not None:
            out.up.bias.copy_(self.up.bias)
        return out

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The end-to-end weight (out x in) in the layer's dtype."""
        up = self.collapsed_up()
        return (up @ self.down.weight.to(up.dtype)).to(self.up.weight.dtype)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """A dense layer of the original kind (`nn.Linear`, or `Conv1D` for GPT-2 layouts)."""
        return dense_layer(self.dense_weight(), self.up.bias, self.layout)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, depth={self.depth}"
        )
