"""Stable Diffusion v1.5 at full size with random weights: our JAX pipeline next to diffusers on the CPU.

Command::

    python benchmarks/bench_stable_diffusion.py                       # SD v1.5 size (860M-parameter U-Net)
    python benchmarks/bench_stable_diffusion.py --config tiny --iters 1   # the smoke test's run

Measured (medians over ``--iters`` calls after one warm-up call):

* **U-Net step**: one evaluation of the U-Net at 64×64×4 latents, batch 2 (the guided batch [c; ∅] of one
  image), context [2, 77, 768] — ours (jitted) and diffusers' ``UNet2DConditionModel`` (eager, no_grad);
* **VAE decode**: 64×64×4 latents → one 512×512 image, ours and diffusers' ``AutoencoderKL.decode``;
* **txt2img**: ``StableDiffusion.txt2img`` of one 512×512 image with ``--steps`` (default 2) guided PNDM
  steps + decode, as the one compiled program (compile time reported separately);
* **peak RSS**: the process's maximum resident memory after our part and at the end (``ru_maxrss``);
  the load average is printed with the numbers, since the CPU is shared.

Random weights never exist twice: ``StableDiffusion.from_configs`` initialises each network inside
``jax.jit`` (flax's initialisers run as one XLA program writing the parameters directly), and the
diffusers models are built after ours are freed. torch is imported only here, never by the library.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ddpm_jax import schedulers  # noqa: E402
from ddpm_jax.models.clip import CLIPTextConfig  # noqa: E402
from ddpm_jax.models.unet import UNetConfig  # noqa: E402
from ddpm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402
from ddpm_jax.pipelines.stable_diffusion import SD_V1_SCHEDULER_CONFIG, StableDiffusion  # noqa: E402

CONFIGS = {
    # name: (U-Net, VAE, text encoder, image size)
    "sd15": (UNetConfig.stable_diffusion_v1(), AutoencoderKLConfig.sd_v1(), CLIPTextConfig(), 512),
    "tiny": (UNetConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
                        cross_attention_dim=32, num_attention_heads=2, norm_num_groups=16, norm_eps=1e-5,
                        flip_sin_to_cos=True, freq_shift=0, downsample_padding=1),
             AutoencoderKLConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=16, sample_size=16),
             CLIPTextConfig(vocab_size=600, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=2, eos_token_id=599), 16),
}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


def note(what: str, value: Any) -> None:
    """Print each measurement as it is taken (a full-size run takes many minutes on a busy CPU)."""
    print(f"  {what}: {value:.3f}" if isinstance(value, float) else f"  {what}: {value}", file=sys.stderr, flush=True)


def median_seconds(fn: Callable[[], Any], iters: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_ours(name: str, iters: int, steps: int) -> dict[str, Any]:
    unet_cfg, vae_cfg, text_cfg, size = CONFIGS[name]
    latent = size // vae_cfg.downsampling_factor
    scheduler = schedulers.get_scheduler("pndm", SD_V1_SCHEDULER_CONFIG)
    pipe = StableDiffusion.from_configs(unet_cfg, vae_cfg, text_cfg, scheduler)   # random, initialised under jit
    unet, vae, params = pipe.unet, pipe.vae, pipe.params
    x = jnp.zeros((2, latent, latent, 4))
    ctx = jnp.zeros((2, text_cfg.max_position_embeddings, text_cfg.hidden_size))
    row: dict[str, Any] = {"framework": "jax", "config": name,
                           "unet_params": int(sum(a.size for a in jax.tree.leaves(params["unet"])))}

    step = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    t = jnp.full((2,), 500, jnp.int32)
    start = time.perf_counter()
    step(params["unet"], x, t, ctx).block_until_ready()
    row["unet_compile_s"] = time.perf_counter() - start
    note("ours: U-Net compile + first call s", row["unet_compile_s"])
    row["unet_step_s"] = median_seconds(lambda: step(params["unet"], x, t, ctx).block_until_ready(), iters)
    note("ours: U-Net step s", row["unet_step_s"])

    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode_latents))
    z = jnp.zeros((1, latent, latent, 4))
    row["vae_decode_s"] = median_seconds(lambda: decode(params["vae"], z).block_until_ready(), iters)
    note("ours: VAE decode s", row["vae_decode_s"])

    start = time.perf_counter()
    pipe.txt2img("an astronaut riding a horse, in Hokusai style", num_steps=steps, height=size, width=size)
    row["txt2img_first_call_s"] = time.perf_counter() - start  # compile + run
    note("ours: txt2img first call (compile + run) s", row["txt2img_first_call_s"])
    start = time.perf_counter()
    images = pipe.txt2img("a red cube", num_steps=steps, height=size, width=size, guidance_scale=5.0)["images"]
    row["txt2img_s"] = time.perf_counter() - start
    row["txt2img_steps"] = steps
    row["txt2img_recompiled"] = pipe.trace_count != 1
    assert images.shape == (1, size, size, 3) and np.isfinite(images).all()
    row["peak_rss_gb"] = peak_rss_gb()
    return row


def torch_available() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def bench_diffusers(name: str, iters: int) -> dict[str, Any]:
    import diffusers
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    unet_cfg, vae_cfg, text_cfg, size = CONFIGS[name]
    latent = size // vae_cfg.downsampling_factor
    unet = diffusers.UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, block_out_channels=unet_cfg.block_out_channels,
        layers_per_block=unet_cfg.layers_per_block, down_block_types=unet_cfg.down_block_types,
        up_block_types=unet_cfg.up_block_types, cross_attention_dim=unet_cfg.cross_attention_dim,
        attention_head_dim=unet_cfg.num_attention_heads, norm_num_groups=unet_cfg.norm_num_groups).eval()
    row: dict[str, Any] = {"framework": "diffusers", "config": name,
                           "unet_params": sum(p.numel() for p in unet.parameters())}
    x = torch.zeros((2, 4, latent, latent))
    ctx = torch.zeros((2, text_cfg.max_position_embeddings, text_cfg.hidden_size))
    t = torch.full((2,), 500)
    with torch.no_grad():
        row["unet_step_s"] = median_seconds(lambda: unet(x, t, encoder_hidden_states=ctx), iters)
    note("diffusers: U-Net step s", row["unet_step_s"])
    unet = None  # free it before building the VAE
    gc.collect()
    vae = diffusers.AutoencoderKL(
        block_out_channels=vae_cfg.block_out_channels, down_block_types=("DownEncoderBlock2D",) * len(vae_cfg.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_cfg.block_out_channels), layers_per_block=vae_cfg.layers_per_block,
        latent_channels=4, norm_num_groups=vae_cfg.norm_num_groups, sample_size=size).eval()
    z = torch.zeros((1, 4, latent, latent))
    with torch.no_grad():
        row["vae_decode_s"] = median_seconds(lambda: vae.decode(z / vae_cfg.scaling_factor), iters)
    row["peak_rss_gb"] = peak_rss_gb()
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="txt2img steps at full size")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    report: dict[str, Any] = {"device": str(jax.devices()[0]), "load_average_before": os.getloadavg(), "rows": []}
    ours = bench_ours(args.config, args.iters, args.steps)
    report["rows"].append(ours)
    gc.collect()
    if not args.no_diffusers and torch_available():
        theirs = bench_diffusers(args.config, args.iters)
        report["rows"].append(theirs)
        report["ratios"] = {k: theirs[k] / ours[k] for k in ("unet_step_s", "vae_decode_s")}  # > 1: ours faster
    report["load_average_after"] = os.getloadavg()

    print(f"device {report['device']}, load average before {report['load_average_before'][0]:.1f}, "
          f"after {report['load_average_after'][0]:.1f}")
    print("| framework | config | U-Net params | U-Net step s (B=2, 64×64) | VAE decode s | peak RSS GB |")
    for row in report["rows"]:
        print(f"| {row['framework']} | {row['config']} | {row['unet_params']:,} | {row['unet_step_s']:.3f} | "
              f"{row['vae_decode_s']:.3f} | {row['peak_rss_gb']:.1f} |")
    print(f"ours: U-Net compile {ours['unet_compile_s']:.1f} s; txt2img {ours['txt2img_steps']} steps: first call "
          f"{ours['txt2img_first_call_s']:.1f} s (compile + run), then {ours['txt2img_s']:.1f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
