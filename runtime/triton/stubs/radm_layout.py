"""The stub of ``radm_layout`` (runtime/server_stages/radm_layout.py): RADM's whole layout stage in
the server.

How: the stub runs posterrt's own ``RADMLayout.detect`` (the client's code, not a copy) over an
in-process ONNX Runtime backend of the stage's small bundle (the manifest and assets of the
exported bundle plus links to the three RADM files, or the variants served for them), so the stub
checks their hashes as the embedded backend does.
"""
from __future__ import annotations

from posterrt.runtime.schedulers.radm import Detections
from posterrt.runtime.server_stages.radm_layout import NAME, pad_detections
from posterrt.runtime.triton.stubs.requests import RequestError, answer_each, open_stage

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton: unit tests with a stand-in
    pb_utils = None


def detect_row(layout, inputs: dict, row: int) -> Detections:
    """One row's layout with ``layout`` (a ``RADMLayout`` over the stub's in-process backend)."""
    lines = int(inputs["text_lines"][row])
    if lines > inputs["input_ids"].shape[1]:
        raise RequestError(f"model {NAME!r} input 'text_lines': {lines} lines, but input_ids holds "
                           f"{inputs['input_ids'].shape[1]} rows")
    ids = inputs["input_ids"][row, :lines] if lines else None
    attention = inputs["attention_mask"][row, :lines] if lines else None
    steps = int(inputs["steps"][row]) or None
    return layout.detect(inputs["image"][row], ids, attention, int(inputs["seed"][row]), steps)


class TritonPythonModel:
    def initialize(self, args):
        from posterrt.runtime.pipelines.layout import RADMLayout

        folder = open_stage(args)
        self.backend = folder.in_process_backend()
        self.layout = RADMLayout(self.backend)
        self.contract = folder.contract
        self.decoupled = folder.decoupled
        self.stage = folder.stage.progress_stage

    def execute(self, requests):  # no dynamic batching: each request's rows run one after another
        return answer_each(pb_utils, requests, self.contract, self.detect_rows, self.decoupled, self.stage)

    def detect_rows(self, inputs: dict) -> dict:
        return pad_detections([detect_row(self.layout, inputs, row) for row in range(len(inputs["seed"]))])

    def finalize(self):
        self.layout = None
        self.backend.close()
