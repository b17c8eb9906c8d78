"""One-shot GPU benchmark (issue 15 item 7): everything worth knowing about a lent GPU, in one ≤ 6-minute call.

Run it through the device tool in ONE call (``timeout_s`` 420, ``carry: [".whl"]``), the two wheels the GPU image
lacks prepared first (benchmarks/README.md, "One-shot GPU benchmark": ``pip download`` of diffusers,
ml-collections and importlib-metadata into ``.whl``)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py --json $OUT/gpu.json --markdown $OUT/gpu.md

Dry run (tiny configs on the CPU, every part in this process; about 2 minutes on 2 busy cores, most of it
compiling and importing diffusers; tests/test_benchmarks_smoke.py)::

    python benchmarks/bench_gpu.py --dry-run --in-process

It measures, in this order (each part a subprocess with its own time limit, so that a crash, an out-of-memory or a
hang in one part is a row of the table and the rest still runs; the whole run keeps to ``--budget-s``):

1. ``train_jax``: the DDPM CIFAR-10 U-Net (``UNetConfig.ddpm_cifar10()``, 35.7M parameters) train step at batch 128
   (ε-loss, backward, Adam), float32 and bfloat16 compute (float32 parameters and Adam state), and one U-Net forward
   (``bench_unet.bench_jax``);
2. ``train_diffusers``: diffusers' ``UNet2DModel`` of the same configuration, the same step, float32 and under
   ``torch.autocast(bfloat16)`` (``bench_unet.bench_diffusers``);
3. ``ddpm_sample``: 256 images × 1000 ancestral steps (Algorithm 2, ``samplers.ddpm_sample``: one compiled
   ``lax.scan``), float32 — when the U-Net's forward time says the chain would not fit the part's budget, the
   seconds are extrapolated from 1000 forwards (marked "extrapolated");
4. ``sd_jax_float32`` / ``sd_jax_bfloat16``: Stable Diffusion v1.5 size (random weights, ``StableDiffusion.from_configs``),
   512², 50 PNDM steps, classifier-free guidance: seconds per image (second call) and the first call (compile + run);
   the float32 part writes its weights as diffusers state dicts for
5. ``sd_diffusers``: diffusers' ``StableDiffusionPipeline`` on the SAME random weights (our parameters through
   ``convert.export_state_dict``), float32 and bfloat16, the same prompt, steps and guidance.

Every part reports compile seconds where there is a compilation and peak GPU memory (JAX's train step: XLA's
buffer accounting of the compiled step, ``process_peak_mb`` the allocator's peak so far; JAX's other parts: the
process's ``memory_stats()["peak_bytes_in_use"]``; torch: ``max_memory_allocated`` since the measurement began).
float32 means TF32 products on an NVIDIA GPU on both sides (XLA's default precision; torch told so, ``allow_tf32``). JAX's parts run with
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so that the peak is what the programs use, not 75% of the card.
Output: a Markdown table on stdout (and ``--markdown``), the JSON (``--json``, rewritten after every part so a killed
run keeps what it measured). torch is imported only here (and in the other benchmarks), never by the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterator

REPO = pathlib.Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

PROMPT = "an astronaut riding a horse, in Hokusai style"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What a run measures: the GPU's sizes, or the dry run's tiny ones (CPU, seconds)."""
    unet_config: str     # bench_unet.CONFIGS key
    train_batch: int
    iters: int
    sample_images: int
    sample_steps: int    # T of the ancestral chain (all of its steps are run)
    sd_config: str       # bench_stable_diffusion.CONFIGS key
    sd_steps: int
    train_dtypes: tuple[str, ...] = ("float32", "bfloat16")


FULL = Sizes("cifar10", 128, 10, 256, 1000, "sd15", 50)
DRY = Sizes("tiny", 2, 1, 2, 25, "tiny", 2, ("float32",))  # bf16 U-Nets: tests/test_mixed_precision.py
# (part, its time limit in seconds on the GPU): the order is the priority when the budget runs out
PARTS = (("train_jax", 120), ("train_diffusers", 50), ("ddpm_sample", 100), ("sd_jax_float32", 120),
         ("sd_diffusers", 70), ("sd_jax_bfloat16", 90))


Part = Callable[[Sizes, pathlib.Path, float], Iterator[dict]]


def row(part: str, framework: str, dtype: str, what: str, value: float | None, unit: str, **extra: Any) -> dict:
    return dict(part=part, framework=framework, dtype=dtype, what=what, value=value, unit=unit, **extra)


def jax_peak_mb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def torch_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------------
# The parts: part(sizes, work, budget_s) yields its rows as it measures them
# ------------------------------------------------------------------------------------------------

