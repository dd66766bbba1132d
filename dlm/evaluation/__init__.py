"""dlm.evaluation: see DESIGN.md; filled by the length-head issue."""
