"""Generation from a :class:`~ddpm_jax.diffusion_model.DiffusionModel`: any solver, guided, over devices.

    x_T ~ N(0, I) ──► samplers.sample(name, ε_θ or guided ε̃_θ, …) ──► x_0 ──► decode (latents) ──► images

- :func:`make_sample_fn`: the one place a model, a solver (any of ``samplers.SAMPLERS``) and classifier-free
  guidance are put together: ``sample(params, key, cond=None, uncond=None, w=1.0, eta=η)``, traced once per shape
  and solver (w and DDIM's η are traced: one program serves every value); the training loop's sample grids,
  :func:`generate` and :func:`sample_images` all use it.
- :func:`generate`: one image per class label or prompt (or ``num`` unconditional ones), guided with w.
- :func:`sample_images`: many unconditional samples in chunks, each chunk split over the local devices.
- :func:`load_pretrained_ddpm`: a diffusers DDPM folder (google/ddpm-cifar10-32) as a DiffusionModel.
- :func:`sample_to_files`: what ``ddpm-jax sample`` writes (PNG grid, .npz, trajectory strip).
"""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import guidance, parallel, plotting, samplers
from ddpm_jax.diffusion_model import DiffusionModel
from ddpm_jax.models.unet import check_condition
from ddpm_jax.pretrained.diffusers import DDPM_VARIANCES, load_ddpm_folder
from ddpm_jax.progress import progress_bar
from ddpm_jax.schedulers import SchedulerConfig

PyTree = Any


# ================================================================================================
# One sampler for a model
# ================================================================================================

def resolve_sampler(model: DiffusionModel, sampler: str | None = None, steps: int | None = None,
                    eta: float | None = None) -> tuple[str, int, float]:
    """(sampler, steps, eta) with the model's defaults filled in. "ddpm" without ``steps`` runs all T steps
    (Algorithm 2) unless it is the model's own default sampler; every other solver defaults to the model's steps."""
    name = sampler or model.sampler
    if name not in samplers.SAMPLER_NAMES:
        raise ValueError(f"sampler must be one of {', '.join(samplers.SAMPLER_NAMES)}, got {name!r}")
    if steps is None:
        steps = model.steps if (name != "ddpm" or name == model.sampler) else model.schedule.num_timesteps
    if not 1 <= int(steps) <= model.schedule.num_timesteps:
        raise ValueError(f"steps must be in [1, {model.schedule.num_timesteps}], got {steps}")
    eta = float(model.eta if eta is None else eta)
    if name == "ddim":
        samplers.check_eta(eta)   # here, while η is a number: the compiled samplers trace it
    return name, int(steps), eta


def model_calls(model: DiffusionModel, sampler: str, steps: int) -> int:
    """How many times ``sampler`` calls the model for ``steps`` grid points (PNDM: steps + 1; Heun: 2·steps − 1)."""
    return len(samplers.make_scheduler(model.schedule, sampler).set_timesteps(steps))


def make_sample_fn(model: DiffusionModel, shape: tuple[int, ...], *, sampler: str | None = None,
                   steps: int | None = None, eta: float | None = None, return_trajectory: bool = False
                   ) -> Callable[..., Any]:
    """``sample(params, key, cond=None, uncond=None, guidance_scale=1.0, eta=η) -> x_0 [shape]`` (not compiled).

    ``sampler``/``steps``/``eta`` default to the model's (:func:`resolve_sampler`). A conditional model
    gets its condition as a dict of U-Net inputs (``{"class_labels": [B]}`` or ``{"context": [B, L, D]}``,
    leading dim B or 1) and the null condition ``uncond`` of the same structure; the two predictions are
    combined by classifier-free guidance with scale w (``guidance.py``; w is traced, so one compiled
    sampler serves every w). DDIM's η is ``eta`` unless ``sample`` is given one, which may be traced (one
    compiled sampler for every η). ``return_trajectory`` also returns x_t along the chain.
    """
    name, num_steps, default_eta = resolve_sampler(model, sampler, steps, eta)

    def sample(params: PyTree, key: jax.Array, cond: dict | None = None, uncond: dict | None = None,
               guidance_scale: float | jax.Array = 1.0, eta: float | jax.Array = default_eta) -> Any:
        if cond is None:  # ε(x_t) or, for a conditional model, ε(x_t, ∅)
            eps_fn = model.unconditional_eps_fn(params)
        else:
            eps_fn = guidance.guided_eps_fn(guidance.unet_model_fn(model.unet, params), cond, uncond, guidance_scale)
        return samplers.sample(eps_fn, model.schedule, shape, key, sampler=name, num_steps=num_steps, eta=eta,
                               prediction=model.prediction, variance=model.variance,
                               clip_denoised=model.clip_denoised, return_trajectory=return_trajectory)

    return sample


