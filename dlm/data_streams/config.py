"""The ``tokenizer`` and ``data`` sections of a run: what :mod:`dlm.data_streams` reads, with the rules
between their own fields. Rules that involve other sections (the row format against the objective, the
sequence length against the model) belong to the assembled tree, :class:`dlm.config.RunConfig`."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from dlm.data_streams.format_specs import FORMATS
from dlm.sections import CrossFieldError, Section


class TokenizerSection(Section):
    """Where the tokenizer comes from: a local directory, a bundled name (default) or a hub name."""

    name_or_path: str = "gpt2-mdm"
    mask_token: Optional[str] = None


class DataSection(Section):
    """Training data: where documents come from, how they become rows, and how the loader runs.

    ``source``: ``files`` reads local parquet / jsonl / json / txt files, globs or directories (``paths``);
    ``hub`` streams a Hugging Face dataset by name (``hub_name``, ``hub_config``, ``hub_split``, ``hub_revision``);
    ``shards`` reads the one directory in ``paths`` written by ``dlm data prepare``. ``format``:
    ``pretrain-packed`` (documents joined with EOS, cut every ``seq_len``), ``rows`` (one document per row,
    ``[text, EOS, pad ...]``) or ``sft`` (``[prompt, answer, EOS ...]`` from alpaca / question-answer /
    messages files). See :mod:`dlm.data_streams` for the guarantees (sharding, shuffling, exact resume).
    """

    source: Literal["files", "hub", "shards"] = "files"
    paths: list[str] = Field(default_factory=lambda: ["data/fineweb-sample/*.parquet"], min_length=1)
    hub_name: Optional[str] = Field(None, description="e.g. HuggingFaceFW/fineweb (source: hub)")
    hub_config: Optional[str] = Field(None, description="e.g. sample-10BT (source: hub)")
    hub_split: str = "train"
    hub_revision: Optional[str] = None
    text_column: str = "text"
    format: Literal[tuple(FORMATS)] = "pretrain-packed"  # type: ignore[valid-type]
    seq_len: int = Field(256, gt=1)
    overflow: Literal["drop", "cut"] = Field("drop", description="rows/sft: a document longer than a row")
    pad: Literal["eos", "pad"] = Field("eos", description="rows/sft padding: EOS (LLaDA) or the tokenizer's pad id")
    sft_template: Literal["plain", "chat"] = Field("plain", description="chat: the tokenizer's chat template")
    eval_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    max_eval_rows: int = Field(512, gt=0, description="held-out rows kept, the first ones in file order")
    max_docs: Optional[int] = Field(None, gt=0, description="use only the first documents (quick runs)")
    shuffle: bool = True
    shuffle_buffer: int = Field(1024, gt=0, description="documents per shuffled block of a streamed source")
    num_workers: int = Field(0, ge=0, description="data-loader worker processes per rank; 0 = in the loop")
    worker_batches: Optional[int] = Field(
        None, ge=1, le=1024,
        description="batches a worker hands over at once (null: about 256k tokens' worth, at most 64); "
        "each hand-off between processes has a fixed cost of about a millisecond",
    )
    doc_attention: bool = Field(True, description="tokens attend only within their own packed document")

    @model_validator(mode="after")
    def _source_fields(self) -> DataSection:
        # Compared with the defaults, not with the keys given, so a dumped resolved config validates again.
        if self.source == "hub":
            if not self.hub_name:
                raise CrossFieldError("data.hub_name", self.hub_name, "is required with data.source=hub")
            if self.paths != DataSection.model_fields["paths"].get_default(call_default_factory=True):
                raise CrossFieldError("data.paths", self.paths, "is not used with data.source=hub; remove it")
        else:
            for key in ("hub_name", "hub_config", "hub_revision"):
                if getattr(self, key) is not None:
                    raise CrossFieldError(
                        f"data.{key}", getattr(self, key), f"applies only to data.source=hub (source is {self.source})"
                    )
        if self.source == "shards":
            if len(self.paths) != 1:
                raise CrossFieldError(
                    "data.paths", self.paths, "must name exactly one directory written by dlm data prepare"
                )
            if FORMATS[self.format].prompts:
                raise CrossFieldError(
                    "data.format", self.format, "token shards hold plain documents; read SFT data with source=files"
                )
        if not FORMATS[self.format].prompts and self.sft_template != "plain":
            raise CrossFieldError("data.sft_template", self.sft_template, "applies only to data.format=sft")
        return self


__all__ = ["DataSection", "TokenizerSection"]
