"""Modality-gap theory (Yaras et al. 2025) as explicit, differentiable dynamics."""
