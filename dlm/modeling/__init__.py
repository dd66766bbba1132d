"""The model: config, presets, the bidirectional transformer, its construction and its accounting."""

from dlm.modeling.accounting import model_info, non_embedding_param_count, param_count, training_flops_per_token
from dlm.modeling.build import build_model
from dlm.modeling.config import TransformerConfig
from dlm.modeling.presets import PRESETS, preset
from dlm.modeling.transformer import DiffusionTransformer

__all__ = [
    "PRESETS",
    "DiffusionTransformer",
    "TransformerConfig",
    "build_model",
    "model_info",
    "non_embedding_param_count",
    "param_count",
    "preset",
    "training_flops_per_token",
]