def part_train_jax(sizes: Sizes, work: pathlib.Path, budget_s: float) -> Iterator[dict]:
    import jax.numpy as jnp

    import bench_unet

    cfg = bench_unet.CONFIGS[sizes.unet_config]()
    for name in sizes.train_dtypes:
        r = bench_unet.bench_jax(cfg, sizes.train_batch, sizes.train_batch, sizes.iters, 0, dtype=jnp.dtype(name))
        yield row("train_jax", "jax", name, f"train step, batch {sizes.train_batch}", r["train_steps_per_s"],
                  "steps/s", compile_s=r["compile_s"], peak_mb=r["peak_mb"], process_peak_mb=r.get("peak_mb_allocator"),
                  params=r["params"], device=r["device"])
        yield row("train_jax", "jax", name, f"U-Net forward, batch {sizes.train_batch}", r["forward_images_per_s"],
                  "img/s")


def allow_tf32() -> None:
    """float32 matrix products and convolutions in TF32 on NVIDIA GPUs, as XLA does by default (precision DEFAULT):
    torch allows it for convolutions only unless told."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def part_train_diffusers(sizes: Sizes, work: pathlib.Path, budget_s: float) -> Iterator[dict]:
    import bench_unet

    allow_tf32()
    cfg = bench_unet.CONFIGS[sizes.unet_config]()
    for autocast in (None, "bfloat16"):
        r = bench_unet.bench_diffusers(cfg, sizes.train_batch, sizes.train_batch, sizes.iters, 0, autocast=autocast)
        yield row("train_diffusers", "diffusers", r["dtype"], f"train step, batch {sizes.train_batch}",
                  r["train_steps_per_s"], "steps/s", peak_mb=r["peak_mb"], params=r["params"], device=r["device"])
        yield row("train_diffusers", "diffusers", r["dtype"], f"U-Net forward, batch {sizes.train_batch}",
                  r["forward_images_per_s"], "img/s")


def part_ddpm_sample(sizes: Sizes, work: pathlib.Path, budget_s: float) -> Iterator[dict]:
    """Algorithm 2 over all T steps for ``sizes.sample_images`` images: one compiled chain, timed once after its
    compilation; extrapolated from T timed forwards when the chain would not fit ``budget_s``."""
    import jax
    import jax.numpy as jnp

    import bench_unet
    from ddpm_jax import samplers, schedules
    from ddpm_jax.models.unet import UNet

    cfg = bench_unet.CONFIGS[sizes.unet_config]()
    model, start = UNet(cfg.unet), time.perf_counter()
    shape = (sizes.sample_images, cfg.height, cfg.width, cfg.channels)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *shape[1:])), jnp.zeros((1,), jnp.int32))["params"]
    schedule = schedules.get_schedule("linear", sizes.sample_steps)
    x, t = jnp.zeros(shape), jnp.full((shape[0],), sizes.sample_steps // 2, jnp.int32)
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(params, x, t).compile()
    forward_s = bench_unet.median_seconds(lambda: forward(params, x, t).block_until_ready(), 3)
    estimate = sizes.sample_steps * forward_s
    what = f"{sizes.sample_images} images × {sizes.sample_steps} ancestral steps"
    common = dict(estimate_s=estimate, forward_s=forward_s)
    if estimate * 1.2 + (time.perf_counter() - start) > budget_s - 30:  # 30 s: the chain's compilation, at most
        yield row("ddpm_sample", "jax", "float32", what, estimate, "s", note="extrapolated: T × one forward",
                  peak_mb=jax_peak_mb(), **common)
        return
    chain = jax.jit(lambda p, k: samplers.ddpm_sample(lambda x, t: model.apply({"params": p}, x, t), schedule,
                                                      shape, k, variance="fixed_large"))
    compile_start = time.perf_counter()
    compiled = chain.lower(params, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - compile_start
    run_start = time.perf_counter()
    images = compiled(params, jax.random.key(1)).block_until_ready()
    seconds = time.perf_counter() - run_start
    assert bool(jnp.isfinite(images).all()), "the chain produced non-finite images"
    yield row("ddpm_sample", "jax", "float32", what, seconds, "s", compile_s=compile_s, peak_mb=jax_peak_mb(), **common)


def part_sd_jax(dtype: str) -> Part:
    def part(sizes: Sizes, work: pathlib.Path, budget_s: float) -> Iterator[dict]:
        import bench_stable_diffusion as bench_sd

        config = bench_sd.CONFIGS[sizes.sd_config]
        start = time.perf_counter()
        pipe = bench_sd.random_pipeline(config, dtype)
        init_s = time.perf_counter() - start
        if dtype == "float32":  # first, so that sd_diffusers has them even if our txt2img runs out of time
            save_diffusers_weights(pipe, work)
        r = bench_sd.bench_txt2img(config, sizes.sd_steps, pipe)
        what = f"txt2img {config.size}², {sizes.sd_steps} steps, guided, s/image"
        yield row(f"sd_jax_{dtype}", "jax", dtype, what, r["txt2img_s"], "s",
                  compile_s=r["txt2img_first_call_s"] - r["txt2img_s"], init_s=init_s, peak_mb=jax_peak_mb(),
                  recompiled=r["txt2img_recompiled"], note="compile s = first call − second call")

    return part


def save_diffusers_weights(pipe: Any, work: pathlib.Path) -> None:
    """Our random SD weights as diffusers / transformers state dicts (``work/<component>.safetensors``)."""
    import numpy as np
    from safetensors.numpy import save_file

    from ddpm_jax.pretrained.convert import export_state_dict
    from ddpm_jax.pretrained.transformers_clip import transformers_clip_key

    params = {k: {n: np.asarray(v) for n, v in export_state_dict(p).items()} for k, p in
              (("unet", pipe.params["unet"]), ("vae", pipe.params["vae"]))}
    params["text_encoder"] = export_state_dict({"text_model": pipe.params["text_encoder"]}, transformers_clip_key)
    for name, state in params.items():
        save_file(state, work / f"{name}.safetensors")


def diffusers_pipeline(sizes: Sizes, work: pathlib.Path) -> Any:
    """diffusers' StableDiffusionPipeline with the float32 part's weights (strict loading: the same networks)."""
    import diffusers
    import torch
    import transformers
    from safetensors.torch import load_file

    import bench_stable_diffusion as bench_sd
    from ddpm_jax.pipelines.stable_diffusion import SD_V1_SCHEDULER_CONFIG
    from ddpm_jax.pipelines.stable_diffusion import byte_tokenizer
    from ddpm_jax.pretrained.diffusers import autoencoder_kl_config_to_diffusers, unet_config_to_diffusers
    from ddpm_jax.pretrained.export import save_tokenizer
    from ddpm_jax.pretrained.transformers_clip import clip_text_config_to_transformers

    config = bench_sd.CONFIGS[sizes.sd_config]
    ours = byte_tokenizer(config.text.vocab_size)
    token_ids = {"bos_token_id": ours.bos_token_id, "pad_token_id": ours.pad_token_id}
    unet = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(config.unet))
    vae = diffusers.AutoencoderKL.from_config(autoencoder_kl_config_to_diffusers(config.vae))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **clip_text_config_to_transformers(config.text, token_ids)))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        expected = set(module.state_dict())  # transformers' CLIPTextModel: with or without "text_model."
        state = {k if k in expected else k.removeprefix("text_model."): v
                 for k, v in load_file(work / f"{name}.safetensors").items()}
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer, not a weight
        if missing or unexpected:
            raise RuntimeError(f"{name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tokenizer_dir = work / "tokenizer"
    save_tokenizer(tokenizer_dir, ours)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    scheduler = diffusers.PNDMScheduler.from_config(SD_V1_SCHEDULER_CONFIG)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def part_sd_diffusers(sizes: Sizes, work: pathlib.Path, budget_s: float) -> Iterator[dict]:
    import torch

    import bench_stable_diffusion as bench_sd

    if not (work / "unet.safetensors").exists():
        raise FileNotFoundError("no weights from sd_jax_float32 (did it fail?): nothing to compare on")
    allow_tf32()
    pipe, size = diffusers_pipeline(sizes, work), bench_sd.CONFIGS[sizes.sd_config].size
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for dtype in ("float32", "bfloat16"):
        pipe = pipe.to(dtype=getattr(torch, dtype))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        call = lambda steps: pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size,  # noqa: E731
                                  width=size, output_type="np").images
        call(2)  # warm-up (cuDNN autotuning, allocator)
        sync()
        start = time.perf_counter()
        images = call(sizes.sd_steps)
        sync()
        seconds = time.perf_counter() - start
        assert images.shape == (1, size, size, 3)
        yield row("sd_diffusers", "diffusers", dtype, f"txt2img {size}², {sizes.sd_steps} steps, guided, s/image",
                  seconds, "s", peak_mb=torch_peak_mb())


PART_FUNCTIONS: dict[str, Part] = {
    "train_jax": part_train_jax, "train_diffusers": part_train_diffusers, "ddpm_sample": part_ddpm_sample,
    "sd_jax_float32": part_sd_jax("float32"), "sd_diffusers": part_sd_diffusers,
    "sd_jax_bfloat16": part_sd_jax("bfloat16"),
}


# ------------------------------------------------------------------------------------------------
# Running the parts, each guarded
# ------------------------------------------------------------------------------------------------

def failed(part: str, why: str) -> list[dict]:
    return [row(part, "-", "-", "FAILED", None, "-", note=why)]


def run_in_process(part: str, sizes: Sizes, work: pathlib.Path, budget_s: float,
                   out: pathlib.Path | None = None) -> list[dict]:
    """The part's rows (and, with ``out``, each written there as soon as it is measured); a FAILED row last if it
    raised."""
    rows = []
    try:
        for measured in PART_FUNCTIONS[part](sizes, work, budget_s):
            rows.append(measured)
            if out is not None:
                out.write_text(json.dumps(rows, default=str))
    except Exception as err:  # noqa: BLE001 (a failing part is a row of the table; the rest still runs)
        traceback.print_exc()
        rows += failed(part, f"{type(err).__name__}: {err}"[:300])
    return rows


def run_in_subprocess(part: str, dry_run: bool, work: pathlib.Path, budget_s: float) -> list[dict]:
    """``part`` in its own process (its own GPU memory, killed with its process group after ``budget_s``)."""
    out = work / f"{part}.json"
    measured = lambda: json.loads(out.read_text()) if out.exists() else []  # noqa: E731  (what it wrote so far)
    command = [sys.executable, __file__, "--part", part, "--work", str(work), "--part-budget", str(budget_s)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command + (["--dry-run"] if dry_run else []), env=env, start_new_session=True)
    try:
        process.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return measured() + failed(part, f"timed out after {budget_s:g} s (killed)")
    if process.returncode != 0:
        return measured() + failed(part, f"the process exited with {process.returncode} (see its stderr above)")
    return measured()


def environment() -> dict[str, Any]:
    def command(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=30,
                                  env=dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")).stdout.strip()
        except Exception as err:  # noqa: BLE001
            return f"({type(err).__name__})"

    versions = command(sys.executable, "-c", "import jax, jaxlib, importlib.metadata as m; print(jax.__version__, "
                       "[d.device_kind for d in jax.devices()], *(f'{p} ' + m.version(p) for p in "
                       "('torch', 'diffusers', 'transformers')))")
    return dict(gpu=command("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"),
                versions=versions, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def markdown(report: dict[str, Any]) -> str:
    fmt = lambda v, f: "–" if v is None else f.format(v)  # noqa: E731
    lines = [f"GPU: {report['environment'].get('gpu')}; {report['environment'].get('versions')}; "
             f"{report['environment'].get('date')}; total {report['total_s']:.0f} s", "",
             "| part | framework | dtype | measurement | value | unit | compile s | peak GPU MB | note |",
             "| --- | --- | --- | --- | ---: | --- | ---: | ---: | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['part']} | {r['framework']} | {r['dtype']} | {r['what']} | {fmt(r['value'], '{:.3f}')} "
                     f"| {r['unit']} | {fmt(r.get('compile_s'), '{:.1f}')} | {fmt(r.get('peak_mb'), '{:.0f}')} "
                     f"| {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny configs (CPU, seconds): checks every part runs")
    parser.add_argument("--in-process", action="store_true", help="run the parts in this process (no time limits)")
    parser.add_argument("--budget-s", type=float, default=330, help="the whole run's wall-clock budget (s)")
    parser.add_argument("--parts", default=",".join(p for p, _ in PARTS), help="comma-separated subset, in order")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--markdown", type=pathlib.Path, default=None)
    parser.add_argument("--part", help=argparse.SUPPRESS)        # internal: run one part (the subprocess)
    parser.add_argument("--work", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--part-budget", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else FULL
    if args.part:  # the subprocess: one part, its rows to work/<part>.json
        rows = run_in_process(args.part, sizes, args.work, args.part_budget, out=args.work / f"{args.part}.json")
        (args.work / f"{args.part}.json").write_text(json.dumps(rows, default=str))
        return {"rows": rows}

    unknown = sorted(set(args.parts.split(",")) - set(PART_FUNCTIONS))
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; choose from {', '.join(PART_FUNCTIONS)}")
    limits = dict(PARTS)
    start = time.perf_counter()
    report: dict[str, Any] = {"sizes": dataclasses.asdict(sizes), "environment": environment(), "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as work:
        for part in args.parts.split(","):
            left = args.budget_s - (time.perf_counter() - start)
            limit = min(limits[part], left)
            print(f"[bench_gpu] {part}: limit {limit:.0f} s ({left:.0f} s left)", file=sys.stderr, flush=True)
            if args.in_process:  # no limits (the dry run in the tests)
                rows = run_in_process(part, sizes, pathlib.Path(work), limit)
            elif limit < 15:
                rows = failed(part, f"skipped: {left:.0f} s of the budget left")
            else:
                rows = run_in_subprocess(part, args.dry_run, pathlib.Path(work), limit)
            report["rows"] += rows
            print(f"[bench_gpu] {part}: done at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            report["total_s"] = time.perf_counter() - start
            if args.json:  # after every part: a killed run keeps what it measured
                args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = markdown(report)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()
