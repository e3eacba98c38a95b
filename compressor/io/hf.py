"""`from_pretrained` for dlnc exports: a transformers quantizer that builds the factorized layers.

A factorized export's config.json carries `quantization_config: {"quant_method": "dlnc"}` and
the `dlnc` section (the layer table, its one source of truth). transformers builds the model on
the meta device, hands it to `DlncHfQuantizer`, which swaps the exported layers for
`FactorizedLinear` skeletons (still on meta), and then loads the stored factors into them: the
dense weights are never allocated. `import compressor` registers the quantizer lazily
(compressor/io/hf_register.py); this module imports transformers' quantizer machinery.

Without dlnc, the config's `transformers_weights` field (LOAD_GUARD) makes `from_pretrained` stop
with a message naming `trust_remote_code=True` (the export's own loader, modeling_dlnc.py) and
`import compressor`; the quantizer removes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MethodType

from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from compressor.core.surgery import factorized_layers, merge_, quantized_layers
from compressor.io.export import LOAD_GUARD, QUANT_METHOD, dlnc_section, export_state_dict
from compressor.io.install import install_factorized
from compressor.io.model_card import PROVENANCE
from compressor.io.portable import is_own, write_portable
from compressor.io.section import FORMAT_VERSION, check_export, check_section, dlnc_version

__all__ = ["DlncHfQuantizer", "DlncQuantizationConfig", "register"]


@dataclass
class DlncQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` of a factorized export; the layers are in the `dlnc` section."""

    quant_method: str = QUANT_METHOD  # what routes transformers to DlncHfQuantizer
    format_version: int = FORMAT_VERSION  # the export format that wrote it

    def __post_init__(self) -> None:
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"`quant_method` must be {QUANT_METHOD!r}, got {self.quant_method!r}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"`format_version` {self.format_version}: written by a newer dlnc "
                f"(this one reads up to {FORMAT_VERSION}); upgrade dlnc from its source"
            )


class DlncHfQuantizer(HfQuantizer):
    """Builds the export's `FactorizedLinear` layers before transformers loads the weights."""

    requires_calibration = False

    def update_attn_implementation(self, config):
        """A hook that sees the config before the weights are looked up (transformers >= 5.18):
        drop the guard."""
        return _without_guard(config)

    def update_tp_plan(self, config):
        """The same, where transformers 5.0 to 5.19 call this hook instead (before the weights
        are looked up; later versions no longer call it)."""
        return _without_guard(config)

    def update_ep_plan(self, config):
        return _without_guard(config)

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs
    ) -> nn.Module:
        """The export checked as `load_pretrained` checks it (`check_export`: its section,
        weight files and factors), then its layers built as empty `FactorizedLinear`s."""
        files = [Path(f) for f in checkpoint_files or []]
        folder = files[0].parent if files else getattr(model.config, "name_or_path", "")
        section = getattr(model.config, "dlnc", None)
        # (no files: weights given as a state dict, nothing on disk to check)
        section = check_export(folder, section, files) if files else check_section(section, folder)
        layers, quantized = section.get("layers", {}), section.get("quantized", {})
        install_factorized(model, layers, quantized=quantized, device="meta")
        _skip_parent_init(model)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        model.save_pretrained = MethodType(_save_pretrained, model)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict, dict]:
        """Chains deepened after loading are saved collapsed to two factors, as `export` does."""
        return export_state_dict(model), {}

    def _dequantize(self, model: nn.Module, dtype=None) -> nn.Module:
        """`model.dequantize()`: every chain becomes a dense layer of its original kind."""
        merge_(model)
        model.__dict__.pop("save_pretrained", None)
        if isinstance(getattr(model.config, "dlnc", None), dict):
            section = {k: v for k, v in model.config.dlnc.items() if k != "quantized"}
            model.config.dlnc = {**section, "merged": True, "layers": {}, "format_version": 1}
        if is_own(getattr(model.config, "auto_map", None)):
            del model.config.auto_map  # its modeling_dlnc.py would build factorized layers
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """The factors are ordinary float weights: `Trainer` may train them without adapters."""
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _without_guard(config):
    """`config` without the `transformers_weights` guard (LOAD_GUARD, or an older dlnc's)."""
    if str(getattr(config, "transformers_weights", "")).startswith("a dlnc factorized export"):
        del config.transformers_weights
    return config


def _skip_parent_init(model: nn.Module) -> None:
    """Mark the parents of factorized layers as initialised when they hold no tensors of their
    own: their `_init_weights` (run on modules transformers thinks incomplete) may read a child's
    `.weight` (GPT-2's `c_proj.weight`), which a `FactorizedLinear` does not have. The factors
    themselves come from the checkpoint."""
    for name in [*factorized_layers(model), *quantized_layers(model)]:
        parent = model.get_submodule(name.rpartition(".")[0])
        own = [*parent.parameters(recurse=False), *parent.buffers(recurse=False)]
        if not own:
            parent._is_hf_initialized = True


def _save_pretrained(self: nn.Module, save_directory, *args, **kwargs) -> None:
    """`save_pretrained`, then the dlnc fields transformers does not keep: the layer table as
    the model has it now, and the guard (transformers drops `transformers_weights` on save)."""
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    path = Path(save_directory) / "config.json"
    if not path.is_file():  # not the main process
        return
    data = json.loads(path.read_text())
    method = (data.get("dlnc") or {}).get("method", "svd")
    if factorized_layers(self) or quantized_layers(self):
        earlier = data.get("dlnc") or {}
        kept = {k: earlier[k] for k in PROVENANCE if k in earlier}  # where the model came from
        section = dlnc_section(self, method, format="factors", tensor_mode=False)
        data["dlnc"] = {**section, "dlnc_version": dlnc_version(), **kept}
        data["transformers_weights"] = LOAD_GUARD
    data = write_portable(path.parent, self.config, data)
    path.write_text(json.dumps(data, indent=2) + "\n")


def register() -> None:
    """Register the `dlnc` quantization method with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DlncQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DlncHfQuantizer)


register()  # importing this module registers, also when its own import triggered the hook
