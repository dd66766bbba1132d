"""dlm.generation: see DESIGN.md; filled by the length-head issue."""
