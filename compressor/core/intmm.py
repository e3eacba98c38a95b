"""Quantized weights run by torch's integer matmul kernels on the CPU, without dequantizing.

A `QuantLinear` that dequantizes its weight for every matmul is slower than the float32 layer
at decode (session 15: int8 exports decoded at 0.3-0.4x dense). torch ships weight-only
kernels that read the codes directly, `aten._weight_int8pack_mm` (int8 codes, a scale a row)
and `aten._weight_int4pack_mm_for_cpu` (4-bit codes, a scale and an offset a group of
32/64/128/256 inputs). With float32 inputs they are 5-50x slower than float32; with bfloat16
inputs, on a CPU with native bfloat16 (AVX512-BF16 or AMX), they beat float32 at a few rows
and dequantizing up to about 128 rows (docs/benchmarks.md). So a matmul of at most `ROWS` rows
runs them on its inputs rounded to bfloat16, the output back in the input's dtype; more rows
(prefill) dequantize. The rounding (inputs, scales and the kernel's output in bfloat16) moved
SmolLM2's held-out perplexity by under 0.2% (int8 and int4 exports, docs/benchmarks.md).

dlnc's codes are asymmetric (w = (q - zero) * scale, q in [0, 2^bits)); each kernel's form:

- int8, one group a row: q - 128 as int8 codes with the row's scale, plus the row's
  (128 - zero) * scale times the sum of the inputs;
- int4, groups of up to 256 inputs: the kernel's w = (q - 8) * scale + offset, with
  offset = (8 - zero) * scale.

The kernels want the inputs a multiple of 16 (int8), the outputs a multiple of 16 and groups of
32/64/128/256 inputs (int4): a stored group narrower than the kernel's (a factor of rank 120
has groups of 60) gets zero codes after it and the inputs zeros at the same places
(contributing nothing; the kernel does up to twice that layer's work), and extra outputs are
cut off. Other layouts (int8 in groups, int4 groups over 256) dequantize. `Packed` is the
kernel's copy of the codes, made on the first matmul that uses it: as many bytes again as the
codes (an int8 layer then holds 2 bytes a weight in memory, half of float32's).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compressor.core.quantize import QuantWeight, unpack

__all__ = ["ROWS", "Packed", "kernels_available", "pack_for_cpu", "runs_packed"]

ROWS = 64
"""The most rows (tokens a matmul) run by the integer kernels: at 64 rows they took 0.2-0.75x
the time of dequantizing and a float32 matmul on SmolLM2's shapes, at 128 rows 0.4-1.06x, at
256 0.6-1.44x (docs/benchmarks.md); more rows dequantize."""
INT4_GROUPS = (32, 64, 128, 256)
"""The group sizes torch's CPU int4 kernel takes."""
ALIGN = 16
"""The kernels' multiple: int8's inputs, int4's outputs."""
BLOCK = 64
"""Rows packed at a time (a multiple of `ALIGN`: torch packs int4 rows in blocks of 16)."""


@functools.cache
def kernels_available() -> bool:
    """Whether this torch has both kernels and this CPU computes in bfloat16 natively (where
    it does not, bfloat16 is emulated and the kernels were not measured: dequantize)."""
    names = ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu")
    try:
        found = all(hasattr(torch.ops.aten, name) for name in names)
        return found and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def runs_packed(x: torch.Tensor) -> bool:
    """Whether a matmul of `x` goes through the integer kernels: a CPU tensor in float32 or
    bfloat16, at most `ROWS` rows, no gradient to carry (the kernels have none)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and 0 < x.numel() <= ROWS * x.shape[-1]
        and not (x.requires_grad and torch.is_grad_enabled())
        and kernels_available()
    )


@dataclass(frozen=True)
class Packed:
    """A quantized weight in one kernel's layout; `matmul(x)` is x @ W^T (no bias)."""

    bits: int
    codes: torch.Tensor  # int8 (out x in_padded), or int4 packed by torch for the CPU
    scales: torch.Tensor  # bfloat16: a row's scale (int8); group x out x (scale, offset) (int4)
    correction: torch.Tensor | None  # int8: (128 - zero) * scale, float32, a row
    group: int  # the kernel's group: the stored group padded with `pad` zero inputs
    groups: int  # groups a row
    pad: int
    out_features: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        xb = flat.to(torch.bfloat16).contiguous()  # (the kernels read rows contiguous)
        if self.pad:
            xb = F.pad(xb.reshape(-1, self.groups, self.group - self.pad), (0, self.pad))
            xb = xb.view(-1, self.groups * self.group)
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(xb, self.codes, self.scales).to(x.dtype)
            y = y + flat.sum(-1, keepdim=True).to(x.dtype) * self.correction.to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.codes, self.group, self.scales)
            y = y[:, : self.out_features].to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def pack_for_cpu(q: QuantWeight) -> Packed | None:
    """`q` in its kernel's layout, or None when no kernel takes its layout. Built a block of
    `BLOCK` rows at a time into its final tensor: whole-weight int32 temporaries left the
    process's heap 200 MiB larger after packing SmolLM2 (memory freed, not returned)."""
    out_f, groups = q.scales.shape
    size = q.in_features // groups
    scales, zeros = q.scales.float(), q.zeros.float()
    if q.bits == 8 and groups == 1:
        pad = -size % ALIGN
        codes = torch.zeros(out_f, size + pad, dtype=torch.int8)
        codes[:, :size] = (q.qweight ^ 0x80).view(torch.int8)  # q - 128, bit for bit
        correction = (128 - zeros[:, 0]) * scales[:, 0]
        return Packed(8, codes, scales[:, 0].bfloat16(), correction, size + pad, 1, pad, out_f)
    if q.bits != 4 or size > INT4_GROUPS[-1]:
        return None
    group, rows = next(g for g in INT4_GROUPS if g >= size), out_f + -out_f % ALIGN
    packed = torch.empty(rows, groups * group // 2, dtype=torch.uint8)
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    for start in range(0, rows, BLOCK):
        block = torch.zeros(min(BLOCK, rows - start), groups, group, dtype=torch.int32)
        codes = unpack(q.qweight[start : start + BLOCK], 4, q.in_features)
        block[: len(codes), :, :size] = codes.view(-1, groups, size)
        packed[start : start + len(block)] = convert(block.view(len(block), -1), 1)
    offsets = (8 - zeros) * scales
    pairs = F.pad(torch.stack([scales, offsets], -1), (0, 0, 0, 0, 0, rows - out_f))
    pairs = pairs.transpose(0, 1).contiguous().bfloat16()  # groups x out x 2
    return Packed(4, packed, pairs, None, group, groups, group - size, out_f)
