"""Ho et al. 2020's LSUN Church 256×256 run, with the paper's settings (Appendix B).

Command::

    ddpm-jax train --config experiments/ddpm_lsun_church256.py --workdir runs/ddpm_church256
    ddpm-jax sample --workdir runs/ddpm_church256 --num 64 --sampler ddpm --out church.png
    ddpm-jax eval --workdir runs/ddpm_church256 --inception pt_inception-2015-12-05-6726825d.pth \\
        --num-samples 50000 --reference church256_train_stats.npz --bpd-examples 0

Data: ``tfds:lsun/church_outdoor`` (126,227 training images, center-cropped and area-resized to 256×256
by ``data.py``), prepared on a machine with internet: ``tfds build lsun/church_outdoor
--file_format=array_record``. The trainer reads it with random access (``data.open_dataset``: each host
decodes, crops and resizes only its share of each batch, two batches ahead in a background thread), so
host memory holds a few batches, not the dataset (all 126k images as float32 would be ≈ 99 GB; as a
uint8 cache, ``data.cache=True``, ≈ 25 GB).

Model: the same 113,673,219-parameter U-Net as experiments/ddpm_celebahq256.py (ch = 128,
ch_mult = (1, 1, 2, 2, 4, 4), attention at 16×16, dropout 0; diffusers' google/ddpm-church-256 layout).
Training: Adam, lr 2e-5, batch 64, EMA 0.9999, T = 1000 linear β, random horizontal flips, 1.2M steps.

Hardware: TPU v3-8 at about 2.2 steps/s at batch 64 in the paper (1.2M steps ≈ 6.3 days), or 8 GPUs
(global batch 64).

Expected result (Ho et al. 2020, Table 3): FID 7.89 on LSUN Church 256² (50k samples, 1,000-step
ancestral sampling, EMA parameters). Check the protocol on the released weights first:
``ddpm-jax eval --pretrained <copy of google/ddpm-church-256> --inception ... --reference ...``.
"""

import importlib.util
import pathlib

import ml_collections


def _celebahq_config() -> ml_collections.ConfigDict:
    """experiments/ddpm_celebahq256.py's config: the same U-Net, optimizer, schedule and sampler."""
    spec = importlib.util.spec_from_file_location("ddpm_celebahq256",
                                                  pathlib.Path(__file__).with_name("ddpm_celebahq256.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    config = _celebahq_config()
    config.data.name = "tfds:lsun/church_outdoor"
    config.train.num_steps = 1_200_000  # Appendix B: 1.2M steps for LSUN Church (0.5M for CelebA-HQ)
    return config
