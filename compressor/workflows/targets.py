"""Which layers a compression targets: the `TargetOptions` (include/exclude/square-only
patterns, `filter_fn`) applied to a model (loaded, or its meta skeleton when streamed), each
pattern checked to match."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from compressor.core.layers import dense_weight_of
from compressor.core.ranks import RankPolicy
from compressor.core.targets import find_targets, matches, weight_readers
from compressor.errors import DlncError
from compressor.io.checkpoint import LoadedCheckpoint
from compressor.io.tensor_model import TENSOR_MODE_EXCLUDE
from compressor.options import CompressOptions, TargetOptions

__all__ = ["check_patterns", "expand_overrides", "quantize_targets", "select_targets"]


def select_targets(loaded: LoadedCheckpoint, options: CompressOptions) -> dict[str, nn.Module]:
    """The layers to compress (`options.targets.filter_fn`); in tensor mode embedding-like
    names are left alone too.

    Every include/exclude pattern must match a module, and every rank override a target:
    a typo is an error naming the pattern and where it came from, not a silent no-op."""
    chosen = options.targets
    check_patterns(loaded.model, chosen)
    candidates = _named(loaded, options)
    for name in weight_readers(loaded.model, candidates):
        del candidates[name]
        loaded.notices.append(f"{name} stays dense: its parent reads its .weight directly")
    targets = {n: m for n, m in candidates.items() if chosen.filter_fn(m, n)}
    _narrow_notices(candidates, chosen, loaded.notices)
    if not targets:
        raise DlncError("no layer to compress: the include/exclude patterns matched nothing")
    _check_overrides(options, targets)
    _ranks_file_notice(options, targets, loaded.notices)
    return targets


def quantize_targets(loaded: LoadedCheckpoint, options: CompressOptions) -> list[str]:
    """The layers `quantize` stores as codes (read before compression): the targets and the
    layers the patterns name but leave dense for their shape (`square_only`: grouped-query
    attention's k/v), whose float weights would otherwise cost more bytes than all the rest."""
    named = _named(loaded, options)
    for name in weight_readers(loaded.model, named):
        del named[name]
    return list(named)


def _named(loaded: LoadedCheckpoint, options: CompressOptions) -> dict[str, nn.Module]:
    """The dense layers the include/exclude patterns choose by name (in tensor mode, without
    embedding-like names)."""
    chosen = options.targets
    if loaded.tensor_mode:
        chosen = chosen.excluding(TENSOR_MODE_EXCLUDE)
    return find_targets(loaded.model, filter_fn=lambda m, n: chosen.chooses(n))


def _narrow_notices(
    candidates: dict[str, nn.Module], chosen: TargetOptions, notices: list[str]
) -> None:
    """One notice per `square_only` pattern that left layers dense (k_proj/v_proj under
    grouped-query attention)."""
    narrow: dict[str, list[tuple[int, ...]]] = {}
    for name, module in candidates.items():
        pattern = chosen.narrow(module, name)
        if pattern is not None:
            narrow.setdefault(pattern, []).append(tuple(dense_weight_of(module).shape))
    for pattern in (p for p in chosen.square_only if p in narrow):
        shapes = narrow[pattern]
        out_f, in_f = shapes[0]
        notices.append(
            f"{pattern}: {len(shapes)} layer(s) stay dense: {out_f}x{in_f} is not square "
            "(grouped-query attention), and the recipe targets it only when square"
        )


def check_patterns(model: nn.Module, targets: TargetOptions) -> None:
    """Raise a `DlncError` for an include/exclude pattern that matches no module of `model`."""
    names = [n for n, _ in model.named_modules() if n]
    for key in ("include", "exclude"):
        for pattern in getattr(targets, key) or ():
            if not any(matches(n, pattern) for n in names):
                raise DlncError(
                    f"{targets.where(key)}: '{pattern}' matches no module of this model"
                )


def _check_overrides(options: CompressOptions, targets: dict[str, nn.Module]) -> None:
    for pattern in options.policy.overrides:
        if not any(matches(n, pattern) for n in targets):
            where = options.targets.where("overrides")
            raise DlncError(f"{where}: '{pattern}' matches no targeted layer")


def _ranks_file_notice(options: CompressOptions, targets: dict, notices: list[str]) -> None:
    """A ranks file that sets some targeted layers only: the others are ranked by the policy,
    which the user may not expect from a file of ranks."""
    if options.ranks_file is None:
        return
    policy = options.policy
    unset = [n for n in targets if not any(matches(n, p) for p in policy.overrides)]
    if unset:
        by = next(f"{k} {getattr(policy, k)}" for k in ("keep", "energy", "rank")
                  if getattr(policy, k) is not None)  # fmt: skip
        notices.append(
            f"ranks file {options.ranks_file} sets {len(targets) - len(unset)} of the "
            f"{len(targets)} targeted layers; the other {len(unset)} are ranked by {by}"
        )


def expand_overrides(policy: RankPolicy, names: list[str]) -> RankPolicy:
    """The policy with override patterns (names, suffixes, `re:`) turned into full layer
    names; where two patterns match one layer, the later one wins."""
    expanded: dict[str, int] = {}
    for pattern, rank in policy.overrides.items():
        expanded.update({n: rank for n in names if matches(n, pattern)})
    return replace(policy, overrides=expanded)