def guided_sample(sample_fn: Callable, params: PyTree, key: jax.Array, cond: dict[str, Any] | None,
                  uncond: dict[str, Any] | None, guidance_scale: float | jax.Array) -> Any:
    """``sample_fn`` (:func:`make_sample_fn`) with a data condition ("label"/"context") in U-Net names,
    or unconditional when ``cond`` is empty."""
    if not cond:
        return sample_fn(params, key)
    return sample_fn(params, key, guidance.model_condition(cond), guidance.model_condition(uncond), guidance_scale)


# ================================================================================================
# Conditional generation
# ================================================================================================

def compiled_generator(model: DiffusionModel, shape: tuple[int, ...], solver: tuple[str, int],
                       return_trajectory: bool) -> Callable[..., Any]:
    """``jit(guided_sample)(params, key, cond, uncond, w, η)`` for ``model`` at ``shape`` with ``solver`` =
    (name, steps), built once per model (kept in ``model.compiled``): generating again — another seed, another
    w or η (both traced) — reuses the program."""
    key = ("generate", shape, solver, return_trajectory)
    if key not in model.compiled:
        name, steps = solver
        sample_fn = make_sample_fn(model, shape, sampler=name, steps=steps, return_trajectory=return_trajectory)
        model.compiled[key] = jax.jit(lambda p, k, c, u, w, eta: guided_sample(
            functools.partial(sample_fn, eta=eta), p, k, c, u, w))
    return model.compiled[key]


def generate(model: DiffusionModel, *, prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None,
             num: int | None = None, guidance_scale: float | None = None, steps: int | None = None,
             eta: float | None = None, seed: int = 0, return_latents: bool = False, sampler: str | None = None,
             ) -> dict[str, np.ndarray]:
    """Images from a model: one per prompt/label (or ``num`` unconditional ones).

    Classifier-free guidance with scale ``guidance_scale`` (default the model's) in one batched U-Net call
    per step; ``sampler``/``steps``/``eta`` default to the model's. Returns {"images": [B, H, W, C] in
    [-1, 1], "x0": the sampled latents (or images)} and, with ``return_latents``, the run's
    ``schedulers.Trajectory`` as "trajectory" (x_t along the chain [S+1, B, ...]), "model_inputs" [S, B, ...]
    and "timesteps" [S].
    """
    w = float(model.guidance_scale if guidance_scale is None else guidance_scale)
    guidance.check_guidance_scale(w)
    cond, uncond = model.condition_for(prompts, labels)
    batch = len(next(iter(cond.values()))) if cond else int(num or 16)
    if cond:
        check_condition(model.unet.config, **guidance.model_condition(cond))   # concrete: label range checked here
    name, num_steps, eta = resolve_sampler(model, sampler, steps, eta)
    run = compiled_generator(model, (batch, *model.x0_shape), (name, num_steps), return_latents)
    out = run(model.params, jax.random.key(seed), cond or None, uncond or None, jnp.float32(w), jnp.float32(eta))
    x0, trajectory = out if return_latents else (out, None)
    result = {"images": np.asarray(model.decode(x0)), "x0": np.asarray(x0)}
    if trajectory is not None:  # the runner's schedulers.Trajectory
        result["trajectory"] = np.asarray(trajectory.x)                                # [S+1, B, h, w, c]
        result["model_inputs"], result["timesteps"] = np.asarray(trajectory.model_input), np.asarray(trajectory.t)
    return result


# ================================================================================================
# Many samples, over the devices
# ================================================================================================

