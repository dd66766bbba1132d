"""dlm's model behind ``transformers``' Auto classes, so a ``--format dlm`` export loads with ``from_pretrained``.

Importing this module registers ``model_type: dlm`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForMaskedLM``; nothing is fetched and no remote code runs. The wrapper owns the very modules of a
:class:`DiffusionTransformer` (same parameter names as our checkpoints, so an export loads without renaming)
and runs its forward pass, so there is one implementation of the model, not two that could drift apart.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from dlm.modeling.config import TransformerConfig
from dlm.modeling.transformer import DiffusionTransformer


class DlmConfig(PretrainedConfig):
    """``config.json`` of a ``--format dlm`` export: our :class:`TransformerConfig` fields plus token ids."""

    model_type = "dlm"

    def transformer_config(self) -> TransformerConfig:
        """The architecture as dlm's own validated config."""
        fields = {k: getattr(self, k) for k in TransformerConfig.model_fields if hasattr(self, k)}
        return TransformerConfig(**fields)


class DlmDiffusionModel(PreTrainedModel):
    """A :class:`DiffusionTransformer` as a ``PreTrainedModel``: ``forward`` gives mask-prediction logits.

    ``attention_mask`` (1 = token, 0 = padding) keeps tokens from attending to padding, through the same
    document mask packing uses (padding is its own document). Logits cover every position; a sampler reads
    those at mask positions.
    """

    config_class = DlmConfig
    base_model_prefix = "dlm"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _core: DiffusionTransformer

    def __init__(self, config: DlmConfig) -> None:
        super().__init__(config)
        core = DiffusionTransformer(config.transformer_config())
        # Adopt the core's modules as our own children (shared, not copied): parameter names stay the
        # checkpoint's, device moves and weight loading reach the core, and its forward is reused as is.
        for name, module in core.named_children():
            self.add_module(name, module)
        object.__setattr__(self, "_core", core)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the checkpoint; a fresh model is initialised by the core's own scheme."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self._core.embed

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        doc_ids = None if attention_mask is None else attention_mask.to(torch.long)
        hidden = self._core(input_ids, doc_ids=doc_ids, position_ids=position_ids)
        logits = self._core.logits(hidden)
        return MaskedLMOutput(logits=logits, hidden_states=(hidden,) if output_hidden_states else None)


def register() -> None:
    """Make ``model_type: dlm`` known to the Auto classes (idempotent)."""
    try:
        AutoConfig.register("dlm", DlmConfig)
    except ValueError:  # already registered
        return
    AutoModel.register(DlmConfig, DlmDiffusionModel)
    AutoModelForMaskedLM.register(DlmConfig, DlmDiffusionModel)


register()
