"""Run by tests/test_stream.py under torchrun: one streamed compression split over processes."""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from compressor.options import CompressOptions, ExportOptions, RunOptions
from compressor.workflows.compress import compress_checkpoint

torch.set_num_threads(1)
src, out = Path(sys.argv[1]), Path(sys.argv[2])
options = CompressOptions(
    run=RunOptions(stream=True, solver="exact"), export=ExportOptions(max_shard_size="30KB")
)
result = compress_checkpoint(src, out, options)
state = PartialState()
info = {"world": state.num_processes, "main": state.is_main_process, "report": bool(result.report)}
(out.parent / f"rank{state.process_index}.json").write_text(json.dumps(info))
