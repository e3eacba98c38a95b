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

import functools
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
    """The ranks of a ranks file, by layer name (None: keep the layer dense); a layer listed
    twice is an error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DlncError(f"{path}: no such ranks file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_keys())  # a SafeLoader
    except _Duplicate as e:
        raise DlncError(f"{path}: {e.key} is listed twice (line {e.line}); keep one") from None
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


class _Duplicate(Exception):
    def __init__(self, key: object, line: int) -> None:
        super().__init__(key, line)
        self.key, self.line = key, line


@functools.cache
def _unique_keys() -> type:
    """A SafeLoader that refuses a key given twice in one mapping (YAML would keep the last
    silently: a layer listed twice must not get whichever rank came last). Built on first
    use, so importing dlnc does not import yaml."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            seen = []
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise _Duplicate(key, key_node.start_mark.line + 1)
                seen.append(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


def split_ranks(ranks: dict[str, int | None]) -> tuple[dict[str, int], list[str]]:
    """(rank overrides, names to keep dense): how `dlnc compress --ranks` applies a file."""
    overrides = {n: r for n, r in ranks.items() if r is not None}
    return overrides, [n for n, r in ranks.items() if r is None]
