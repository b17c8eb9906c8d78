"""Speed of the DDPM U-Net: our JAX/Flax model side by side with diffusers' UNet2DModel (PyTorch).

Command::

    python benchmarks/bench_unet.py --config both                    # MNIST demo + CIFAR-10 (batch 128)
    python benchmarks/bench_unet.py --config cifar10 --batch 16 --iters 5 --json out.json   # a CPU-sized run

For each configuration it measures, on the current JAX device (and, when torch + diffusers import,
on the CPU/GPU torch picks, with the same number of threads):

* **compile s**: tracing + XLA compilation of the jitted training step (JAX only; PyTorch is eager);
* **train steps/s**: one full optimizer step = ε-loss forward, backward, Adam update, at ``--batch``;
* **fwd img/s**: images per second through ONE U-Net evaluation (one denoising step) at the
  sampling batch ``--sample-batch`` (default = ``--batch``), eval mode, no gradients;
* **ddim img/s**: images per second for a whole ``--ddim-steps``-step DDIM chain (ours:
  ``ddpm_jax.samplers.ddim_sample``, one compiled ``lax.scan``; diffusers: ``DDIMScheduler`` loop);
* **peak MB** (JAX): XLA's own buffer accounting of the compiled step (arguments + outputs + temporaries,
  from ``compiled.memory_analysis()``); on GPU also the allocator's peak. PyTorch: the CUDA allocator's
  peak on GPU, nothing on CPU (no allocator statistics there).

Every timing is the median over ``--iters`` timed calls after one warm-up call, so a busy machine
perturbs it less than a mean would. Ratios are ours / diffusers: above 1 means ours is faster.

The JAX training step is self-contained (plain ``optax.adam``, no EMA, no clipping) so both sides
do the same work; it uses ``ddpm_jax.diffusion.loss_simple`` when that module exists, otherwise a
local copy of the ε-loss. ``--library-step`` additionally times ``ddpm_jax.training.diffusion``'s real step.
torch is imported only here, never by the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/bench_unet.py` from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO))

from ddpm_jax.models.unet import UNet, UNetConfig  # noqa: E402

try:  # written concurrently; the benchmark falls back to local copies when absent
    from ddpm_jax import diffusion as _diffusion
except ImportError:  # pragma: no cover
    _diffusion = None
try:
    from ddpm_jax import samplers as _samplers
except ImportError:  # pragma: no cover
    _samplers = None
try:
    from ddpm_jax import schedules as _schedules
except ImportError:  # pragma: no cover
    _schedules = None

NUM_TIMESTEPS = 1000
LR = 2e-4


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    name: str
    unet: UNetConfig
    height: int
    width: int
    channels: int
    batch: int  # default training (and sampling) batch


def mnist_config() -> BenchConfig:
    """The CPU demo's model, read from experiments/mnist.py when present."""
    path = REPO / "experiments" / "mnist.py"
    try:
        from ddpm_jax.config import load_config

        config = load_config(path)
        fields = {f.name for f in dataclasses.fields(UNetConfig)}
        unet = UNetConfig(**{k: v for k, v in config.model.to_dict().items() if k in fields})
        size = int(config.data.image_size)
        return BenchConfig("mnist", unet, size, size, unet.in_channels, int(config.train.batch_size))
    except (ImportError, FileNotFoundError, AttributeError, KeyError) as err:
        print(f"[bench] experiments/mnist.py not usable ({err!r}); using the built-in MNIST model", file=sys.stderr)
    unet = UNetConfig(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return BenchConfig("mnist", unet, 16, 16, 1, 64)


def cifar10_config() -> BenchConfig:
    return BenchConfig("cifar10", UNetConfig.ddpm_cifar10(), 32, 32, 3, 128)


def tiny_config() -> BenchConfig:
    """For the smoke test: the smallest U-Net that still has every block kind."""
    unet = UNetConfig(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=4,
    )
    return BenchConfig("tiny", unet, 8, 8, 1, 2)


CONFIGS: dict[str, Callable[[], BenchConfig]] = {"mnist": mnist_config, "cifar10": cifar10_config, "tiny": tiny_config}


def diffusers_kwargs(config: UNetConfig) -> dict[str, Any]:
    """``UNetConfig`` → the keyword arguments of diffusers' ``UNet2DModel`` that build the same network."""
    return dict(
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        center_input_sample=False,
        time_embedding_type="positional",
        freq_shift=config.freq_shift,
        flip_sin_to_cos=config.flip_sin_to_cos,
        down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        mid_block_scale_factor=config.mid_block_scale_factor,
        downsample_padding=config.downsample_padding,
        downsample_type="conv",
        upsample_type="conv",
        dropout=config.dropout,
        act_fn="silu",
        attention_head_dim=config.attention_head_dim,  # None = one head over all channels, in both
        norm_num_groups=config.norm_num_groups,
        attn_norm_num_groups=None,
        norm_eps=config.norm_eps,
        resnet_time_scale_shift="default",
        add_attention=config.add_attention,
        time_embedding_dim=config.time_embedding_dim,
    )


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], Any], iters: int) -> float:
    """Median wall time of ``fn()`` over ``iters`` calls after one warm-up call; fn must block."""
    fn()
    times = []
    for _ in range(max(1, iters)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def num_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS)
        return os.cpu_count() or 1


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------------


