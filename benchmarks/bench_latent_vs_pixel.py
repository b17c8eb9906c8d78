"""Why Stable Diffusion diffuses in a latent space: the same U-Net's training step on pixels vs latents.

Command::

    python benchmarks/bench_latent_vs_pixel.py                       # the ldm_text_mnist U-Net, batch 64
    python benchmarks/bench_latent_vs_pixel.py --tiny --iters 1      # the smoke test's configuration

The text-conditional U-Net of ``experiments/ldm_text_mnist.py`` (cross-attention to a [24, 64] context)
is trained once on what latent diffusion sees, the 8×8×4 latents of the f = 4 autoencoder, and once,
unchanged but for its input/output channels, on the 32×32×1 pixels of the same digits. Reported:
median seconds per full training step (``ddpm_jax.training.diffusion.make_train_step``: ε-loss, backward, Adam,
EMA) over ``--iters`` calls after a warm-up, the ratio, and how many numbers each example has.
The one-time cost of encoding the dataset to latents is not in the step (latents are precomputed once).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ddpm_jax import config as config_lib  # noqa: E402
from ddpm_jax.training import diffusion as diffusion_trainer  # noqa: E402
from ddpm_jax.training import loop  # noqa: E402
from ddpm_jax.models.unet import UNet, UNetConfig  # noqa: E402
from ddpm_jax.schedules import get_schedule  # noqa: E402


def step_seconds(config: Any, x_shape: tuple[int, ...], context_shape: tuple[int, ...], iters: int) -> dict[str, float]:
    """Median seconds of one jitted training step on random x [B, h, w, c] and context [B, L, D]."""
    model = UNet(UNetConfig(**config.model.to_dict()))
    schedule = get_schedule("linear", 1000)
    null = {"context": np.zeros(context_shape[1:], np.float32)}
    step = jax.jit(diffusion_trainer.make_train_step(model, schedule, config, null_condition=null), donate_argnums=0)
    tx = loop.make_optimizer(1e-3, 0, 1.0)
    state = diffusion_trainer.create_train_state(model, tx, jax.random.key(0), (1, *x_shape[1:]),
                                        condition={"context": jnp.zeros((1, *context_shape[1:]))})
    rng = np.random.default_rng(0)
    batch = {"x0": jnp.asarray(rng.normal(size=x_shape), jnp.float32),
             "context": jnp.asarray(rng.normal(size=context_shape), jnp.float32)}
    key = jax.random.key(1)
    t0 = time.perf_counter()
    state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return {"step_s": statistics.median(times), "compile_s": compile_s, "params": int(params)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="a 16/32-channel U-Net and batch 4 (smoke test)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    config = config_lib.load_config(str(REPO / "experiments" / "ldm_text_mnist.py"))
    batch = args.batch
    if args.tiny:
        config.model.update(block_out_channels=(16, 32), norm_num_groups=8, num_attention_heads=2)
        batch = 4
    L, D = 24, int(config.model.cross_attention_dim)
    latent_shape = (batch, 8, 8, 4)
    pixel_shape = (batch, 32, 32, 1)

    latent = step_seconds(config, latent_shape, (batch, L, D), args.iters)
    pixel_config = config_lib.apply_overrides(ml_collections.ConfigDict(config.to_dict()),   # a copy
                                              ["model.in_channels=1", "model.out_channels=1", "model.sample_size=32"])
    pixel = step_seconds(pixel_config, pixel_shape, (batch, L, D), args.iters)
    report = {
        "batch": batch, "device": str(jax.devices()[0]),
        "latent": {**latent, "shape": latent_shape[1:], "numbers_per_example": int(np.prod(latent_shape[1:]))},
        "pixel": {**pixel, "shape": pixel_shape[1:], "numbers_per_example": int(np.prod(pixel_shape[1:]))},
        "speedup": pixel["step_s"] / latent["step_s"],
    }
    print(f"{'space':8} {'x0 shape':>12} {'numbers':>8} {'params':>10} {'compile s':>10} {'step ms':>9} {'steps/s':>8}")
    for name in ("pixel", "latent"):
        r = report[name]
        print(f"{name:8} {str(tuple(r['shape'])):>12} {r['numbers_per_example']:>8} {r['params']:>10,} "
              f"{r['compile_s']:>10.1f} {1e3 * r['step_s']:>9.1f} {1 / r['step_s']:>8.2f}")
    print(f"latent training is {report['speedup']:.1f}× faster per step (batch {batch}, {report['device']})")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