def compiled_chunk_samplers(model: DiffusionModel, shape: tuple[int, ...], solver: tuple[str, int]
                            ) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """The jitted unconditional samplers of one chunk for ``solver`` = (name, steps), built once per model (kept
    in ``model.compiled``): ``jitted(params, key, eta, want_trajectory)`` and, on several devices when the chunk
    divides over them, ``sharded(params, key, eta)`` whose x_0 is sharded along "data" (XLA's sharding
    propagation then splits the whole chain over the devices), else None. DDIM's η is traced: one program
    serves every η."""
    key = ("sample_images", shape, solver, jax.device_count())
    if key not in model.compiled:
        name, steps = solver
        plain = make_sample_fn(model, shape, sampler=name, steps=steps)
        with_trajectory = make_sample_fn(model, shape, sampler=name, steps=steps, return_trajectory=True)

        def run(params: PyTree, key: jax.Array, eta: jax.Array, want_trajectory: bool) -> Any:
            return (with_trajectory if want_trajectory else plain)(params, key, eta=eta)

        sharded = None
        if jax.process_count() == 1 and jax.device_count() > 1 and shape[0] % jax.device_count() == 0:
            sharded = jax.jit(lambda p, k, eta: run(p, k, eta, False),
                              out_shardings=parallel.batch_sharding(parallel.make_mesh()))
        model.compiled[key] = (jax.jit(run, static_argnums=3), sharded)
    return model.compiled[key]


