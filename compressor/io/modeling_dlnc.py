"""Loading a dlnc factorized export with transformers alone: `trust_remote_code=True`.

This file is copied into every factorized export as `modeling_dlnc.py`, and config.json's
`auto_map` points each `AutoModel*` class that serves the architecture at a loader here
(`AutoModelForCausalLM` -> `modeling_dlnc.DlncModelForCausalLM`). It imports only torch and
transformers, so someone without dlnc loads the export with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`: transformers' own class
for the architecture, built with each layer of config.json's `dlnc` section replaced by two
plain `nn.Linear` factors (`<name>.down`, `<name>.up`), into which the stored factors load.
A quantized export's factors, and its quantized layers left dense (the section's `quantized`),
are `QuantLinear`s: integer codes, scales and zero points, dequantized for each matmul (a
matmul of a few rows on a CPU with native bfloat16 runs torch's integer kernels instead).
The outputs are those of `compressor.load_pretrained`, bit for bit (the same operations).
"""

from __future__ import annotations

import copy
import json
import shutil
from functools import cache, partial
from pathlib import Path
from types import MethodType

import torch
import transformers
from torch import nn

AUTO_CLASSES = (
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMultipleChoice",
    "AutoModelForNextSentencePrediction",
    "AutoModelForImageClassification",
    "AutoModelForMaskedImageModeling",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForAudioClassification",
    "AutoModelForCTC",
    "AutoModelForPreTraining",
    "AutoModel",
)
"""The auto classes an export may name in `auto_map`, the most specific first (a model card's
snippet names the first that builds the export's architecture)."""
GUARD_KEYS = ("quantization_config", "transformers_weights")
"""config.json fields that route a load to the dlnc quantizer or stop a load without dlnc;
this loader does not need them and removes them from the config it builds with."""


class FactorizedLinear(nn.Module):
    """A linear layer stored as two factors: `up(down(x))`, down k x in, up out x k (+ bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class QuantLinear(nn.Module):
    """A linear layer stored quantized: codes (uint8; 4-bit ones two a byte, low nibble
    first), a float16 scale and an 8-bit zero point per group of inputs."""

    def __init__(self, in_features: int, out_features: int, spec: dict, bias: bool) -> None:
        super().__init__()
        self.in_features, self.bits = in_features, spec["bits"]
        groups = in_features // group_of(spec["group"], in_features)
        width = in_features // 2 if self.bits == 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        packed = self._packed() if _runs_packed(x) else None
        if packed is not None:
            y = _packed_matmul(packed, x)
            return y if bias is None else y + bias
        q = _codes(self.qweight, self.bits, self.in_features)
        groups = self.scales.shape[1]
        q = q.view(q.shape[0], groups, -1).to(x.dtype)
        w = (q - self.zeros.to(x.dtype).unsqueeze(-1)) * self.scales.to(x.dtype).unsqueeze(-1)
        return nn.functional.linear(x, w.view(q.shape[0], self.in_features), bias)

    def _packed(self) -> dict | None:
        key = (self.qweight.data_ptr(), self.qweight._version, self.scales._version)
        if getattr(self, "_packed_key", None) != key:
            self._packed_cache, self._packed_key = _pack(self), key
        return self._packed_cache


# A matmul of at most 64 rows on a CPU with native bfloat16 runs torch's integer kernels on the
# codes, its inputs rounded to bfloat16, as dlnc's `compressor/core/intmm.py` does (the same
# operations, so the outputs stay equal bit for bit).
_ROWS, _ALIGN, _BLOCK, _INT4_GROUPS = 64, 16, 64, (32, 64, 128, 256)


def _codes(stored: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The codes (out x in, uint8) as stored: 4-bit ones two a byte, low nibble first."""
    if bits != 4:
        return stored
    q = torch.empty(stored.shape[0], in_features, dtype=torch.uint8, device=stored.device)
    q[:, 0::2], q[:, 1::2] = stored & 0x0F, stored >> 4
    return q


