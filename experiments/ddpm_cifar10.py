"""Ho et al. 2020's CIFAR-10 run, with exactly the paper's hyperparameters.

Command::

    ddpm-jax train --config experiments/ddpm_cifar10.py --workdir runs/ddpm_cifar10
    ddpm-jax sample --workdir runs/ddpm_cifar10 --num 50000 --sampler ddpm --out samples.npz

Data: ``tfds:cifar10`` must be prepared first (on a machine with internet:
``tfds build cifar10 --file_format=array_record``; point ``data.data_dir=...`` at it if it is not in
``~/tensorflow_datasets``). Multi-host: start the same command on every host.

Hardware: a TPU v3-8 or 8 GPUs (data parallel, global batch 128). The paper reports 21 steps/s on a
TPU v3-8, i.e. 800k steps in about 10.6 hours. On GPUs/TPUs, the override ``train.compute_dtype=bfloat16`` runs the
U-Net in bf16 (mixed precision: float32 parameters, Adam state, EMA and loss; not the paper's setting, which is
float32): one train step's loss within 0.5% and gradient cosine > 0.999 of float32 (tests/test_mixed_precision.py);
its speed is what ``benchmarks/bench_gpu.py`` measures.

Expected result (Ho et al. 2020, Table 1; EMA parameters, 1000-step ancestral sampling, 50k samples):
FID 3.17, Inception score 9.46 (NLL ≤ 3.75 bits/dim). Model: 35.7M parameters.
"""

import ml_collections

from ddpm_jax.config import dataclass_to_config
from ddpm_jax.models.unet import UNetConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict(
        dict(
            name="tfds:cifar10",
            image_size=32,
            channels=3,
            random_flip=True,  # the paper's only augmentation
            data_dir=None,
            num_examples=None,
        )
    )

    # ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention at 16×16, dropout 0.1.
    config.model = dataclass_to_config(UNetConfig.ddpm_cifar10())

    config.diffusion = ml_collections.ConfigDict(
        dict(
            schedule="linear",  # β linear from 1e-4 to 0.02
            num_timesteps=1000,
            prediction="eps",
            variance="fixed_large",  # σ_t² = β_t, the released CIFAR-10 model's choice (Sec. 3.2)
        )
    )

    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=128,
            num_steps=800_000,
            lr=2e-4,  # Adam
            warmup_steps=5000,
            grad_clip=1.0,
            ema_decay=0.9999,
            ema_warmup=False,  # the paper's plain EMA
            seed=0,
            log_every=100,
            ckpt_every=10_000,
            keep_checkpoints=3,
            sample_every=50_000,
            num_samples=64,
            parallel="jit",  # "jit" (sharded jit, the default) or "pmap"
            compute_dtype="float32",  # the paper's; "bfloat16": mixed precision (training/diffusion.compute_model)
        )
    )

    config.sample = ml_collections.ConfigDict(dict(sampler="ddpm", steps=1000, eta=1.0))
    return config
