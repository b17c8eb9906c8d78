"""Evaluation: bits/dim from the variational bound (likelihood.py) and the Fréchet distance (frechet.py)."""

from ddpm_jax.evaluation.frechet import feature_statistics, frechet_distance
from ddpm_jax.evaluation.likelihood import DatasetBPD, VLBResult, dataset_bpd, plot_vlb_terms, vlb_bpd

__all__ = ["DatasetBPD", "VLBResult", "dataset_bpd", "feature_statistics", "frechet_distance",
           "plot_vlb_terms", "vlb_bpd"]