def _runs_packed(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not 0 < x.numel() <= _ROWS * x.shape[-1] or (x.requires_grad and torch.is_grad_enabled()):
        return False
    return _kernels_available()


@cache
def _kernels_available() -> bool:
    names = ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu")
    try:
        found = all(hasattr(torch.ops.aten, name) for name in names)
        return found and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _pack(layer: QuantLinear) -> dict | None:
    out_f, groups = layer.scales.shape
    size = layer.in_features // groups
    scales, zeros = layer.scales.float(), layer.zeros.float()
    if layer.bits == 8 and groups == 1:
        pad = -size % _ALIGN
        codes = torch.zeros(out_f, size + pad, dtype=torch.int8)
        codes[:, :size] = (layer.qweight ^ 0x80).view(torch.int8)
        fix = (128 - zeros[:, 0]) * scales[:, 0]
        return {"bits": 8, "codes": codes, "scales": scales[:, 0].bfloat16(), "fix": fix,
                "group": size + pad, "groups": 1, "pad": pad, "out": out_f}  # fmt: skip
    if layer.bits != 4 or size > _INT4_GROUPS[-1]:
        return None
    group, rows = next(g for g in _INT4_GROUPS if g >= size), out_f + -out_f % _ALIGN
    packed = torch.empty(rows, groups * group // 2, dtype=torch.uint8)
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    for start in range(0, rows, _BLOCK):
        block = torch.zeros(min(_BLOCK, rows - start), groups, group, dtype=torch.int32)
        codes = _codes(layer.qweight[start : start + _BLOCK], 4, layer.in_features)
        block[: len(codes), :, :size] = codes.view(-1, groups, size)
        packed[start : start + len(block)] = convert(block.view(len(block), -1), 1)
    pairs = torch.stack([scales, (8 - zeros) * scales], -1)
    pairs = nn.functional.pad(pairs, (0, 0, 0, 0, 0, rows - out_f)).transpose(0, 1).contiguous()
    return {"bits": 4, "codes": packed, "scales": pairs.bfloat16(), "group": group,
            "groups": groups, "pad": group - size, "out": out_f}  # fmt: skip


def _packed_matmul(p: dict, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    xb = flat.to(torch.bfloat16).contiguous()
    if p["pad"]:
        xb = nn.functional.pad(xb.reshape(-1, p["groups"], p["group"] - p["pad"]), (0, p["pad"]))
        xb = xb.view(-1, p["groups"] * p["group"])
    if p["bits"] == 8:
        y = torch.ops.aten._weight_int8pack_mm(xb, p["codes"], p["scales"]).to(x.dtype)
        y = y + flat.sum(-1, keepdim=True).to(x.dtype) * p["fix"].to(x.dtype)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p["codes"], p["group"], p["scales"])
        y = y[:, : p["out"]].to(x.dtype)
    return y.reshape(*x.shape[:-1], p["out"])


def group_of(group: int, in_features: int) -> int:
    """The inputs a scale covers (as dlnc's `QuantSpec.group_of`): `group`, or the largest
    divisor of the inputs between half of it and it, or a whole row."""
    if group == 0 or in_features <= group:
        return in_features
    for size in range(group, group // 2 - 1, -1):
        if size and in_features % size == 0:
            return size
    return in_features


def install(model: nn.Module, layers: dict, quantized: dict | None = None) -> None:
    """Swap in a `FactorizedLinear` for each entry of the layer table (`name` -> rank, shape,
    bias; its factors `QuantLinear`s with `bits`) and a `QuantLinear` for each of
    `quantized`; a layer of a head this model lacks (the base model of a head model's export)
    is skipped. The parents of the new layers are marked initialised when they hold no
    tensors of their own: their `_init_weights` may read a `.weight` the new layers lack."""
    for table in (layers, quantized or {}):
        for name, spec in table.items():
            local = _local_name(model, name)
            if local is None:
                continue
            (out_f, in_f), parent_name, _, child = spec["shape"], *local.rpartition(".")
            dtype = next(model.get_submodule(local).parameters()).dtype
            layer = _build(spec, out_f, in_f, table is layers)
            for p in layer.parameters():  # (scales stay float16, as stored)
                p.data = p.data.to(dtype)
            parent = model.get_submodule(parent_name)
            setattr(parent, child, layer)
            if not [*parent.parameters(recurse=False), *parent.buffers(recurse=False)]:
                parent._is_hf_initialized = True


def _build(spec: dict, out_f: int, in_f: int, factorized: bool) -> nn.Module:
    bias, quant = spec.get("bias", False), spec if "bits" in spec else None
    if not factorized:
        return QuantLinear(in_f, out_f, spec, bias)
    layer = FactorizedLinear(in_f, out_f, spec["rank"], bias)
    if quant is not None:
        layer.down = QuantLinear(in_f, spec["rank"], quant, False)
        layer.up = QuantLinear(spec["rank"], out_f, quant, bias)
    return layer


def _local_name(model: nn.Module, name: str) -> str | None:
    """`name` as a path in `model`, across the base-model prefix (`transformer.`, `bert.`)."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [name, f"{prefix}.{name}"] if prefix else [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1 :])
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    if prefix and not hasattr(model, prefix) and not name.startswith(prefix + "."):
        return None  # a head layer; this model is the base alone
    raise KeyError(f"no module at {name}")


_FACTORIZED: dict[type, type] = {}


def factorized_class(base: type) -> type:
    """`base` (transformers' class for the architecture) whose `__init__` ends by installing
    the factorized layers its config's `dlnc` section lists (on the meta device, as
    `from_pretrained` builds it: the dense weights are never allocated)."""
    if base not in _FACTORIZED:

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            section = getattr(config, "dlnc", None) or {}
            install(self, section.get("layers", {}), section.get("quantized", {}))

        _FACTORIZED[base] = type(base.__name__, (base,), {"__init__": __init__})
    return _FACTORIZED[base]


class DlncAutoLoader:
    """What `auto_map` names: `from_pretrained` loads the export through transformers' own
    class for its architecture (the one `auto_class` picks) with the factorized layers."""

    auto_class = "AutoModel"

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel") -> None:
        """Called by transformers on remote classes; nothing to register."""

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs) -> nn.Module:
        kwargs.pop("trust_remote_code", None)
        if config is None:
            config = transformers.AutoConfig.from_pretrained(path, **_hub_kwargs(kwargs))
        config = _plain_config(config)
        raw, _ = transformers.PretrainedConfig.get_config_dict(path, **_hub_kwargs(kwargs))
        removed = {k: raw[k] for k in GUARD_KEYS if k in raw}  # for save_pretrained
        base = _architecture_class(getattr(transformers, cls.auto_class), config)
        model = factorized_class(base).from_pretrained(path, *args, config=config, **kwargs)
        model.__class__ = base  # the same class as a plain load: pipelines, isinstance
        model.save_pretrained = MethodType(partial(_save_pretrained, removed=removed), model)
        return model


def _hub_kwargs(kwargs: dict) -> dict:
    keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
    return {k: kwargs[k] for k in keys if k in kwargs}


def _plain_config(config):
    """A copy of `config` without the fields that need dlnc (`GUARD_KEYS`)."""
    config = copy.deepcopy(config)
    for key in GUARD_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    return config


class DlncConfig:
    """What `auto_map` names for `AutoConfig`: with `trust_remote_code=True`, transformers' own
    config of the export without the fields that need dlnc (`GUARD_KEYS`), so tools that read
    `quantization_config` from the config alone (lm-evaluation-harness) do not refuse it."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig") -> None:
        """Called by transformers on remote classes; nothing to register."""

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        kwargs.pop("trust_remote_code", None)
        got = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False, **kwargs)
        config = got[0] if isinstance(got, tuple) else got  # (config, unused kwargs)
        for key in GUARD_KEYS:
            if hasattr(config, key):
                delattr(config, key)
        return got


def _architecture_class(auto: type, config) -> type:
    """transformers' class that `auto` builds for `config` (not the remote one)."""
    from transformers.models.auto.auto_factory import _get_model_class

    return _get_model_class(config, auto._model_mapping)


def _save_pretrained(self: nn.Module, save_directory, *args, removed: dict, **kwargs) -> None:
    """`save_pretrained`, then what makes the copy an export again: the fields this loader
    removed from the config, and this file beside it."""
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    path = Path(save_directory) / "config.json"
    if not path.is_file():  # not the main process
        return
    data = {**json.loads(path.read_text()), **removed}
    path.write_text(json.dumps(data, indent=2) + "\n")
    shutil.copyfile(__file__, Path(save_directory) / "modeling_dlnc.py")


for _auto in AUTO_CLASSES:  # DlncModelForCausalLM, ..., DlncModel: what auto_map names
    _name = "Dlnc" + _auto.removeprefix("Auto")
    globals()[_name] = type(_name, (DlncAutoLoader,), {"auto_class": _auto})
