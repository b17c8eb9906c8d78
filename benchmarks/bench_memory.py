"""Peak memory of a U-Net training step with and without rematerialisation (``UNetConfig.remat``).

For each config and each ``remat`` mode it compiles the gradient of the ε-prediction loss
(``jax.jit(jax.value_and_grad(loss)).lower(...).compile()``) on abstract inputs (nothing is run or
allocated) and reads XLA's buffer assignment: ``memory_analysis()``'s temp size (activations kept for
the backward pass + scratch), arguments (parameters + batch) and outputs (loss + gradients).

    python benchmarks/bench_memory.py                           # cifar10 (batch 128), 256² (batch 8), SD v1.5 (batch 2)
    python benchmarks/bench_memory.py --configs cifar10 --remat none blocks
    python benchmarks/bench_memory.py --configs tiny            # seconds (the smoke test's config)
    python benchmarks/bench_memory.py --configs cifar10 --batch 8 --time 3   # + what the recomputation costs

Configs: ``cifar10`` = ``UNetConfig.ddpm_cifar10()`` at 32×32; ``256`` = experiments/ddpm_celebahq256.py's
U-Net (also LSUN's) at 256×256, per-device batch 8 (the paper's 64 over a TPU v3-8); ``sd`` =
``UNetConfig.stable_diffusion_v1()`` on 64×64×4 latents with a 77×768 text context. The figures are
XLA:CPU's; a GPU's differ in detail (other fusions), not in kind.

XLA:CPU and remat: by default the CPU compiler expands the optimisation barriers that ``jax.checkpoint``
puts around a recomputation (its ``cse_barrier_expander`` pass), and common-subexpression elimination
then merges the recomputation back into the forward pass: the program and its memory are those of
``remat="none"`` (measured: the same number of dots and the same temp size). GPU and TPU keep the
barriers. So this benchmark compiles with ``xla_disable_hlo_passes=cse_barrier_expander`` (what an
accelerator does); ``--cpu-default`` measures XLA:CPU's own pipeline instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from ddpm_jax.models.unet import REMAT_POLICIES, UNet, UNetConfig

MB = 2**20


def _unet_256() -> UNetConfig:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from experiments.ddpm_celebahq256 import UNET_256  # the paper's 256² U-Net (CelebA-HQ, LSUN)

    return UNET_256


CONFIGS = {  # name -> (config factory, batch, resolution)
    "tiny": (lambda: UNetConfig(sample_size=4, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",)), 2, 4),
    "cifar10": (UNetConfig.ddpm_cifar10, 128, 32),
    "256": (_unet_256, 8, 256),
    "sd": (UNetConfig.stable_diffusion_v1, 2, 64),
}


KEEP_REMAT_BARRIERS = {"xla_disable_hlo_passes": "cse_barrier_expander"}  # see the module docstring


def measure(name: str, remat: str, cpu_default: bool = False, batch: int | None = None, iters: int = 0) -> dict:
    """Compile the loss gradient of config ``name`` with ``remat``; XLA's memory figures in MB. With ``iters``,
    also the median seconds of one gradient evaluation on random inputs and zero parameters (after a warm-up)."""
    factory, default_batch, size = CONFIGS[name]
    batch = batch or default_batch
    config = dataclasses.replace(factory(), remat=remat)
    model = UNet(config)
    spec = jax.ShapeDtypeStruct
    x = spec((batch, size, size, config.in_channels), jnp.float32)                 # x_t
    t = spec((batch,), jnp.int32)
    context = spec((batch, 77, config.cross_attention_dim), jnp.float32) if config.cross_attention_dim else None
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, context)["params"]

    def loss(params, x, t, context, eps):  # ‖ε − ε_θ(x_t, t)‖², Ho et al. Eq. 14 (train mode: dropout on)
        keys = jax.random.split(jax.random.key(0), batch)                         # per-example dropout keys
        return jnp.mean((eps - model.apply({"params": params}, x, t, context, train=True, dropout_keys=keys)) ** 2)

    start = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, x, t, context, x)
    compiled = lowered.compile() if cpu_default else lowered.compile(compiler_options=KEEP_REMAT_BARRIERS)
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    step_s = None
    if iters:
        args = jax.tree.map(lambda s: jax.random.normal(jax.random.key(1), s.shape, s.dtype)
                            if s.dtype == jnp.float32 else jnp.zeros(s.shape, s.dtype), (params, x, t, context, x))
        jax.block_until_ready(compiled(*args))                                     # warm-up
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times)
    return {"config": name, "remat": remat, "batch": batch, "temp_mb": m.temp_size_in_bytes / MB,
            "argument_mb": m.argument_size_in_bytes / MB, "output_mb": m.output_size_in_bytes / MB,
            "compile_s": seconds, "step_s": step_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["cifar10", "256", "sd"], choices=sorted(CONFIGS))
    parser.add_argument("--remat", nargs="+", default=list(REMAT_POLICIES), choices=sorted(REMAT_POLICIES))
    parser.add_argument("--cpu-default", action="store_true",
                        help="XLA:CPU's own pipeline, which merges remat's recomputation away (module docstring)")
    parser.add_argument("--batch", type=int, default=None, help="override each config's batch")
    parser.add_argument("--time", type=int, default=0, metavar="ITERS",
                        help="also time the gradient (median of ITERS calls): what the recomputation costs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; load average {load_before}")
    print("| config | batch | remat | temp MB | vs none | params+batch MB | grads MB | compile s | step s |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for name in args.configs:
        base = None
        for remat in args.remat:
            r = measure(name, remat, args.cpu_default, args.batch, args.time)
            base = r["temp_mb"] if remat == "none" else base
            ratio = f"{r['temp_mb'] / base:.2f}×" if base else ""
            step = "" if r["step_s"] is None else f"{r['step_s']:.3f}"
            print(f"| {name} | {r['batch']} | {remat} | {r['temp_mb']:.0f} | {ratio} | {r['argument_mb']:.0f} "
                  f"| {r['output_mb']:.0f} | {r['compile_s']:.1f} | {step} |", flush=True)
            rows.append(r)
    report = {"jax": jax.__version__, "platform": jax.devices()[0].platform, "cpu_default": args.cpu_default,
              "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "rows": rows}
    print(f"load average after: {report['load_average_after']}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
