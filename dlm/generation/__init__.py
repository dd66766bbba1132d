"""Diffusion sampling (LLaDA: low-confidence/random remasking, semi-AR blocks, CFG, Gumbel temperature) over
fixed or length-head-predicted canvas budgets, with stop at EOS and canvas extension."""

from dlm.generation.budget import (
    BudgetPrediction,
    FixedLength,
    LengthSpec,
    PredictedLength,
    budget_from_bound,
    extend_budget,
    next_power_of_two,
    parse_length,
    predict_budgets,
)
from dlm.generation.loading import (
    CONFIDENCE_DTYPES,
    LoadedModel,
    encode_prompt,
    eot_id_of,
    generate_text,
    load_for_generation,
)
from dlm.generation.sampler import GenerationResult, StepRecord, block_schedule, generate, num_transfer_tokens

__all__ = [
    "BudgetPrediction",
    "CONFIDENCE_DTYPES",
    "FixedLength",
    "GenerationResult",
    "LengthSpec",
    "LoadedModel",
    "PredictedLength",
    "StepRecord",
    "block_schedule",
    "budget_from_bound",
    "encode_prompt",
    "eot_id_of",
    "extend_budget",
    "generate",
    "generate_text",
    "load_for_generation",
    "next_power_of_two",
    "num_transfer_tokens",
    "parse_length",
    "predict_budgets",
]
