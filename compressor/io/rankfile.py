"""ranks.yaml: the per-layer ranks `dlnc estimate-ranks --save` writes and
`dlnc compress --ranks` reads.

    dlnc_ranks: 1            # file format version
    method: whiten           # how the ranks were chosen (informational)
    keep: 0.5                # the budget they were chosen under (informational)
    ranks:
      bert.encoder.layer.0.attention.self.query: 96
      bert.encoder.layer.0.output.dense: dense   # kept dense

Unknown keys and malformed ranks are errors (a typo must not be silently ignored).
"""

from __future__ import annotations

import os
from pathlib import Path

from compressor.errors import DlncError, first_line
from compressor.io.files import atomic_path

__all__ = ["RANKS_FORMAT", "load_ranks", "save_ranks", "split_ranks"]

RANKS_FORMAT = 1
_KEYS = {"dlnc_ranks", "method", "keep", "model", "ranks"}


def save_ranks(
    path: str | os.PathLike, ranks: dict[str, int | None], **info: str | float | None
) -> Path:
    """Write `ranks` (None: kept dense) and informational keys (method, keep, model)."""
    import yaml

    unknown = set(info) - _KEYS
    if unknown:
        raise ValueError(f"unknown ranks-file keys: {sorted(unknown)}")
    data = {"dlnc_ranks": RANKS_FORMAT, **{k: v for k, v in info.items() if v is not None}}
    data["ranks"] = {name: "dense" if r is None else int(r) for name, r in ranks.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_ranks(path: str | os.PathLike) -> dict[str, int | None]:
    """The ranks of a ranks file, by layer name (None: keep the layer dense)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DlncError(f"{path}: no such ranks file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DlncError(f"{path}: not a UTF-8 text file (byte {e.start})") from e
    except yaml.YAMLError as e:
        raise DlncError(f"{path}: not valid YAML ({first_line(e)})") from e
    if not isinstance(data, dict) or not isinstance(data.get("ranks"), dict):
        raise DlncError(f"{path}: expected a mapping with a `ranks:` section")
    unknown = set(data) - _KEYS
    if unknown:
        raise DlncError(
            f"{path}: unknown key `{sorted(unknown)[0]}` (known: {', '.join(sorted(_KEYS))})"
        )
    version = data.get("dlnc_ranks", RANKS_FORMAT)
    if not isinstance(version, int) or isinstance(version, bool):
        raise DlncError(f"{path}: `dlnc_ranks` must be the format number, got {version!r}")
    if version > RANKS_FORMAT:
        raise DlncError(f"{path}: written by a newer dlnc (format {version})")
    ranks: dict[str, int | None] = {}
    for name, rank in data["ranks"].items():
        if rank == "dense":
            ranks[str(name)] = None
        elif isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1:
            ranks[str(name)] = rank
        else:
            raise DlncError(
                f"{path}: rank of {name} must be an integer >= 1 or `dense`, got {rank!r}"
            )
    return ranks


def split_ranks(ranks: dict[str, int | None]) -> tuple[dict[str, int], list[str]]:
    """(rank overrides, names to keep dense): how `dlnc compress --ranks` applies a file."""
    overrides = {n: r for n, r in ranks.items() if r is not None}
    return overrides, [n for n, r in ranks.items() if r is None]