def _alphas_cumprod() -> np.ndarray:
    """ᾱ_t of the paper's linear schedule β = 1e-4 … 0.02, T = 1000 (float64 → float32)."""
    betas = np.linspace(1e-4, 0.02, NUM_TIMESTEPS, dtype=np.float64)
    return np.cumprod(1.0 - betas).astype(np.float32)


def _local_loss_simple(alphas_cumprod, model_fn, x0, key):
    """Fallback ε-loss (Algorithm 1) when ddpm_jax.diffusion is not available."""
    key_t, key_eps = jax.random.split(key)
    t = jax.random.randint(key_t, (x0.shape[0],), 0, NUM_TIMESTEPS)
    eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
    a = alphas_cumprod[t][:, None, None, None]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps
    return jnp.mean((eps - model_fn(x_t, t)) ** 2)


def _memory_mb(compiled) -> float | None:
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        return total / 2**20
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None


def bench_jax(cfg: BenchConfig, batch: int, sample_batch: int, iters: int, ddim_steps: int,
              library_step: bool = False, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Our U-Net's train step, forward and DDIM chain; ``dtype`` is the computation dtype (bf16: mixed
    precision, float32 parameters and Adam state, as ``config.train.compute_dtype``)."""
    model = UNet(dataclasses.replace(cfg.unet, dtype=dtype))
    key = jax.random.key(0)
    x0 = jax.random.uniform(jax.random.key(1), (batch, cfg.height, cfg.width, cfg.channels), minval=-1, maxval=1)
    params = jax.jit(model.init)(key, x0[:1], jnp.zeros((1,), jnp.int32))["params"]
    tx = optax.adam(LR)
    opt_state = tx.init(params)

    if _diffusion is not None and _schedules is not None:
        schedule = _schedules.get_schedule("linear", NUM_TIMESTEPS)
        loss_simple = lambda model_fn, x, k: _diffusion.loss_simple(schedule, model_fn, x, k)  # noqa: E731
        loss_source = "ddpm_jax.diffusion.loss_simple"
    else:
        schedule = None
        ac = jnp.asarray(_alphas_cumprod())
        loss_simple = lambda model_fn, x, k: _local_loss_simple(ac, model_fn, x, k)  # noqa: E731
        loss_source = "local ε-loss"

    def train_step(params, opt_state, x0, key):
        def loss_fn(p):
            model_fn = lambda x_t, t: model.apply(  # noqa: E731
                {"params": p}, x_t, t, train=True, rngs={"dropout": jax.random.fold_in(key, 1)})
            return loss_simple(model_fn, x0, key)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, x0, key).compile()
    compile_s = time.perf_counter() - start
    state = [params, opt_state]

    def one_step():
        state[0], state[1], loss = compiled(state[0], state[1], x0, key)
        loss.block_until_ready()

    step_s = median_seconds(one_step, iters)
    params = state[0]

    # One denoising step: the U-Net forward at the sampling batch, eval mode.
    xs = jax.random.normal(jax.random.key(2), (sample_batch, cfg.height, cfg.width, cfg.channels))
    ts = jnp.full((sample_batch,), NUM_TIMESTEPS // 2, jnp.int32)
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(params, xs, ts).compile()
    fwd_s = median_seconds(lambda: forward(params, xs, ts).block_until_ready(), iters)

    result = dict(
        framework="jax", device=str(jax.devices()[0].device_kind), dtype=jnp.dtype(dtype).name,
        params=count_params(params), batch=batch,
        sample_batch=sample_batch, compile_s=compile_s, train_steps_per_s=1.0 / step_s,
        train_images_per_s=batch / step_s, forward_images_per_s=sample_batch / fwd_s,
        peak_mb=_memory_mb(compiled), loss=loss_source, ddim_images_per_s=None,
    )
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_mb_allocator"] = stats["peak_bytes_in_use"] / 2**20

    if ddim_steps and _samplers is not None and schedule is not None:
        shape = (sample_batch, cfg.height, cfg.width, cfg.channels)
        chain = jax.jit(lambda p, k: _samplers.ddim_sample(
            lambda x, t: model.apply({"params": p}, x, t), schedule, shape, k, num_steps=ddim_steps))
        chain = chain.lower(params, key).compile()
        chain_s = median_seconds(lambda: chain(params, key).block_until_ready(), max(1, iters // 5))
        result["ddim_images_per_s"] = sample_batch / chain_s
        result["ddim_steps"] = ddim_steps

    if library_step:
        result.update(_bench_library_step(cfg, model, x0, iters))
    return result


def _bench_library_step(cfg: BenchConfig, model, x0, iters: int) -> dict[str, Any]:
    """ddpm_jax.training.diffusion's real step (per-example draws, one batched model call, EMA, clipping, warm-up), on one device."""
    try:
        import ml_collections

        from ddpm_jax.training import diffusion as diffusion_trainer
        from ddpm_jax.training import loop
    except ImportError as err:  # pragma: no cover
        return {"library_step_error": repr(err)}
    config = ml_collections.ConfigDict(dict(
        train=dict(lr=LR, warmup_steps=10, grad_clip=1.0, ema_decay=0.999),
        diffusion=dict(prediction="eps"), data=dict(random_flip=False)))
    schedule = _schedules.get_schedule("linear", NUM_TIMESTEPS)
    tx = loop.make_optimizer(LR, 10, 1.0)
    state = diffusion_trainer.create_train_state(model, tx, jax.random.key(0), x0[:1].shape)
    step = jax.jit(diffusion_trainer.make_train_step(model, schedule, config), donate_argnums=0)
    key = jax.random.key(3)
    start = time.perf_counter()
    compiled = step.lower(state, x0, key).compile()
    compile_s = time.perf_counter() - start
    box = [state]

    def one_step():
        box[0], metrics = compiled(box[0], x0, key)
        metrics["loss"].block_until_ready()

    step_s = median_seconds(one_step, iters)
    return {"library_compile_s": compile_s, "library_train_steps_per_s": 1.0 / step_s}


