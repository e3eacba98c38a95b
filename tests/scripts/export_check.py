"""Factorized exports written here, loaded bit for bit elsewhere (another transformers, no dlnc).

    python tests/scripts/export_check.py write DIR   # with dlnc: exports + reference outputs
    python tests/scripts/export_check.py check DIR   # anywhere torch + transformers run

`write` compresses tiny GPT-2, Llama (grouped-query attention) and BERT models with the dlnc
command (in memory, sharded, streamed, quantized) and records `compressor.load_pretrained`'s
outputs.
`check` loads every export with `AutoModel*.from_pretrained(export, trust_remote_code=True)`
(the export's own modeling_dlnc.py); where dlnc is installed also through
`compressor.load_pretrained` and a plain `from_pretrained`; where it is not, it checks that a
plain `from_pretrained` refuses the export. Every output must equal the reference bit for bit.
`--without-dlnc` makes `import compressor` fail in the checking process, as if not installed.
CI runs `check` under the lowest transformers pyproject.toml accepts (.ci/run);
tests/test_portable.py runs it without dlnc.
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import sys
from pathlib import Path

CASES = {  # name: (tiny family, dlnc compress flags); data-free, so it takes seconds
    "gpt2": ("gpt2", ["--no-stream", "--no-generate"]),
    "llama-sharded": ("llama", ["--no-stream", "--no-generate", "--max-shard-size", "20KB"]),
    "llama-streamed": ("llama", ["--stream", "--no-generate"]),
    "bert-streamed-sharded": ("bert", ["--stream", "--max-shard-size", "20KB"]),
    # quantized: 4-bit codes of GPT-2's factors and of its layers left dense (Conv1D)
    "gpt2-int4": ("gpt2", ["--no-generate", "--quantize", "int4", "--group-size", "16"]),
}


def write(folder: Path, cases: dict = CASES) -> None:
    """Exports of `cases` under `folder`, each recorded (`record`)."""
    from typer.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
    from tiny_models import example_inputs, save_tiny

    from cli.main import app

    folder.mkdir(parents=True, exist_ok=True)
    for name, (family, flags) in cases.items():
        source, out = folder / f"{name}-dense", folder / name
        save_tiny(family, source)
        run = CliRunner().invoke(app, ["compress", str(source), "-o", str(out), *flags])
        if run.exit_code != 0:
            raise SystemExit(f"{name}: dlnc compress failed: {run.output}")
        record(folder, name, example_inputs(family))


def record(folder: Path, name: str, batch: dict) -> None:
    """The export `folder/name` given its `reference.pt` (`batch` and the outputs of
    `load_pretrained` on it) and its auto class in `folder/cases.json`."""
    import torch

    from compressor.io.load import load_pretrained
    from compressor.io.portable import auto_class_for

    model = load_pretrained(folder / name)
    with torch.no_grad():
        reference = {"inputs": batch, "logits": model(**batch).logits}
    torch.save(reference, folder / name / "reference.pt")
    index = folder / "cases.json"
    cases = json.loads(index.read_text()) if index.is_file() else {}
    cases[name] = auto_class_for(model.config)
    index.write_text(json.dumps(cases, indent=2) + "\n")


class _Refuse(importlib.abc.MetaPathFinder):
    """`import compressor` (or `cli`) fails: dlnc as if not installed."""

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in ("compressor", "cli"):
            raise ModuleNotFoundError(f"No module named {fullname!r}")
        return None


def check(folder: Path, without_dlnc: bool = False) -> list[str]:
    """Every export of `folder` loaded every way this environment allows; the lines of what
    was checked. A mismatch or a failed load raises."""
    if without_dlnc:
        sys.meta_path.insert(0, _Refuse())
    import torch
    import transformers

    try:
        import compressor
    except ModuleNotFoundError:
        compressor = None
    done = [f"transformers {transformers.__version__}, dlnc {'yes' if compressor else 'no'}"]
    for name, auto_name in json.loads((folder / "cases.json").read_text()).items():
        auto, export = getattr(transformers, auto_name), folder / name
        ref = torch.load(export / "reference.pt", weights_only=True)
        loads = {"trust_remote_code": lambda a=auto, e=export: _remote(a, e)}
        if compressor is not None:
            loads["load_pretrained"] = lambda e=export: compressor.load_pretrained(e)
            loads["from_pretrained"] = lambda a=auto, e=export: a.from_pretrained(e)
        elif len(done) == 1:  # once: a plain load builds the model before it stops
            _refused(auto, export)
        for how, load in loads.items():
            with torch.no_grad():
                logits = load()(**ref["inputs"]).logits
            if not torch.equal(logits, ref["logits"]):
                raise SystemExit(f"{name} through {how}: outputs differ from load_pretrained's")
            done.append(f"{name}: {auto_name} through {how}: equal bit for bit")
    return done


def _remote(auto, export: Path):
    return auto.from_pretrained(export, trust_remote_code=True)


def _refused(auto, export: Path) -> None:
    """Without dlnc and without `trust_remote_code`, the load stops with the guard's advice."""
    try:
        auto.from_pretrained(export)
    except ValueError as e:
        if "trust_remote_code=True" in str(e):
            return
        raise
    raise SystemExit(f"{export}: a plain from_pretrained without dlnc loaded it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["write", "check"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--without-dlnc", action="store_true")
    args = parser.parse_args()
    if args.action == "write":
        write(args.folder)
    else:
        print("\n".join(check(args.folder, args.without_dlnc)))


if __name__ == "__main__":
    main()
