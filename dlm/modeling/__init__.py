"""The model: config, presets, the bidirectional transformer, its construction, its accounting and HF interop."""

from dlm.modeling.accounting import model_info, non_embedding_param_count, param_count, training_flops_per_token
from dlm.modeling.build import build_model
from dlm.modeling.config import TransformerConfig
from dlm.modeling.hf_export import export
from dlm.modeling.hf_import import ImportedModel, import_pretrained, save_imported
from dlm.modeling.hf_io import InteropError, UnsupportedModelError
from dlm.modeling.length_head import (
    LengthHead,
    LengthHeadConfig,
    LengthHeadOutput,
    bucket_edges,
    bucket_of,
    length_head_loss,
    predict_bucket_bound,
    predict_eos_bound,
)
from dlm.modeling.presets import PRESETS, preset
from dlm.modeling.transformer import DiffusionTransformer

__all__ = [
    "PRESETS",
    "DiffusionTransformer",
    "ImportedModel",
    "InteropError",
    "LengthHead",
    "LengthHeadConfig",
    "LengthHeadOutput",
    "TransformerConfig",
    "UnsupportedModelError",
    "bucket_edges",
    "bucket_of",
    "build_model",
    "export",
    "import_pretrained",
    "length_head_loss",
    "model_info",
    "non_embedding_param_count",
    "param_count",
    "predict_bucket_bound",
    "predict_eos_bound",
    "preset",
    "save_imported",
    "training_flops_per_token",
]
