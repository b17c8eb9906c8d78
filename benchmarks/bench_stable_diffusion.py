"""Stable Diffusion v1.5 and SDXL at full size with random weights: our JAX networks next to diffusers on the CPU.

Command::

    python benchmarks/bench_stable_diffusion.py                           # SD v1.5 size (860M-parameter U-Net)
    python benchmarks/bench_stable_diffusion.py --config sdxl --iters 1   # SDXL base size (2.57B-parameter U-Net)
    python benchmarks/bench_stable_diffusion.py --config sdxl --iters 1 --size 512   # SDXL's networks at 512²
    python benchmarks/bench_stable_diffusion.py --config tiny --iters 1   # the smoke tests' runs (tiny, tiny-sdxl)
    python benchmarks/bench_stable_diffusion.py --order-check             # torch before / after JAX in one process

Measured (medians over ``--iters`` timed calls; ours after the compiling first call, diffusers' after one
warm-up call):

* **U-Net step**: one evaluation of the U-Net at the config's latents, batch 2 (the guided batch [c; ∅] of one
  image) — SD v1.5: 64×64×4, context [2, 77, 768]; SDXL: 128×128×4, context [2, 77, 2048] plus the added
  conditioning (pooled text [2, 1280], time ids [2, 6]) — ours (jitted) and diffusers' ``UNet2DConditionModel``
  (eager, no_grad), built from the same configuration (``unet_config_to_diffusers``);
* **VAE decode**: latents → one image (512² for v1.5, 1024² for SDXL), ours and diffusers' ``AutoencoderKL.decode``;
* **txt2img** (SD v1 configs): ``StableDiffusion.txt2img`` of one image with ``--steps`` (default 2) guided PNDM
  steps + decode, as the one compiled program (compile time reported separately);
* **peak RSS**: each part's process's maximum resident memory (``ru_maxrss``); the load average before and after
  each part is printed with the numbers, since the CPU is shared.

Ours and diffusers' run in two SEPARATE Python processes, one after the other (``--framework``; ``--in-process`` for
both in this one, ours first): with both in one process diffusers' U-Net ran slower after JAX had run
(``--order-check`` measures that: the same diffusers U-Net step timed before and after one JAX U-Net call, in one
process). ``--size`` runs a config's networks at a smaller image side (e.g. SDXL's at 512², 64×64 latents).

Random weights never exist twice: each of our networks is initialised inside ``jax.jit`` (flax's initialisers
run as one XLA program writing the parameters directly) and freed before the next is built; the diffusers
models are built after ours are freed. So the peak is one network's weights plus its activations (SDXL's U-Net:
10.3 GB of float32 weights). torch is imported only here, never by the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
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
from ddpm_jax.models.unet import UNet, UNetConfig  # noqa: E402
from ddpm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402
from ddpm_jax.pipelines.stable_diffusion import SD_V1_SCHEDULER_CONFIG, StableDiffusion  # noqa: E402
from ddpm_jax.pipelines.stable_diffusion import sdxl_time_ids  # noqa: E402
from ddpm_jax.pretrained.diffusers import autoencoder_kl_config_to_diffusers, unet_config_to_diffusers  # noqa: E402


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    unet: UNetConfig
    vae: AutoencoderKLConfig
    size: int  # image side in pixels
    text: CLIPTextConfig | None = None  # SD v1: the text encoder of the whole-pipeline txt2img; None: networks only
    context_length: int = 77


TINY_VAE = AutoencoderKLConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=16, sample_size=16)
CONFIGS = {
    "sd15": BenchConfig(UNetConfig.stable_diffusion_v1(), AutoencoderKLConfig.sd_v1(), 512, CLIPTextConfig()),
    "sdxl": BenchConfig(UNetConfig.sdxl_base(), AutoencoderKLConfig.sdxl(), 1024),
    "tiny": BenchConfig(
        UNetConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
                   cross_attention_dim=32, num_attention_heads=2, norm_num_groups=16, norm_eps=1e-5,
                   flip_sin_to_cos=True, freq_shift=0, downsample_padding=1),
        TINY_VAE, 16,
        CLIPTextConfig(vocab_size=600, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=2, eos_token_id=599)),
    # SDXL's layout shrunk: no attention at the first level, transformer depths (1, 2), linear projections, "text_time"
    "tiny-sdxl": BenchConfig(
        dataclasses.replace(UNetConfig.sdxl_base(), sample_size=8, block_out_channels=(32, 64),
                            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                            cross_attention_dim=48, num_attention_heads=(2, 4), transformer_layers_per_block=(1, 2),
                            norm_num_groups=16, addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
        TINY_VAE, 16),
}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


def note(what: str, value: Any) -> None:
    """Print each measurement as it is taken (a full-size run takes many minutes on a busy CPU)."""
    print(f"  {what}: {value:.3f}" if isinstance(value, float) else f"  {what}: {value}", file=sys.stderr, flush=True)


def median_seconds(fn: Callable[[], Any], iters: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()  # warm-up (and compile)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unet_inputs(config: BenchConfig, batch: int = 2) -> dict[str, np.ndarray]:
    """The U-Net's call at the benchmark's size, NHWC: x [B, h, w, 4], t [B], context [B, 77, D] and, for SDXL's
    "text_time" U-Net, text_embeds [B, D_pooled] and time_ids [B, 6] (the 1024² defaults)."""
    latent = config.size // config.vae.downsampling_factor
    x, t, context, _, text_embeds, time_ids = config.unet.input_specs(batch=batch, context_length=config.context_length)
    inputs = {"x": np.zeros((batch, latent, latent, config.unet.in_channels), np.float32),
              "t": np.full((batch,), 500, np.int32), "context": np.zeros(context.shape, np.float32)}
    if text_embeds is not None:
        ids = np.asarray(sdxl_time_ids(config.size, config.size), np.float32)
        inputs.update(text_embeds=np.zeros(text_embeds.shape, np.float32),
                      time_ids=np.broadcast_to(ids, time_ids.shape).copy())
    return inputs


def init_leaf_by_leaf(module: Any, *inputs: Any, seed: int = 0) -> Any:
    """Random parameters of flax's default kinds, written one leaf at a time: kernels lecun-normal
    (N(0, 1/fan_in)), norm scales 1, biases and the rest 0.

    Not ``jax.jit(module.init)``: as one XLA program, SDXL's U-Net init needs more than this machine's 24 GiB on the
    CPU (measured: killed at 24.4 GB resident, for 10.3 GB of weights) — the random bits of every leaf are live at
    once. Leaf by leaf the peak is the weights plus one leaf's temporaries. The values only need to keep the
    activations in a realistic range (the timings do not depend on them otherwise)."""
    shapes = jax.eval_shape(module.init, jax.random.key(seed), *inputs)["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def init(path: tuple, leaf: jax.ShapeDtypeStruct, key: jax.Array) -> jax.Array:
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return lecun_normal(key, leaf.shape, 1.0 / np.sqrt(fan_in))
        return jnp.ones(leaf.shape, leaf.dtype) if name == "scale" else jnp.zeros(leaf.shape, leaf.dtype)

    values = [init(path, leaf, key) for (path, leaf), key in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, values)


@functools.partial(jax.jit, static_argnums=1)
def lecun_normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    """N(0, std²) of ``shape``: one small compiled program per distinct shape (std is traced)."""
    return std * jax.random.normal(key, shape)


def get_config(name: str, size: int | None = None) -> BenchConfig:
    """``CONFIGS[name]``, at image side ``size`` if given (a multiple of f · 2^(levels−1))."""
    config = CONFIGS[name]
    if size is not None:
        multiple = config.vae.downsampling_factor * 2 ** (config.unet.num_levels - 1)
        if size <= 0 or size % multiple:
            raise ValueError(f"--size must be a positive multiple of {multiple} for {name}, got {size}")
        config = dataclasses.replace(config, size=size)
    return config


def bench_ours(name: str, iters: int, steps: int, size: int | None = None) -> dict[str, Any]:
    config = get_config(name, size)
    latent = config.size // config.vae.downsampling_factor
    unet, vae = UNet(config.unet), AutoencoderKL(config.vae)
    inputs = {k: jnp.asarray(v) for k, v in unet_inputs(config).items()}
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    params = init_leaf_by_leaf(unet, *unet.config.input_specs(context_length=1))
    row: dict[str, Any] = {"framework": "jax", "config": name, "size": config.size, "load_before": os.getloadavg(),
                           "unet_params": int(sum(a.size for a in jax.tree.leaves(params)))}

    step = jax.jit(lambda p, x, t, c, added: unet.apply({"params": p}, x, t, c, **added))
    call = lambda: step(params, inputs["x"], inputs["t"], inputs["context"], added).block_until_ready()  # noqa: E731
    start = time.perf_counter()
    call()
    row["unet_compile_s"] = time.perf_counter() - start
    note("ours: U-Net compile + first call s", row["unet_compile_s"])
    row["unet_step_s"] = median_seconds(call, iters, warm_up=False)
    note("ours: U-Net step s", row["unet_step_s"])
    params = step = None  # free the U-Net's weights before the VAE's
    gc.collect()

    f = vae.config.downsampling_factor
    vae_params = init_leaf_by_leaf(vae, jax.ShapeDtypeStruct((1, f, f, vae.config.in_channels), jnp.float32))
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode_latents))
    z = jnp.zeros((1, latent, latent, vae.config.latent_channels))
    decode_call = lambda: decode(vae_params, z).block_until_ready()  # noqa: E731
    start = time.perf_counter()
    decode_call()
    row["vae_compile_s"] = time.perf_counter() - start
    row["vae_decode_s"] = median_seconds(decode_call, iters, warm_up=False)
    note("ours: VAE decode s", row["vae_decode_s"])
    vae_params = decode = None
    gc.collect()

    if config.text is not None:
        row.update(bench_txt2img(config, steps))
    row["peak_rss_gb"], row["load_after"] = peak_rss_gb(), os.getloadavg()
    return row


def random_pipeline(config: BenchConfig, dtype: str = "float32") -> StableDiffusion:
    """SD v1 with random weights (initialised under jit; seed 0, so every dtype has the same weights, rounded)."""
    scheduler = schedulers.get_scheduler("pndm", SD_V1_SCHEDULER_CONFIG)
    return StableDiffusion.from_configs(config.unet, config.vae, config.text, scheduler, dtype=dtype)


def bench_txt2img(config: BenchConfig, steps: int, pipe: StableDiffusion | None = None) -> dict[str, Any]:
    """The whole SD v1 pipeline (random weights: ``pipe`` or ``random_pipeline(config)``) as its one compiled
    program, classifier-free guided: first call and a second one with a new prompt and guidance scale (which must not
    recompile)."""
    pipe = pipe or random_pipeline(config)
    size, row = config.size, {}
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
    return row


def torch_available() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def diffusers_unet_step(config: BenchConfig) -> tuple[Any, Callable[[], Any]]:
    """diffusers' U-Net of ``config`` (random weights) and a call of it on ``unet_inputs`` (no_grad, NCHW)."""
    import diffusers
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    unet = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(config.unet)).eval()
    inputs = {k: torch.from_numpy(v) for k, v in unet_inputs(config).items()}
    x = inputs["x"].permute(0, 3, 1, 2).contiguous()  # NHWC → NCHW
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}

    def call() -> Any:
        with torch.no_grad():
            return unet(x, inputs["t"], encoder_hidden_states=inputs["context"], added_cond_kwargs=added or None)
    return unet, call


