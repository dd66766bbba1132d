"""dlm: masked diffusion language models."""