def sample_images(model: DiffusionModel, num: int, *, sampler: str | None = None, steps: int | None = None,
                  eta: float | None = None, seed: int = 0, trajectory: bool = False, batch_size: int = 64,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``num`` unconditional samples (a conditional model samples ε(x_t, ∅)), decoded to images.

    Generated in chunks of ``batch_size``; chunk i uses ``fold_in(key(seed), i)``, so the same seed and
    batch size give the same images. On several devices (one process) each chunk is split over them along
    the "data" axis when its size divides evenly, so 8 GPUs sample 8× as fast; the images are the same as
    on one device (the noise depends only on the key). Returns (images [num, H, W, C] in [-1, 1],
    trajectory [S+1, b, h, w, c] of the first chunk or None).
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"--num and --batch-size must be >= 1, got {num} and {batch_size}")
    name, num_steps, eta = resolve_sampler(model, sampler, steps, eta)
    chunk = min(batch_size, num)
    shape = (chunk, *model.x0_shape)
    jitted, sharded = compiled_chunk_samplers(model, shape, (name, num_steps))
    eta = jnp.float32(eta)
    images, traj = [], None
    chunks = range((num + chunk - 1) // chunk)  # the last chunk is sampled whole, then trimmed
    if progress:
        chunks = progress_bar(chunks, desc=f"sampling {num} images ({name}, {model_calls(model, name, num_steps)} steps)",
                              unit="batch", dynamic_ncols=True)
    key = jax.random.key(seed)
    for i in chunks:
        want_traj = trajectory and i == 0
        k = jax.random.fold_in(key, i)
        out = (sharded(model.params, k, eta) if sharded is not None and not want_traj
               else jitted(model.params, k, eta, want_traj))
        if want_traj:
            out, traj = out
            traj = np.asarray(traj.x)  # the Trajectory's x [S+1, b, h, w, c]
        images.append(np.asarray(model.decode(out)))
    return np.concatenate(images)[:num], traj


# ================================================================================================
# Official checkpoints: a diffusers UNet2DModel folder + DDPMScheduler config
# ================================================================================================

def load_pretrained_ddpm(folder: str | os.PathLike) -> DiffusionModel:
    """A diffusers UNet2DModel with the schedule of its ``scheduler_config.json`` (google/ddpm-* folders).

    From the DDPMScheduler config: β's (diffusers' "linear" is not rescaled with T), ``prediction_type``,
    ``variance_type`` (fixed_small/fixed_large) and ``clip_sample``. The default sampler is the paper's:
    1000-step ancestral sampling (Algorithm 2). A class-conditional UNet2DModel (``num_class_embeds``, e.g. a
    ``ddpm-jax export`` of a class-conditional run) is sampled per label; its last label is taken as ∅
    (``guidance.null_class_label``: the library's convention), the unconditional branch of guidance.
    """
    unet, params, sched = load_ddpm_folder(folder)
    config = SchedulerConfig.from_config(sched)
    size, channels = int(unet.config.sample_size), int(unet.config.in_channels)
    kind, null = "none", {}
    if unet.config.num_class_embeds is not None:
        null_label = guidance.null_class_label(unet.config.num_class_embeds - 1)   # ∅ = the last label
        kind, null = "class", {"label": np.asarray(null_label, np.int32)}
    return DiffusionModel(
        unet=unet, params=params, schedule=config.schedule(), x0_shape=(size, size, channels),
        prediction=config.prediction, variance=DDPM_VARIANCES[sched.get("variance_type", "fixed_small")],
        clip_denoised=bool(sched.get("clip_sample", True)), sampler="ddpm", steps=int(config.num_train_timesteps),
        eta=1.0, kind=kind, null_condition=null, description=f"pretrained {folder}")


# ================================================================================================
# What `ddpm-jax sample` writes
# ================================================================================================

def parse_labels(labels: str | Sequence[int] | None, num: int, num_classes: int = 10) -> list[int]:
    """``--labels 0,1,2`` → [0, 1, 2]; None → 0..num_classes−1 repeated to ``num``."""
    if isinstance(labels, str):
        try:
            labels = [int(v) for v in labels.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--labels must be comma-separated integers, e.g. 0,1,2, got {labels!r}") from None
    return list(labels) if labels else [i % num_classes for i in range(num)]


def save_samples(images: np.ndarray, out: str | os.PathLike, trajectory: np.ndarray | None = None,
                 npz: bool = False) -> list[pathlib.Path]:
    """``out`` ending in ``.npz`` writes only the arrays; otherwise a PNG grid, plus ``<out>.npz`` with ``npz``.

    The .npz holds ``images`` (uint8 [N, H, W, C], 0..255; what FID tools read) and, with a trajectory,
    ``trajectory`` (uint8 [S+1, b, H, W, C]); a trajectory is also drawn as ``<out stem>_trajectory.png``.
    """
    out_path = pathlib.Path(out)
    written = []
    if out_path.suffix.lower() != ".npz":
        written.append(plotting.save_image_grid(images, out_path))
    if npz or out_path.suffix.lower() == ".npz":
        npz_path = out_path.with_suffix(".npz")
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"images": plotting.to_uint8(images)}
        if trajectory is not None:
            arrays["trajectory"] = plotting.to_uint8(trajectory)
        np.savez(npz_path, **arrays)
        written.append(npz_path)
    if trajectory is not None:
        written.append(plotting.save_trajectory_strip(trajectory, out_path.with_name(f"{out_path.stem}_trajectory.png")))
    return written


def sample_to_files(model: DiffusionModel, out: str | os.PathLike, *, num: int = 64, sampler: str | None = None,
                    steps: int | None = None, eta: float | None = None, seed: int = 0, npz: bool = False,
                    trajectory: bool = False, batch_size: int = 64, labels: str | Sequence[int] | None = None,
                    guidance_scale: float | None = None, progress: bool = False) -> list[pathlib.Path]:
    """Samples ``model`` and writes the files (:func:`save_samples`); returns their paths.

    A class-conditional model samples ``labels`` (default 0..9 repeated to ``num``) with classifier-free
    guidance ``guidance_scale`` (default the model's); a text-conditional one is sampled by ``txt2img``.
    """
    if model.kind == "text":
        raise ValueError("this is a text-to-image model: use `ddpm-jax txt2img --workdir <workdir> \"a prompt\"`")
    if model.kind == "class":
        result = generate(model, labels=parse_labels(labels, num), guidance_scale=guidance_scale, steps=steps,
                          eta=eta, seed=seed, return_latents=trajectory, sampler=sampler)
        images, traj = result["images"], result.get("trajectory")
    else:
        if labels or guidance_scale is not None:
            raise ValueError("--labels/--guidance are for class-conditional runs; this model is unconditional")
        images, traj = sample_images(model, num, sampler=sampler, steps=steps, eta=eta, seed=seed,
                                     trajectory=trajectory, batch_size=batch_size, progress=progress)
    return save_samples(images, out, traj, npz)
