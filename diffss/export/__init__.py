"""ONNX export of a few-shot segmenter into a Triton/KServe model repository.

Three graphs come out of one model: the full ``segmenter`` (query + supports -> logits), a
``support_encoder`` (supports -> features) and a ``query_decoder`` (query + features ->
logits), so a server can encode a support set once and reuse it for many queries.

Public entry points:

- :func:`export_model_repository` writes ``<repo>/<name>_<graph>/{config.pbtxt,1/model.onnx}``,
  records parity in ``<repo>/parity.json`` (``{name: record}``) and returns paths and parity.
- :func:`measure_parity` compares PyTorch and onnxruntime on the same inputs (dict result,
  usable as a Dagster asset check); :func:`load_parity` reads a recorded one.
- ``export_model_repository(..., quantize="int8", quantize_data=quantize_data(...))`` serves
  int8 graphs, refused (:class:`AccuracyGuardError`, nothing written) when the mIoU drops more
  than ``max_miou_drop`` points (:mod:`diffss.export.quantize`).
"""

from serving_contract import GRAPH_ROLES, model_dir_name
from diffss.export.graphs import export_graphs
from diffss.export.parity import (
    MAX_ABS_LOGIT_DIFF,
    MIN_ARGMAX_AGREEMENT,
    PARITY_FILE,
    load_parity,
    measure_parity,
    record_parity,
)
from diffss.export.quantize import AccuracyGuardError, QuantizeData, quantize_data
from diffss.export.repository import export_model_repository
from diffss.export.triton import find_model_file, render_config_pbtxt

__all__ = [
    "AccuracyGuardError",
    "GRAPH_ROLES",
    "MAX_ABS_LOGIT_DIFF",
    "MIN_ARGMAX_AGREEMENT",
    "PARITY_FILE",
    "export_graphs",
    "export_model_repository",
    "find_model_file",
    "load_parity",
    "measure_parity",
    "model_dir_name",
    "quantize_data",
    "QuantizeData",
    "record_parity",
    "render_config_pbtxt",
]
