"""Evaluation: bits/dim from the variational bound (likelihood.py), the Fréchet distance (frechet.py), the FID
Inception network (inception.py), the FID/IS drivers (fid.py) and the offline MNIST judge (judge.py: classifier FID, a
proxy for FID that needs no downloaded weights)."""

from ddpm_jax.evaluation.frechet import feature_statistics, frechet_distance
from ddpm_jax.evaluation.fid import (
    FIDProtocol,
    compute_fid,
    compute_inception_score,
    compute_statistics,
    inception_score,
    load_statistics,
    save_statistics,
)
from ddpm_jax.evaluation.inception import Inception, InceptionV3, load_inception
from ddpm_jax.evaluation.judge import Judge, get_judge, judge_report, train_judge
from ddpm_jax.evaluation.likelihood import DatasetBPD, VLBResult, dataset_bpd, plot_vlb_terms, vlb_bpd

__all__ = ["DatasetBPD", "VLBResult", "dataset_bpd", "feature_statistics", "frechet_distance",
           "plot_vlb_terms", "vlb_bpd"]
__all__ += ["FIDProtocol", "Inception", "InceptionV3", "compute_fid", "compute_inception_score",
            "compute_statistics", "inception_score", "load_inception", "load_statistics", "save_statistics"]
__all__ += ["Judge", "get_judge", "judge_report", "train_judge"]