# --------------------------------------------------------------------------------------------
# PyTorch / diffusers
# --------------------------------------------------------------------------------------------


def torch_available() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def bench_diffusers(cfg: BenchConfig, batch: int, sample_batch: int, iters: int, ddim_steps: int,
                    expected_params: int | None = None, channels_last: bool = False,
                    autocast: str | None = None) -> dict[str, Any]:
    """diffusers' UNet2DModel, the same measurements as ``bench_jax``; ``autocast="bfloat16"`` runs the model
    under ``torch.autocast`` (float32 parameters and Adam state: torch's mixed precision)."""
    import contextlib

    import diffusers
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    mixed = (lambda: torch.autocast(device.type, dtype=getattr(torch, autocast))) if autocast else contextlib.nullcontext
    model = diffusers.UNet2DModel(**diffusers_kwargs(cfg.unet)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if expected_params is not None and n_params != expected_params:
        raise AssertionError(f"{cfg.name}: diffusers UNet2DModel has {n_params:,} parameters, ours {expected_params:,}")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    ac = torch.from_numpy(_alphas_cumprod()).to(device)
    x0 = (torch.rand(batch, cfg.channels, cfg.height, cfg.width, device=device) * 2 - 1).to(
        memory_format=memory_format)
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def one_step():
        t = torch.randint(0, NUM_TIMESTEPS, (batch,), device=device)
        eps = torch.randn_like(x0)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with mixed():
            eps_hat = model(x_t, t).sample
        loss = F.mse_loss(eps_hat.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    model.train()
    step_s = median_seconds(one_step, iters)

    model.eval()
    xs = torch.randn(sample_batch, cfg.channels, cfg.height, cfg.width, device=device).to(memory_format=memory_format)
    ts = torch.full((sample_batch,), NUM_TIMESTEPS // 2, device=device)

    def forward():
        with torch.inference_mode(), mixed():
            model(xs, ts)
        sync()

    fwd_s = median_seconds(forward, iters)
    result = dict(
        framework="diffusers", device=device.type, dtype=autocast or "float32", params=n_params, batch=batch, sample_batch=sample_batch,
        compile_s=None, train_steps_per_s=1.0 / step_s, train_images_per_s=batch / step_s,
        forward_images_per_s=sample_batch / fwd_s, peak_mb=None, ddim_images_per_s=None,
        torch_threads=torch.get_num_threads(), channels_last=channels_last,
    )
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20

    if ddim_steps:
        scheduler = diffusers.DDIMScheduler(num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear",
                                            clip_sample=True, set_alpha_to_one=True)
        scheduler.set_timesteps(ddim_steps)

        def chain():
            x = xs
            with torch.inference_mode(), mixed():
                for t in scheduler.timesteps:
                    x = scheduler.step(model(x, t).sample.float(), t, x).prev_sample
            sync()

        chain_s = median_seconds(chain, max(1, iters // 5))
        result["ddim_images_per_s"] = sample_batch / chain_s
        result["ddim_steps"] = ddim_steps
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

COLUMNS = [  # (header, key, format)
    ("config", "config", "{}"),
    ("framework", "framework", "{}"),
    ("params", "params", "{:,}"),
    ("batch", "batch", "{}"),
    ("compile s", "compile_s", "{:.1f}"),
    ("train steps/s", "train_steps_per_s", "{:.3f}"),
    ("train img/s", "train_images_per_s", "{:.1f}"),
    ("fwd img/s", "forward_images_per_s", "{:.1f}"),
    ("ddim img/s", "ddim_images_per_s", "{:.3f}"),
    ("peak MB", "peak_mb", "{:.0f}"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else fmt.format(value)

    lines = [[h for h, _, _ in COLUMNS]] + [[cell(r, k, f) for _, k, f in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """ours / diffusers for each throughput (> 1: ours faster)."""
    out = {}
    for key in ("train_steps_per_s", "forward_images_per_s", "ddim_images_per_s"):
        a, b = ours.get(key), theirs.get(key)
        out[key] = a / b if a and b else None
    return out


def run(config_names: list[str], batch: int | None = None, sample_batch: int | None = None, iters: int = 10,
        ddim_steps: int = 50, use_torch: bool = True, library_step: bool = False,
        torch_channels_last: bool = False, verbose: bool = True) -> dict[str, Any]:
    threads = num_threads()
    torch_ok = use_torch and torch_available()
    if torch_ok:
        import torch

        torch.set_num_threads(threads)
    rows, comparisons = [], []
    for name in config_names:
        cfg = CONFIGS[name]()
        b = batch or cfg.batch
        sb = sample_batch or b
        if verbose:
            print(f"[bench] {name}: batch {b}, sample batch {sb}, {iters} iters ...", file=sys.stderr, flush=True)
        ours = dict(config=name, **bench_jax(cfg, b, sb, iters, ddim_steps, library_step))
        rows.append(ours)
        if torch_ok:
            theirs = dict(config=name, **bench_diffusers(cfg, b, sb, iters, ddim_steps, ours["params"],
                                                         torch_channels_last))
            rows.append(theirs)
            comparisons.append(dict(config=name, **ratios(ours, theirs)))
    return dict(
        rows=rows, ratios=comparisons, threads=threads, jax_version=jax.__version__,
        jax_device=str(jax.devices()[0]), xla_flags=os.environ.get("XLA_FLAGS", ""),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )


def print_report(report: dict[str, Any]) -> None:
    print(f"JAX {report['jax_version']} on {report['jax_device']}, {report['threads']} threads, "
          f"XLA_FLAGS={report['xla_flags']!r}, load average {report['load_average']}")
    print(format_table(report["rows"]))
    for row in report["rows"]:
        if "library_train_steps_per_s" in row:
            print(f"{row['config']}: ddpm_jax.training.diffusion step {row['library_train_steps_per_s']:.3f} steps/s "
                  f"(compile {row['library_compile_s']:.1f} s)")
    if report["ratios"]:
        print("\nours / diffusers (> 1: ours faster)")
        for r in report["ratios"]:
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"  {r['config']}: train steps/s {fmt(r['train_steps_per_s'])}, "
                  f"fwd img/s {fmt(r['forward_images_per_s'])}, ddim img/s {fmt(r['ddim_images_per_s'])}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["mnist", "cifar10", "both", "tiny"], default="both")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: the config's: 64 / 128)")
    parser.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default: --batch)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per measurement (median)")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM chain length; 0 skips the chain")
    parser.add_argument("--no-torch", action="store_true", help="skip diffusers even if installed")
    parser.add_argument("--torch-channels-last", action="store_true", help="run diffusers in channels_last")
    parser.add_argument("--library-step", action="store_true", help="also time ddpm_jax.training.diffusion's train step")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    names = ["mnist", "cifar10"] if args.config == "both" else [args.config]
    report = run(names, args.batch, args.sample_batch, args.iters, args.ddim_steps, not args.no_torch,
                 args.library_step, args.torch_channels_last)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
