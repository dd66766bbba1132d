"""The run's ``model`` section: a preset, per-field architecture overrides and the weights to start from.

It is its own module, above :mod:`dlm.modeling.hf_init`, because validating ``init_from`` reads the source's
config files; :class:`~dlm.modeling.config.TransformerConfig`, which the weight readers need, stays below.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import ValidationError, create_model, model_validator

from dlm.errors import ConfigError
from dlm.modeling.config import RUN_ONLY_MODEL_KEYS, RunOnlyModelFields, TransformerConfig
from dlm.modeling.hf_init import check_init_from
from dlm.modeling.hf_io import InteropError
from dlm.modeling.presets import PRESETS, preset
from dlm.sections import CrossFieldError, Section

# Every TransformerConfig field as an optional override of the preset, so a user writes
# `model.preset=small model.n_layers=4` and the architecture switches stay in one place.
_ModelOverrides = create_model(  # type: ignore[call-overload]
    "_ModelOverrides",
    __base__=Section,
    **{
        name: (Optional[field.annotation], None)  # noqa: UP045 - pydantic needs a runtime type here
        for name, field in TransformerConfig.model_fields.items()
    },
)


class ModelSection(RunOnlyModelFields, _ModelOverrides):  # type: ignore[misc, valid-type]
    """Which architecture to train: a preset from :data:`dlm.modeling.PRESETS` and per-field overrides, and
    optionally the weights to start from (``init_from``) instead of a random initialisation."""

    @model_validator(mode="after")
    def _known_preset(self) -> ModelSection:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {', '.join(sorted(PRESETS))}")
        try:
            arch = self.resolve()  # surfaces impossible combinations (e.g. d_model not divisible by n_heads) now
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            key = f"model.{field}" if field else "model"
            value = self.overrides().get(field, first.get("input")) if field else self.overrides()
            raise CrossFieldError(key, value, first["msg"].removeprefix("Value error, ")) from None
        if self.output_bias_init == "unigram":
            if arch.output_bias is False and (arch.tie_embeddings or not arch.bias):
                raise CrossFieldError(
                    "model.output_bias_init", "unigram", "the model has no output bias: set model.output_bias=true"
                )
        if self.init_from is not None:
            self._check_init_from(arch, require=False)
        return self

    def check_init_from(self) -> None:
        """Refuse an ``init_from`` that is missing or does not fit the configured model (a ConfigError).

        Validation already checks a source that holds weights, so a wrong format or shape fails before any run
        directory or worker exists. A source without weights yet passes validation and is refused here, where
        a run is about to read it (see :func:`dlm.modeling.hf_init.check_init_from`).
        """
        if self.init_from is not None:
            try:
                self._check_init_from(self.resolve(), require=True)
            except CrossFieldError as exc:
                raise ConfigError(exc.line()) from None

    def _check_init_from(self, arch: TransformerConfig, require: bool) -> None:
        try:
            check_init_from(self.init_from, self.init_from_format, arch, require)
        except InteropError as exc:
            raise CrossFieldError("model.init_from", self.init_from, str(exc)) from None

    def overrides(self) -> dict[str, Any]:
        """The architecture fields the user set explicitly (everything else comes from the preset)."""
        return {k: v for k, v in self.model_dump(exclude=set(RUN_ONLY_MODEL_KEYS)).items() if v is not None}

    def resolve(self) -> TransformerConfig:
        """The full architecture: preset values with the user's overrides applied."""
        return preset(self.preset, **self.overrides())


__all__ = ["ModelSection"]
