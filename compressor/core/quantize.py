"""Weight quantization, the maths: integers, scales and zero points of a weight, by rounding
to nearest or by GPTQ's error-aware rounding, and the factors of a chain quantized so that
the layer's output stays closest to what it was.

A weight (out x in) is cut into groups of `group` consecutive inputs of one output row; each
group has a scale and an integer zero point (asymmetric min-max, as GPTQ and HQQ store it):

    w ~ (q - zero) * scale,   q, zero integers in [0, 2^bits - 1]

Storage (`QuantWeight`): `qweight` uint8 (out x in for 8 bits; two 4-bit codes a byte, out x
in/2, for 4 bits), `scales` float16 and `zeros` uint8 (out x groups). Bits per weight:
bits + 24 / group.

GPTQ (Frantar et al., 2022) rounds one input column at a time and spreads its error over the
columns not yet rounded, weighted by the inverse of the layer input's Gram H = X^T X, which
minimises ||(W - Q) X^T||. The calibration Grams are the ones dlnc collects anyway.

A factorized layer W ~ up @ down (`quantize_chain`): down is rounded by GPTQ on its input Gram,
then up by GPTQ on its own input's Gram, down_q H down_q^T (what the rounded down factor hands
it). Refitting up in closed form to the rounded down factor first (the least-squares up for
the layer's output) was measured and dropped: on SmolLM2-135M at keep 0.8 + int4 it gave
held-out perplexity 40.35 against 40.24 without (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compressor.errors import DlncError

__all__ = [
    "BITS",
    "FORMATS",
    "QuantSpec",
    "QuantWeight",
    "gptq",
    "keep_for_bits",
    "pack",
    "quantize_chain",
    "round_to_nearest",
    "spec_of",
    "unpack",
]

BITS = (4, 8)
"""The widths an export stores (4-bit codes two a byte, 8-bit one a byte)."""
FORMATS = {"int8": 8, "int4": 4}
"""The `quantize` option's values and the bits of a code of each."""
DEFAULT_GROUP = {8: 0, 4: 64}
"""Inputs a scale covers unless `group_size` says: int8 one scale a row (what int8 matmul
kernels take), int4 groups of 64 (a row's range is too wide for 16 levels)."""
SCALE_DTYPE = torch.float16
DAMPING = 0.01
"""GPTQ's damping: this fraction of the Gram's mean diagonal added to its diagonal."""
BLOCK = 128
"""Columns GPTQ rounds before it spreads their error over the rest in one matmul."""


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized: `bits` per code, `group` inputs per scale (0: a whole row)."""

    bits: int = 4
    group: int = 64

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise DlncError(f"`bits` must be in [2, 8], got {self.bits}")
        if self.group < 0:
            raise DlncError(f"`group` must be >= 0 (0: one scale a row), got {self.group}")

    def group_of(self, in_features: int) -> int:
        """The group size for a weight of `in_features` inputs: `group`, or when it does not
        divide them (a factor's rank) the largest divisor between half of it and it; a whole
        row when `group` is 0, at least the inputs, or has no such divisor."""
        if self.group == 0 or in_features <= self.group:
            return in_features
        for size in range(self.group, self.group // 2 - 1, -1):
            if size and in_features % size == 0:
                return size
        return in_features

    def stored_shapes(self, out_features: int, in_features: int) -> dict[str, list[int]]:
        """The shapes of a stored weight's tensors (`QuantWeight.tensors`), by name."""
        codes = in_features // 2 if self.bits == 4 else in_features  # (others: a byte each)
        groups = in_features // self.group_of(in_features)
        return {
            "qweight": [out_features, codes],
            "scales": [out_features, groups],
            "zeros": [out_features, groups],
        }

    def bits_per_weight(self, in_features: int) -> float:
        """Stored bits a weight: its code, and its group's float16 scale and 8-bit zero."""
        return self.bits + 24 / self.group_of(in_features)


def spec_of(quantize: str | None, group_size: int | None = None) -> QuantSpec | None:
    """The `QuantSpec` of the `quantize` and `group_size` options (None: float weights;
    `group_size` None: the format's `DEFAULT_GROUP`)."""
    if group_size is not None and group_size < 0:
        raise DlncError(f"`group_size` must be >= 0 (0: one scale a row), got {group_size}")
    if quantize is None:
        return None
    if quantize not in FORMATS:
        raise DlncError(f"`quantize` must be one of {', '.join(FORMATS)}, got {quantize!r}")
    bits = FORMATS[quantize]
    return QuantSpec(bits, DEFAULT_GROUP[bits] if group_size is None else group_size)


@dataclass
class QuantWeight:
    """A quantized weight as stored: codes, and each group's scale and zero point."""

    qweight: torch.Tensor  # uint8, out x in (8 bits) or out x in/2 (4 bits, packed)
    scales: torch.Tensor  # float16, out x groups
    zeros: torch.Tensor  # uint8, out x groups
    bits: int
    in_features: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out x in) the codes stand for, in `dtype`."""
        q = unpack(self.qweight, self.bits, self.in_features)
        groups = self.scales.shape[1]
        q = q.view(q.shape[0], groups, -1).to(dtype)
        zero = self.zeros.to(dtype).unsqueeze(-1)
        w = (q - zero) * self.scales.to(dtype).unsqueeze(-1)
        return w.view(q.shape[0], self.in_features)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (out x in, values < 2^bits) as stored: uint8, two 4-bit codes a byte."""
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    if bits != 4:
        raise DlncError(f"`bits` must be one of {BITS} to be stored, got {bits}")
    if q.shape[-1] % 2:
        raise DlncError(f"4-bit codes are stored two a byte: {q.shape[-1]} inputs is odd")
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack(stored: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The codes (out x in, uint8) of `pack`'s output."""
    if bits != 4:
        return stored  # 8 bits as stored; other widths (fake-quantized, not stored) unpacked
    out = torch.empty(stored.shape[0], in_features, dtype=torch.uint8, device=stored.device)
    out[:, 0::2] = stored & 0x0F
    out[:, 1::2] = stored >> 4
    return out


def _grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero of each row of `w` (rows x group): min-max over the group,
    zero kept in range; the scale as float16 will store it (so rounding uses what is stored)."""
    top = 2**bits - 1
    lo = w.amin(-1, keepdim=True).clamp_max(0)
    hi = w.amax(-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / top).clamp_min(1e-8)
    scale = scale.to(SCALE_DTYPE).float().clamp_min(2**-24)  # float16's smallest step
    zero = (-lo / scale).round().clamp(0, top)
    return scale, zero


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (w / scale + zero).round().clamp(0, 2**bits - 1)


def _stored(codes, scales, zeros, bits: int, in_features: int) -> QuantWeight:
    scales = torch.cat(scales, 1)
    if not torch.isfinite(scales.to(SCALE_DTYPE)).all():
        raise DlncError("a weight group's scale overflows float16; its values are too large")
    return QuantWeight(
        pack(codes, bits) if bits in BITS else codes.to(torch.uint8),
        scales.to(SCALE_DTYPE),
        torch.cat(zeros, 1).to(torch.uint8),
        bits,
        in_features,
    )


@torch.no_grad()
def round_to_nearest(w: torch.Tensor, spec: QuantSpec) -> QuantWeight:
    """`w` (out x in) rounded to the nearest code of its group's min-max grid."""
    w = w.detach().float()
    g = spec.group_of(w.shape[1])
    codes, scales, zeros = [], [], []
    for i in range(0, w.shape[1], g):
        scale, zero = _grid(w[:, i : i + g], spec.bits)
        codes.append(_round(w[:, i : i + g], scale, zero, spec.bits))
        scales.append(scale)
        zeros.append(zero)
    return _stored(torch.cat(codes, 1), scales, zeros, spec.bits, w.shape[1])


@torch.no_grad()
def gptq(
    w: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, damping: float | None = None
) -> QuantWeight:
    """`w` (out x in) rounded by GPTQ for inputs whose Gram is `gram` (in x in): the codes
    that make ||(W - Q) X^T|| small, column by column (each group's grid set when its first
    column is reached, from the columns as updated so far)."""
    w = w.detach().float().clone()
    rows, cols = w.shape
    g = spec.group_of(cols)
    h = gram.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damping = DAMPING if damping is None else damping
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    inv = torch.linalg.cholesky(torch.cholesky_inverse(_cholesky(h)), upper=True).float()
    codes = torch.zeros(rows, cols)
    scales, zeros = [], []
    block = max(BLOCK // g, 1) * g  # whole groups a block
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1)
        h1 = inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if i % g == 0:
                scale, zero = _grid(w1[:, i : i + g], spec.bits)
                scales.append(scale)
                zeros.append(zero)
            col = w1[:, i : i + 1]
            q = _round(col, scale, zero, spec.bits)
            codes[:, i1 + i] = q[:, 0]
            e = (col - (q - zero) * scale) / h1[i, i]
            w1[:, i:] -= e @ h1[i : i + 1, i:]
            err[:, i] = e[:, 0]
        w[:, i2:] -= err @ inv[i1:i2, i2:]
    return _stored(codes, scales, zeros, spec.bits, cols)


def _cholesky(h: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of `h`, adding damping tenfold until it is positive definite."""
    extra = 1e-6 * float(torch.diagonal(h).mean())
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return factor
        h = h + extra * torch.eye(h.shape[0], dtype=h.dtype)
        extra *= 10
    raise DlncError("a layer's input Gram is not positive definite even after damping")


@torch.no_grad()
def quantize_chain(
    up: torch.Tensor, down: torch.Tensor, gram: torch.Tensor | None, spec: QuantSpec
) -> tuple[QuantWeight, QuantWeight]:
    """The factors of W ~ up @ down quantized: (up, down). With `gram` (the layer input's),
    down by GPTQ, then up by GPTQ on the Gram of the rounded down factor's outputs; without,
    both rounded to nearest."""
    if gram is None:
        return round_to_nearest(up, spec), round_to_nearest(down, spec)
    down_q = gptq(down, gram, spec)
    dq = down_q.dequantize().double()
    inner = (dq @ gram.double() @ dq.T).float()
    return gptq(up, inner, spec), down_q


def keep_for_bits(
    bits: float,
    spec: QuantSpec,
    targeted: Sequence[tuple[int, int]],
    others: Sequence[tuple[int, int]] = (),
) -> float:
    """The `keep` of the targeted layers (shapes out x in) at which the quantized layers, the
    targeted ones factorized and the `others` kept dense, store `bits` a weight on average
    (all quantized by `spec`, each code with its group's scale and zero). A `DlncError` when
    quantization alone already meets it, or when even the others alone exceed it."""
    per = spec.bits + (24 / spec.group if spec.group else 0)  # (a row's scale: next to none)
    t = sum(o * i for o, i in targeted)
    rest = sum(o * i for o, i in others)
    keep = (bits * (t + rest) - per * rest) / (per * t) if t else 0.0
    if keep >= 1:
        raise DlncError(
            f"`bits_per_weight` {bits:g}: int{spec.bits} alone stores about {per:.2f} bits a "
            "weight; quantize without factorizing (dlnc quantize), or ask for fewer bits"
        )
    if keep <= 0.02:
        raise DlncError(
            f"`bits_per_weight` {bits:g} is too small: the layers kept dense take "
            f"{per * rest / (t + rest):.2f} bits a weight by themselves"
        )
    return keep
