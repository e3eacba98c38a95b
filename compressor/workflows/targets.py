"""Which layers a compression targets: the include/exclude/square-only patterns applied to a
model (loaded, or its meta skeleton when streamed), each pattern checked to match."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from compressor.core.layers import dense_weight_of
from compressor.core.ranks import RankPolicy
from compressor.core.targets import find_targets, matches, weight_readers
from compressor.errors import DlncError
from compressor.io.checkpoint import LoadedCheckpoint
from compressor.io.tensor_model import TENSOR_MODE_EXCLUDE

__all__ = ["check_patterns", "expand_overrides", "select_targets"]


def select_targets(loaded: LoadedCheckpoint, options) -> dict[str, nn.Module]:
    """The layers to compress; in tensor mode embedding-like names are left alone too.

    Every include/exclude pattern must match a module, and every rank override a target:
    a typo is an error naming the pattern and where it came from, not a silent no-op."""
    check_patterns(loaded.model, options)
    exclude = list(options.exclude)
    if loaded.tensor_mode:
        exclude += TENSOR_MODE_EXCLUDE
    targets = find_targets(loaded.model, options.include, exclude)
    for name in weight_readers(loaded.model, targets):
        del targets[name]
        loaded.notices.append(f"{name} stays dense: its parent reads its .weight directly")
    _drop_narrow(targets, options.square_only, loaded.notices)
    if not targets:
        raise DlncError("no layer to compress: the include/exclude patterns matched nothing")
    _check_overrides(options, targets)
    return targets


def _drop_narrow(targets: dict[str, nn.Module], patterns: list[str], notices: list[str]) -> None:
    """Leave dense the targets matching `square_only` patterns whose weight is not square
    (k_proj/v_proj under grouped-query attention), with one notice per pattern."""
    for pattern in patterns:
        narrow = {
            n: tuple(dense_weight_of(m).shape)
            for n, m in targets.items()
            if matches(n, pattern) and len(set(dense_weight_of(m).shape)) > 1
        }
        for name in narrow:
            del targets[name]
        if narrow:
            out_f, in_f = next(iter(narrow.values()))
            notices.append(
                f"{pattern}: {len(narrow)} layer(s) stay dense: {out_f}x{in_f} is not square "
                "(grouped-query attention), and the recipe targets it only when square"
            )


def check_patterns(model: nn.Module, options) -> None:
    """Raise a `DlncError` for an include/exclude pattern that matches no module of `model`."""
    names = [n for n, _ in model.named_modules() if n]
    for key in ("include", "exclude"):
        for pattern in getattr(options, key) or ():
            if not any(matches(n, pattern) for n in names):
                where = options.origins.get(key, f"--{key}")
                raise DlncError(f"{where}: '{pattern}' matches no module of this model")


def _check_overrides(options, targets: dict[str, nn.Module]) -> None:
    for pattern in options.policy.overrides:
        if not any(matches(n, pattern) for n in targets):
            where = options.origins.get("overrides", "rank overrides")
            raise DlncError(f"{where}: '{pattern}' matches no targeted layer")


def expand_overrides(policy: RankPolicy, names: list[str]) -> RankPolicy:
    """The policy with override patterns (names, suffixes, `re:`) turned into full layer
    names; where two patterns match one layer, the later one wins."""
    expanded: dict[str, int] = {}
    for pattern, rank in policy.overrides.items():
        expanded.update({n: rank for n in names if matches(n, pattern)})
    return replace(policy, overrides=expanded)
