"""Calibration statistics: the Gram matrix X^T X of each targeted layer's inputs.

Forward pre-hooks on the targeted modules add each batch's inputs to a float64 Gram matrix,
so memory grows with the layer's width, never with the number of samples. Padding tokens
are left out when the batch has an `attention_mask` of the inputs' leading shape.

Peak memory: 8 * d_in^2 bytes per distinct layer input (layers fed the very same tensor,
e.g. the q/k/v projections of one attention block or Llama's gate/up, share one matrix),
plus one float64 copy of the current batch's inputs to one layer (8 * tokens * d_in bytes),
on top of the model and one inference forward pass. all-MiniLM-L6-v2 (per block q/k/v,
o and the MLP input at width 384, the MLP output at 1536): 134 MB; BERT-base: 1.1 GB; a 7B
Llama (4096, 4096, 4096 and 11008 per block, 32 blocks): 44 GB, so collect on a few blocks
at a time there (`--include`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager

import torch
from torch import nn

from compressor.core.layers import dense_weight_of
from compressor.core.progress import ProgressFn
from compressor.core.surgery import module_hooks
from compressor.core.tasks import model_inputs
from compressor.core.whitening import LayerStats
from compressor.errors import DlncError

__all__ = ["GramCollector", "collect_grams", "real_rows"]


class GramCollector:
    """The input Gram of each of `targets` over the forward passes run while `hooked`, batch
    by batch (`batch(mask)` before each): padding left out, one shared matrix for layers fed
    the very same tensor; float64, or float32 for inputs at least `single_from` wide."""

    def __init__(self, targets: Mapping[str, nn.Module], single_from: int | None = None) -> None:
        self.targets = targets
        self.single_from = single_from  # inputs at least this wide: float32 Grams
        self.stats: dict[str, LayerStats] = {}
        self.aliases: dict[str, str] = {}  # layer -> the layer whose input (and Gram) it shares
        self.mask: torch.Tensor | None = None
        self.last: tuple[torch.Tensor, str] | None = None  # the last input counted, its layer
        self.counting = True
        self._batches = 0

    def hooked(self) -> AbstractContextManager[None]:
        """Count the targets' inputs of the forward passes run meanwhile."""
        return module_hooks(self.targets, self._hook, pre=True)

    def batch(self, mask: torch.Tensor | None, counting: bool = True) -> None:
        """The next forward pass reads a new batch, whose real tokens are `mask` (None: all);
        `counting=False`: that pass is not counted (it reads a batch already counted)."""
        self.counting = counting
        if not counting:
            return
        self._batches += 1
        self.mask = mask
        self.last = None

    @property
    def first_batch(self) -> bool:
        """The pass being counted reads the first batch (layers sharing an input are found)."""
        return self._batches <= 1

    def result(self) -> dict[str, LayerStats]:
        """Each target's statistics; a target never reached is a `DlncError`."""
        missing = [n for n in self.targets if n not in self.stats]
        if missing:
            raise DlncError(f"{missing[0]}: never reached by the forward pass; exclude it")
        return {n: self.stats[n] for n in self.targets}

    def _hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            if not self.counting or not args or not torch.is_tensor(args[0]):
                return
            x = args[0]
            same = self.last is not None and self.last[0] is x
            if self.first_batch and same and name not in self.stats:
                self.aliases[name] = self.last[1]  # same input tensor: share one Gram
                self.stats[name] = self.stats[self.last[1]]
                return
            if name in self.aliases:
                if same and self.last[1] == self.aliases[name]:
                    return
                raise RuntimeError(f"{name}: its input stopped being shared with another layer")
            self.last = (x, name)
            if name not in self.stats:
                width = dense_weight_of(module).shape[1]
                single = self.single_from is not None and width >= self.single_from
                dtype = torch.float32 if single else torch.float64
                self.stats[name] = LayerStats(torch.zeros(width, width, dtype=dtype))
            self.stats[name].add(real_rows(x, self.mask))

        return pre_hook


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of a layer input `x` (batch x seq x features) at real tokens: padding is left
    out when `mask` (bool, batch x seq) matches x's leading shape; else `x` unchanged."""
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    return x


@torch.no_grad()
def collect_grams(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, torch.Tensor]],
    progress: ProgressFn | None = None,
) -> dict[str, LayerStats]:
    """Run the model over `batches` (inference mode) and return each target's input Gram.

    Targets fed the same input tensor share one `LayerStats` object. A target never reached
    by the forward pass is a `DlncError` (it cannot be calibrated).
    """
    if type(model).__name__ == "TensorModel":
        raise DlncError(
            "this checkpoint has no architecture (tensor mode), so it cannot run on data; "
            "use `method` svd, or give its config.json with `config`"
        )
    batches = list(batches)
    collector = GramCollector(targets)
    was_training = model.training
    model.eval()
    try:
        with collector.hooked():
            for i, batch in enumerate(batches):
                mask = batch.get("attention_mask")
                collector.batch(mask.bool() if mask is not None else None)
                _forward(model, batch)
                if progress:
                    progress("calibrate", i + 1, len(batches))
    finally:
        model.train(was_training)
    return collector.result()


def _forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
    """One inference pass; an encoder-decoder reads the text as its decoder input too
    (teacher forcing, as in fine-tuning), so its decoder layers are calibrated."""
    inputs = model_inputs(batch, model)
    try:
        model(**inputs)
    except TypeError as e:
        keys = ", ".join(inputs)
        raise DlncError(f"the model does not take the data's inputs ({keys}): {e}") from e