def bench_diffusers(name: str, iters: int, size: int | None = None) -> dict[str, Any]:
    import diffusers
    import torch

    config = get_config(name, size)
    latent = config.size // config.vae.downsampling_factor
    load_before = os.getloadavg()
    unet, call = diffusers_unet_step(config)
    row: dict[str, Any] = {"framework": "diffusers", "config": name, "size": config.size, "load_before": load_before,
                           "unet_params": sum(p.numel() for p in unet.parameters())}
    row["unet_step_s"] = median_seconds(call, iters)
    note("diffusers: U-Net step s", row["unet_step_s"])
    unet = call = None  # free it before building the VAE
    gc.collect()
    vae = diffusers.AutoencoderKL.from_config(autoencoder_kl_config_to_diffusers(config.vae)).eval()
    z = torch.zeros((1, config.vae.latent_channels, latent, latent))
    with torch.no_grad():
        row["vae_decode_s"] = median_seconds(lambda: vae.decode(z / config.vae.scaling_factor), iters)
    note("diffusers: VAE decode s", row["vae_decode_s"])
    row["peak_rss_gb"], row["load_after"] = peak_rss_gb(), os.getloadavg()
    return row


def bench_in_subprocess(framework: str, args: argparse.Namespace) -> dict[str, Any]:
    """One framework's row, measured by this script in a fresh Python process (``--framework``): nothing of the
    other framework (its thread pools, its allocator's memory) is in the process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--config", args.config, "--iters", str(args.iters), "--steps",
                   str(args.steps), "--framework", framework, "--json", str(out)]
        subprocess.run(command + (["--size", str(args.size)] if args.size else []), check=True)
        return json.loads(out.read_text())["rows"][0]


def order_check(name: str, size: int | None, iters: int) -> dict[str, Any]:
    """Does torch run slower after JAX has run in the same process? diffusers' U-Net step of ``name`` at ``size``,
    median of ``iters`` calls before and after one compiled call of our U-Net (and a repeat of the "before" timing
    first, to see the noise of the machine without JAX). Returns the medians (s) and the ratio after / before."""
    config = get_config(name, size)
    _, call = diffusers_unet_step(config)
    before = [median_seconds(call, iters), median_seconds(call, iters, warm_up=False)]
    note("diffusers before JAX s (two medians)", f"{before[0]:.3f}, {before[1]:.3f}")
    unet = UNet(config.unet)
    inputs = {k: jnp.asarray(v) for k, v in unet_inputs(config).items()}
    params = init_leaf_by_leaf(unet, *unet.config.input_specs(context_length=1))
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    step = jax.jit(lambda p, x, t, c, added: unet.apply({"params": p}, x, t, c, **added))
    for _ in range(2):  # compile + run, run
        step(params, inputs["x"], inputs["t"], inputs["context"], added).block_until_ready()
    after = median_seconds(call, iters, warm_up=False)
    note("diffusers after JAX s", after)
    return {"config": name, "size": config.size, "iters": iters, "before_s": before, "after_s": after,
            "after_over_before": after / min(before), "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="txt2img steps at full size")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the config's, 1024 for sdxl)")
    parser.add_argument("--framework", choices=("both", "jax", "diffusers"), default="both",
                        help="both: each in its own process, ours first (default)")
    parser.add_argument("--in-process", action="store_true", help="both in this process, ours first")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--order-check", action="store_true", help="diffusers' U-Net step before / after JAX ran in "
                        "one process (default config sd15 at --size 256)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    if args.order_check:
        result = order_check(args.config, args.size or (256 if args.config == "sd15" else None), args.iters)
        print(json.dumps(result))
        return result
    report: dict[str, Any] = {"device": str(jax.devices()[0]), "load_average_before": os.getloadavg(), "rows": []}
    run_diffusers = args.framework in ("both", "diffusers") and not args.no_diffusers and torch_available()
    if args.framework != "both" or args.in_process:  # everything asked for, in this process
        if args.framework != "diffusers":
            report["rows"].append(bench_ours(args.config, args.iters, args.steps, args.size))
            gc.collect()
        if run_diffusers:
            report["rows"].append(bench_diffusers(args.config, args.iters, args.size))
    else:
        report["rows"].append(bench_in_subprocess("jax", args))
        if run_diffusers:
            report["rows"].append(bench_in_subprocess("diffusers", args))
    report["load_average_after"] = os.getloadavg()
    rows = {row["framework"]: row for row in report["rows"]}
    if len(rows) == 2:
        # > 1: ours faster
        report["ratios"] = {k: rows["diffusers"][k] / rows["jax"][k] for k in ("unet_step_s", "vae_decode_s")}

    print(f"device {report['device']}, load average before {report['load_average_before'][0]:.1f}, "
          f"after {report['load_average_after'][0]:.1f}")
    config = get_config(args.config, args.size)
    latent = config.size // config.vae.downsampling_factor
    print(f"| framework | config | U-Net params | U-Net step s (B=2, {latent}×{latent}) | VAE decode s ({config.size}²) "
          "| peak RSS GB | load before → after |")
    for row in report["rows"]:
        print(f"| {row['framework']} | {row['config']} | {row['unet_params']:,} | {row['unet_step_s']:.3f} | "
              f"{row['vae_decode_s']:.3f} | {row['peak_rss_gb']:.1f} | {row['load_before'][0]:.1f} → "
              f"{row['load_after'][0]:.1f} |")
    if "jax" in rows:
        ours = rows["jax"]
        print(f"ours: U-Net compile + first call {ours['unet_compile_s']:.1f} s, VAE decode {ours['vae_compile_s']:.1f} s")
        if "txt2img_s" in ours:
            print(f"ours: txt2img {ours['txt2img_steps']} steps: first call {ours['txt2img_first_call_s']:.1f} s "
                  f"(compile + run), then {ours['txt2img_s']:.1f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
