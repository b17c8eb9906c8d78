"""The ``ddpm-jax`` command: train, sample, and the two-minute-to-read demo.

::

    ddpm-jax train  --config experiments/mnist.py --workdir runs/mnist [train.num_steps=100 ...]
    ddpm-jax sample --workdir runs/mnist --num 64 --sampler ddim --steps 50 --eta 0 --seed 0 \\
                    --out samples.png [--npz] [--trajectory]
    ddpm-jax demo   --workdir runs/mnist            # what `make demo` runs (ends with `eval`)
    ddpm-jax eval   --workdir runs/mnist [--num-samples 1000 --bpd-examples 100 \
                    --inception pt_inception-2015-12-05-6726825d.pth --reference stats.npz]
    ddpm-jax sample --pretrained ddpm-cifar10-32 --num 64   # a diffusers folder (google/ddpm-*)
    ddpm-jax eval   --pretrained ddpm-cifar10-32 --data tfds:cifar10:test ...

The argument parsing here is thin; the work is done by :func:`run_train`, :func:`sample_from_workdir`,
:func:`run_eval` and :func:`run_demo`, which notebooks can import and call.

Errors caused by the input (an unknown config key, a bad override value, a missing workdir or
checkpoint, a dataset that is not available offline, an empty image folder, a batch that does not split
over the devices) end the command with one line, ``ddpm-jax: error: <message>``, and exit status 2;
a non-finite training loss ends it with exit status 1. Set ``DDPM_JAX_TRACEBACK=1`` to get the full
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["main", "build_parser", "run_train", "sample_from_workdir", "run_sample", "run_demo", "run_eval",
           "run_train_vae", "LoadedModel", "load_workdir_model", "load_pretrained_model", "sample_images", "sample_from_pretrained"]

PROG = "ddpm-jax"
DEFAULT_CONFIG = "experiments/mnist.py"


# ---------------------------------------------------------------------------------------------
# The work (importable)
# ---------------------------------------------------------------------------------------------


def load_config_with_overrides(config_path: str, overrides: Sequence[str] = ()) -> Any:
    """``config.load_config(config_path)`` with ``group.field=value`` overrides applied."""
    from ddpm_jax import config as config_lib

    return config_lib.apply_overrides(config_lib.load_config(config_path), overrides)


def run_train(config_path: str, workdir: str, overrides: Sequence[str] = ()) -> Any:
    """Trains (or resumes) ``config_path`` with ``overrides`` in ``workdir``; returns the final state."""
    from ddpm_jax import training

    config = load_config_with_overrides(config_path, overrides)
    return training.train(config, workdir)


def sample_from_workdir(
    workdir: str,
    num: int = 64,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    trajectory: bool = False,
    batch_size: int = 64,
    ema: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples ``num`` images from the latest checkpoint in ``workdir`` (EMA parameters by default).

    ``sampler``/``steps``/``eta`` default to the workdir's ``config.sample``. Images are generated in
    chunks of ``batch_size``; chunk i uses ``fold_in(key(seed), i)``, so the same seed and batch size
    give the same images. Returns (x_0 [num, H, W, C] in [-1, 1], trajectory [S+1, b, H, W, C] of the
    first chunk or None).

    Raises:
      FileNotFoundError: no workdir, no config.json in it, or no checkpoint.
      ValueError: an unknown sampler or bad steps/eta.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"--num and --batch-size must be >= 1, got {num} and {batch_size}")
    model = load_workdir_model(workdir, ema=ema)
    return sample_images(model, num, sampler=sampler, steps=steps, eta=eta, seed=seed, trajectory=trajectory,
                         batch_size=batch_size)


@dataclasses.dataclass
class LoadedModel:
    """A trained model ready to sample from and to evaluate: from a workdir or a diffusers folder."""

    eps_fn: Any              # eps_fn(x_t [B, H, W, C], t int32 [B]) -> model output (closes over params)
    schedule: Any            # schedules.Schedule
    image_size: int
    channels: int
    prediction: str = "eps"
    variance: str = "fixed_small"
    clip_denoised: bool = True
    sampler: str = "ddpm"    # the defaults of `sample`/`eval`
    steps: int = 1000
    eta: float = 1.0
    data: Any = None         # the training data's config.data (workdirs), else None
    description: str = ""
    decode: Any = None       # x_0 (latents) -> images for a latent model, else None
    workdir_model: Any = None  # the pipelines.WorkdirModel of a workdir (conditional generation), else None


def load_workdir_model(workdir: str, ema: bool = True) -> LoadedModel:
    """The latest checkpoint of ``workdir`` (EMA parameters by default, ``pipelines.load_workdir_model``).

    ``eps_fn`` is the unconditional model: for a class- or text-conditional run, ε(x_t, ∅) with the null
    condition it was trained with (classifier-free guidance's unconditional branch); conditional samples
    come from ``pipelines.generate`` (``workdir_model``). For a latent run, samples are latents and
    ``decode`` turns them into images.
    """
    from ddpm_jax import checkpoints, guidance, pipelines, training

    m = pipelines.load_workdir_model(workdir, ema=ema)
    if m.null_condition:
        null = training.model_condition({k: v[None] for k, v in m.null_condition.items()})
        eps_fn = lambda x_t, t: guidance.unet_model_fn(m.unet, m.params)(x_t, t, null)   # ∅ broadcast over B
    else:
        eps_fn = training.make_eps_fn(m.unet, m.params)
    config = m.config
    h, _, c = m.x0_shape
    step = checkpoints.latest_step(workdir)
    return LoadedModel(
        eps_fn=eps_fn, schedule=m.schedule, image_size=h, channels=c,
        prediction=config.diffusion.get("prediction", "eps"), variance=config.diffusion.variance,
        clip_denoised=m.codec is None,
        sampler=config.sample.sampler, steps=config.sample.steps, eta=config.sample.eta, data=config.data,
        description=f"workdir {workdir} (step {step}, {'EMA' if ema else 'raw'} parameters)",
        decode=None if m.codec is None else (lambda z: np.asarray(m.codec.decode(z))), workdir_model=m)


def sample_images(
    model: LoadedModel,
    num: int,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    trajectory: bool = False,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``num`` samples of ``model`` (see :func:`sample_from_workdir`; sampler/steps/eta default to the model's).

    On several devices (one process) each chunk is split over them along the "data" axis when its size
    divides evenly (``batch_size`` a multiple of the device count), so 8 GPUs sample 8× as fast; the
    images are the same as on one device (the noise depends only on the key, not on the devices).
    """
    import jax

    from ddpm_jax import parallel, samplers

    if num < 1 or batch_size < 1:
        raise ValueError(f"--num and --batch-size must be >= 1, got {num} and {batch_size}")
    sampler = sampler or model.sampler
    steps = model.steps if steps is None else steps
    eta = model.eta if eta is None else eta
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"--sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    chunk = min(batch_size, num)
    shape = (chunk, model.image_size, model.image_size, model.channels)

    def run(key: jax.Array, return_trajectory: bool) -> Any:
        return samplers.sample(model.eps_fn, model.schedule, shape, key, sampler=sampler, num_steps=steps, eta=eta,
                               prediction=model.prediction, variance=model.variance,
                               clip_denoised=model.clip_denoised, return_trajectory=return_trajectory)

    key = jax.random.key(seed)
    jitted = jax.jit(run, static_argnums=1)  # compiled once per (chunk shape, trajectory flag)
    if jax.process_count() == 1 and jax.device_count() > 1 and chunk % jax.device_count() == 0:
        # x_0 sharded along "data": XLA's sharding propagation then splits the whole chain over the devices
        sharded = jax.jit(lambda k: run(k, False), out_shardings=parallel.batch_sharding(parallel.make_mesh()))
    else:
        sharded = None
    images, traj = [], None
    chunks = range((num + chunk - 1) // chunk)  # the last chunk is sampled whole, then trimmed
    if progress:
        import tqdm

        chunks = tqdm.tqdm(chunks, desc=f"sampling {num} images ({sampler}, "
                           f"{steps if sampler == 'ddim' else model.schedule.num_timesteps} steps)",
                           unit="batch", dynamic_ncols=True)
    for i in chunks:
        want_traj = trajectory and i == 0
        k = jax.random.fold_in(key, i)
        out = sharded(k) if sharded is not None and not want_traj else jitted(k, want_traj)
        if want_traj:
            out, traj = out
            traj = np.asarray(traj)
        images.append(np.asarray(out) if model.decode is None else model.decode(out))
    return np.concatenate(images)[:num], traj


# ---------------------------------------------------------------------------------------------
# Official checkpoints: a diffusers UNet2DModel folder + DDPMScheduler config
# ---------------------------------------------------------------------------------------------

def load_pretrained_model(folder: str | os.PathLike) -> LoadedModel:
    """A diffusers UNet2DModel with the schedule of its ``scheduler_config.json`` (``pretrained.diffusers.load_ddpm_folder``).

    From the DDPMScheduler config: β's (``beta_schedule``, ``beta_start``/``beta_end``,
    ``num_train_timesteps``, ``trained_betas``; diffusers' "linear" is not rescaled with T),
    ``prediction_type``, ``variance_type`` (fixed_small/fixed_large) and ``clip_sample``. The default
    sampler is the paper's: 1000-step ancestral sampling (Algorithm 2).
    """
    from ddpm_jax import schedulers
    from ddpm_jax.pretrained import diffusers as diffusers_weights

    module, params, sched = diffusers_weights.load_ddpm_folder(folder)
    config = schedulers.SchedulerConfig.from_config(sched)
    variance = diffusers_weights.DDPM_VARIANCES[sched.get("variance_type", "fixed_small")]
    unet_config = module.config
    return LoadedModel(
        eps_fn=lambda x_t, t: module.apply({"params": params}, x_t, t),
        schedule=config.schedule(), image_size=int(unet_config.sample_size), channels=int(unet_config.in_channels),
        prediction=config.prediction, variance=variance,
        clip_denoised=bool(sched.get("clip_sample", True)), sampler="ddpm",
        steps=int(config.num_train_timesteps), eta=1.0, description=f"pretrained {folder}")


def sample_from_pretrained(folder: str, num: int = 64, **kwargs: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``num`` samples from a diffusers folder (:func:`load_pretrained_model`); kwargs as :func:`sample_images`."""
    return sample_images(load_pretrained_model(folder), num, **kwargs)


def run_sample(
    workdir: str | None,
    out: str | None = None,
    *,
    num: int = 64,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    npz: bool = False,
    trajectory: bool = False,
    batch_size: int = 64,
    pretrained: str | None = None,
    labels: str | Sequence[int] | None = None,
    guidance: float | None = None,
) -> list[pathlib.Path]:
    """Samples (see :func:`sample_from_workdir`) and writes the files; returns their paths.

    A class-conditional workdir samples ``labels`` (default 0..9 repeated to ``num``) with classifier-free
    guidance ``guidance`` (default the config's); a text-conditional one is sampled by ``ddpm-jax txt2img``.

    ``out`` ending in ``.npz`` writes only the arrays; otherwise a PNG grid, plus ``<out>.npz`` with
    ``npz``. The .npz holds ``images`` (uint8 [N, H, W, C], 0..255; what FID tools read) and, with
    ``trajectory``, ``trajectory`` (uint8 [S+1, b, H, W, C]). ``trajectory`` also writes a PNG strip
    ``<out stem>_trajectory.png``. ``out`` defaults to ``<workdir>/samples.png``.

    ``pretrained`` (instead of ``workdir``): a diffusers UNet2DModel folder (google/ddpm-cifar10-32
    style, see :func:`load_pretrained_model`), sampled by default as the paper does (1000 ancestral
    steps); ``out`` then defaults to ``samples_<folder name>.png`` in the current directory.
    """
    from ddpm_jax import plotting

    if pretrained is not None:
        model = load_pretrained_model(pretrained)
        default_out = pathlib.Path(f"samples_{pathlib.Path(pretrained).resolve().name}.png")
    elif workdir is not None:
        model = load_workdir_model(workdir)
        default_out = pathlib.Path(workdir) / "samples.png"
    else:
        raise ValueError("give --workdir (a trained run) or --pretrained (a diffusers model folder)")
    kind = model.workdir_model.kind if model.workdir_model is not None else "none"
    if kind == "text":
        raise ValueError(f"{workdir} is a text-to-image run: use `{PROG} txt2img --workdir {workdir} \"a prompt\"`")
    if kind == "class":
        from ddpm_jax import pipelines

        if isinstance(labels, str):
            try:
                labels = [int(v) for v in labels.split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"--labels must be comma-separated integers, e.g. 0,1,2, got {labels!r}") from None
        labels = list(labels) if labels else [i % 10 for i in range(num)]
        result = pipelines.generate(model.workdir_model, labels=labels, guidance_scale=guidance, steps=steps, eta=eta,
                                    seed=seed, return_latents=trajectory)
        images, traj = result["images"], result.get("trajectory")
    else:
        if labels or guidance is not None:
            raise ValueError("--labels/--guidance are for class-conditional runs; this model is unconditional")
        images, traj = sample_images(model, num, sampler=sampler, steps=steps, eta=eta, seed=seed,
                                     trajectory=trajectory, batch_size=batch_size, progress=pretrained is not None)
    out_path = pathlib.Path(out) if out else default_out
    written = []
    if out_path.suffix.lower() != ".npz":
        written.append(plotting.save_image_grid(images, out_path))
    if npz or out_path.suffix.lower() == ".npz":
        npz_path = out_path.with_suffix(".npz")
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"images": plotting.to_uint8(images)}
        if traj is not None:
            arrays["trajectory"] = plotting.to_uint8(traj)
        np.savez(npz_path, **arrays)
        written.append(npz_path)
    if traj is not None:
        strip = out_path.with_name(f"{out_path.stem}_trajectory.png")
        written.append(plotting.save_trajectory_strip(traj, strip))
    return written


# ---------------------------------------------------------------------------------------------
# Evaluation: bits/dim, the offline MNIST judge, FID/IS
# ---------------------------------------------------------------------------------------------

# The MNIST demo's evaluation (run_demo): a few tens of seconds on 2 CPU cores (measured, see the report).
DEMO_EVAL_SAMPLES = 128
DEMO_BPD_EXAMPLES = 8


def _is_digits(data_name: str | None) -> bool:
    """MNIST digits (the bundled 5,000 or tfds' mnist): the runs the offline judge can judge."""
    if not data_name:
        return False
    return data_name == "mnist_bundled" or (data_name.startswith("tfds:") and data_name.split(":")[1] == "mnist")


def _bpd_data(model: LoadedModel, data_name: str, num: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """``num`` images for bits/dim and a description of which (held-out where the dataset has a test split)."""
    from ddpm_jax import data as data_lib

    data_dir = model.data.get("data_dir") if model.data is not None else None
    if data_name == "mnist_bundled":
        from ddpm_jax.evaluation import judge as judge_lib

        _, (test_x, _) = judge_lib.split_digits(model.image_size, 0)
        pick = np.random.default_rng(seed).permutation(test_x.shape[0])[:num]
        return test_x[pick], {"dataset": "mnist_bundled", "split": "judge test split (1,000 digits, 100 per class)",
                              "note": "the DDPM trained on all 5,000 bundled digits: these are not held out from it"}
    spec = {"image_size": model.image_size, "channels": model.channels, "data_dir": data_dir, "num_examples": num}
    if data_name.startswith("tfds:") and data_name.count(":") == 1:  # no split named: the test split
        try:
            images = data_lib.load_dataset_with_labels(dict(spec, name=f"{data_name}:test")).images
            return images, {"dataset": data_name, "split": "test", "note": "held out (the paper's NLL Test)"}
        except (FileNotFoundError, ValueError):
            note = "the test split is not available here: training images (the paper's NLL Train)"
            return data_lib.load_dataset_with_labels(dict(spec, name=data_name)).images, {
                "dataset": data_name, "split": "train", "note": note}
    split = data_name.split(":")[2] if data_name.startswith("tfds:") and data_name.count(":") >= 2 else "train"
    images = data_lib.load_dataset_with_labels(dict(spec, name=data_name)).images
    return images, {"dataset": data_name, "split": split, "note": "as named"}


def run_eval(
    workdir: str | None = None,
    *,
    pretrained: str | None = None,
    outdir: str | None = None,
    num_samples: int | None = None,
    bpd_examples: int = 100,
    bpd_batch_size: int = 64,
    data: str | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    judge: bool | None = None,
    inception: str | None = None,
    reference: str | None = None,
    progress: bool = True,
    sweep_per_class: int = 20,
) -> dict[str, Any]:
    """Evaluates a trained workdir (latest checkpoint, EMA) or a diffusers folder; writes ``eval.json``.

    1. **Samples**: ``num_samples`` (default 1,000; 50,000 with ``inception``, the paper's protocol)
       with the model's sampler (``sampler``/``steps``/``eta`` override it), chunks of ``batch_size``.
    2. **Bits/dim**: the full variational bound (Eq. 5, all T terms, ``evaluation.likelihood``) on
       ``bpd_examples`` images (0 skips it) of ``data`` (default: the run's dataset; its test split for
       tfds datasets; the judge's test split for the bundled digits). Mean ± standard error.
    3. **Judge** (MNIST digits with 1 channel; ``judge`` forces it on/off): the offline judge's report
       and classifier FID (``evaluation.judge``, a proxy, not FID).
    3b. **Guidance sweep** of a class- or text-conditional MNIST run (``evaluation.conditional``):
       ``sweep_per_class`` samples per digit at w = 0, 1, 2, 3, 5, judged: accuracy on the intended
       digit and classifier FID (guidance_sweep.json/.png). The unconditional samples above use ∅.
    4. **FID/IS** when ``inception`` (the Inception weights file) is given: against ``reference``
       (precomputed statistics .npz, or a dataset name; default the run's training set).

    Writes into ``outdir`` (default: the workdir, or ``eval_<folder name>`` for a pretrained folder):
    ``eval.json`` (every number and its protocol), ``eval_samples.png`` (with the judge's predicted
    labels when judged) and ``eval_vlb_terms.png``. Returns the dict written to ``eval.json``.
    """
    import json
    import time

    import jax

    from ddpm_jax import plotting
    from ddpm_jax.evaluation import likelihood

    if pretrained is not None:
        model = load_pretrained_model(pretrained)
        out = pathlib.Path(outdir or f"eval_{pathlib.Path(pretrained).resolve().name}")
    elif workdir is not None:
        model = load_workdir_model(workdir)
        out = pathlib.Path(outdir or workdir)
    else:
        raise ValueError("give --workdir (a trained run) or --pretrained (a diffusers model folder)")
    if bpd_examples < 0 or (num_samples is not None and num_samples < 2):
        raise ValueError(f"--num-samples must be >= 2 and --bpd-examples >= 0, got {num_samples} and {bpd_examples}")
    data_name = data or (model.data.get("name") if model.data is not None else None)
    kind = model.workdir_model.kind if model.workdir_model is not None else "none"
    if judge is None:  # MNIST digits: the bundled/tfds ones, or the captioned digits of a text model
        judge = (model.channels == 1 or model.decode is not None) and (_is_digits(data_name) or kind == "text")
    num_samples = num_samples or (50_000 if inception else 1_000)
    inception_net = None
    if inception:  # before the long sampling run: a missing weights file or reference fails now
        from ddpm_jax.evaluation import inception as inception_lib

        if not (reference or data_name):
            raise ValueError("FID needs a reference: pass --reference stats.npz or a dataset (e.g. tfds:cifar10)")
        inception_net = inception_lib.load_inception(inception)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": model.description, "image_size": model.image_size, "channels": model.channels,
                              "devices": jax.device_count()}

    def say(line: str) -> None:
        if progress:
            print(line, flush=True)

    # 1. samples
    sampler = sampler or model.sampler
    start = time.perf_counter()
    samples, _ = sample_images(model, num_samples, sampler=sampler, steps=steps, eta=eta, seed=seed,
                               batch_size=batch_size, progress=progress)
    result["samples"] = {
        "num": num_samples, "sampler": sampler,
        "steps": (model.steps if steps is None else steps) if sampler == "ddim" else model.schedule.num_timesteps,
        "eta": (model.eta if eta is None else eta) if sampler == "ddim" else None, "seed": seed,
        "seconds": round(time.perf_counter() - start, 2)}
    say(f"samples: {num_samples} from {model.description}, sampler {sampler} "
        f"({result['samples']['steps']} steps), seed {seed}")

    # 2. bits/dim
    if bpd_examples and model.decode is not None:
        say("bits/dim: skipped (a latent model's bound is over latents, not pixels)")
    elif bpd_examples and data_name:
        start = time.perf_counter()
        images, where = _bpd_data(model, data_name, bpd_examples, seed)
        n_dev = jax.device_count()
        batch = -(-min(bpd_batch_size, images.shape[0]) // n_dev) * n_dev  # a multiple of the device count
        res = likelihood.dataset_bpd(model.eps_fn, model.schedule, images, jax.random.key(seed), batch,
                                     prediction=model.prediction, variance=model.variance,
                                     clip_denoised=model.clip_denoised, progress=progress)
        result["bits_per_dim"] = {
            "value": res.bpd, "std_error": res.std_error, "prior_L_T": res.prior, "decoder_L_0": float(res.terms[0]),
            "num_examples": res.num_examples, **where, "seconds": round(time.perf_counter() - start, 2),
            "protocol": (f"variational bound of Ho et al. Eq. 5, all {model.schedule.num_timesteps} terms + L_T, "
                         f"one x_t per term and image, discretized decoder for L_0, on {res.num_examples} "
                         f"images ({where['dataset']}, {where['split']}); mean ± standard error")}
        result["bits_per_dim_terms"] = [float(v) for v in res.terms]
        likelihood.plot_vlb_terms(res.terms, str(out / "eval_vlb_terms.png"))
        say(f"bits/dim: {res.bpd:.4f} ± {res.std_error:.4f} (on {res.num_examples} images, {where['dataset']} "
            f"{where['split']}; {where['note']})")
    elif bpd_examples:
        say("bits/dim: skipped (no dataset: pass --data, e.g. tfds:cifar10:test)")

    # 3. the offline judge
    predicted = None
    if judge:
        from ddpm_jax.evaluation import judge as judge_lib

        start = time.perf_counter()
        report = judge_lib.judge_report(samples, judge_lib.get_judge(samples.shape[1], progress=progress))
        predicted = np.asarray(report.pop("predicted"))
        report["seconds"] = round(time.perf_counter() - start, 2)
        result["judge"] = report
        say(judge_lib.format_report(report))

    # 3b. a conditional model: does it follow its condition? (the judged guidance sweep)
    if judge and kind in ("class", "text"):
        from ddpm_jax.evaluation import conditional

        sweep = conditional.guidance_sweep(model.workdir_model, per_class=sweep_per_class, seed=seed, steps=steps,
                                           progress=progress)
        conditional.save_sweep(sweep, out)
        result["guidance_sweep"] = {k: v for k, v in sweep.items() if k != "samples"}
        say("guidance sweep (judged as the intended digit; classifier FID): " + ", ".join(
            f"w={r['guidance']:g}: {r['accuracy']:.1%}, {r['classifier_fid']:.1f}" for r in sweep["rows"]))

    # 4. FID / IS with user-supplied Inception weights
    if inception:
        result.update(_fid_and_is(samples, model, inception_net, reference or data_name, say))

    if predicted is not None:
        from ddpm_jax.evaluation import judge as judge_lib

        judge_lib.save_labelled_grid(samples, predicted, out / "eval_samples.png")
    else:
        plotting.save_image_grid(samples[:64], out / "eval_samples.png")
    path = out / "eval.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {path}")
    return result


def _fid_and_is(samples: np.ndarray, model: LoadedModel, net: Any, reference: str, say: Any) -> dict[str, Any]:
    """FID against ``reference`` (.npz statistics or a dataset name) and the Inception score of ``samples``.

    With fewer samples than the 2,048 features the FID is still computed (a biased quick check, said in
    the output); the paper's protocol is 50,000 samples against the training set.
    """
    from ddpm_jax.evaluation import fid as fid_lib
    from ddpm_jax.evaluation import inception as inception_lib

    name = str(reference)
    if not name.endswith(".npz"):
        from ddpm_jax import data as data_lib

        data_dir = model.data.get("data_dir") if model.data is not None else None
        reference = data_lib.load_dataset_with_labels({"name": name, "image_size": model.image_size,
                                                       "channels": model.channels, "data_dir": data_dir}).images
        name = f"{name} ({reference.shape[0]} images)"
    n = samples.shape[0]
    res = fid_lib.compute_fid(samples, reference, inception=net, reference_name=name,
                              min_samples=min(inception_lib.NUM_FEATURES, n), is_splits=10 if n >= 10 else None)
    biased = " (biased: fewer samples than the 2,048 features)" if n < inception_lib.NUM_FEATURES else ""
    out: dict[str, Any] = {"fid": {"value": float(res["fid"]), "protocol": res["protocol"].to_dict(),
                                   "note": biased.strip(" ()") or "as the protocol"}}
    say(f"FID {res['fid']:.3f}{biased}  [{res['protocol']}]")
    if "is" in res:
        out["inception_score"] = {"mean": float(res["is"]), "std": float(res["is_std"]), "splits": 10}
        say(f"Inception score {res['is']:.3f} ± {res['is_std']:.3f} (10 splits of {n} samples)")
    return out


def run_demo(
    workdir: str, config_path: str = DEFAULT_CONFIG, overrides: Sequence[str] = (), num: int = 64,
    evaluate: bool = True,
) -> list[pathlib.Path]:
    """``make demo``: forward-process figure, training, 64 samples, a trajectory strip and the evaluation.

    Writes into ``workdir``: forward_process.png (the data under q(x_t | x_0)), the training outputs
    (checkpoints/, metrics.jsonl, loss.png, samples/), samples.png and samples_trajectory.png, and
    (``evaluate``) eval.json with bits/dim and the offline judge's classifier FID (:func:`run_eval` with
    ``DEMO_EVAL_SAMPLES`` samples and ``DEMO_BPD_EXAMPLES`` digits), eval_samples.png, eval_vlb_terms.png.
    Returns the paths of the figures, and prints them. Re-running resumes (or skips) training.
    """
    from ddpm_jax import data, plotting, training
    from ddpm_jax.schedules import get_schedule

    config = load_config_with_overrides(config_path, overrides)
    work = pathlib.Path(workdir)
    images = data.load_dataset(config.data)
    schedule = get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    examples = data.get_batch(images, 0, 4, config.train.seed)  # 4 digits of the first batch
    written = [plotting.plot_forward_process(examples, schedule, work / "forward_process.png")]
    print(f"forward process figure: {written[0]}", flush=True)

    training.train(config, workdir, images=images)

    written += run_sample(workdir, str(work / "samples.png"), num=num, seed=config.train.seed,
                          trajectory=True)
    if evaluate:  # classifier FID (offline judge) and bits/dim, into eval.json (~1 min on 2 cores)
        run_eval(workdir, num_samples=DEMO_EVAL_SAMPLES, bpd_examples=DEMO_BPD_EXAMPLES, seed=config.train.seed)
        written += [work / "eval.json", work / "eval_samples.png"]
    metrics = work / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        written.append(plotting.plot_loss_curve(metrics, work / "loss.png"))
    print("\nDemo finished. Files written:")
    for path in written:
        print(f"  {path}")
    print(f"  {work / 'checkpoints'}  (model; sample more: {PROG} sample --workdir {workdir})")
    return written


def run_train_clip(config_path: str, workdir: str, overrides: Sequence[str] = ()) -> Any:
    """Trains (or resumes) a CLIP (``clip_training.train``) and writes eval.json; returns the final state."""
    from ddpm_jax import clip_training

    config = load_config_with_overrides(config_path, overrides)
    return clip_training.train(config, workdir)


def run_train_vae(config_path: str, workdir: str, overrides: Sequence[str] = ()) -> Any:
    """Trains (or resumes) an autoencoder (``vae_training.train``: the Gaussian VAE or AutoencoderKL, by
    ``config.model.kind``) and writes eval.json; returns the final state."""
    from ddpm_jax import vae_training

    config = load_config_with_overrides(config_path, overrides)
    return vae_training.train(config, workdir)


def read_captions(captions: str, seed: int = 0) -> list[str]:
    """``"mnist_bundled"``: the captioned digits' captions (``data.load_captioned_digits``); otherwise a
    text file with one caption per line (blank lines skipped)."""
    if captions == "mnist_bundled":
        from ddpm_jax import data

        return data.load_captioned_digits(image_size=28, seed=seed).captions
    path = pathlib.Path(captions)
    if not path.is_file():
        raise FileNotFoundError(f"--captions {captions!r} is neither 'mnist_bundled' nor a text file "
                                f"(one caption per line)")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_train_tokenizer(captions: str, out: str, vocab_size: int = 1000, seed: int = 0) -> pathlib.Path:
    """Fits a CLIP-style BPE on the captions and saves vocab.json + merges.txt in ``out``."""
    from ddpm_jax import tokenizer

    texts = read_captions(captions, seed)
    tok = tokenizer.train_tokenizer(texts, out, vocab_size=vocab_size)
    print(f"{len(texts)} captions -> {tok.vocab_size} tokens ({len(tok.merges)} merges) in {out}")
    return pathlib.Path(out)


# ---------------------------------------------------------------------------------------------
# Stable Diffusion: txt2img / img2img with a diffusers folder or a single-file checkpoint
# ---------------------------------------------------------------------------------------------


def _load_stable_diffusion(model: str, scheduler: str | None, dtype: str, tokenizer: str | None):
    from ddpm_jax.stable_diffusion import StableDiffusion

    print(f"loading {model} ({dtype}) ...", file=sys.stderr)
    return StableDiffusion.from_pretrained(model, dtype=dtype, scheduler=scheduler, tokenizer=tokenizer)


def run_txt2img(model: str, prompts: Sequence[str], out: str = "txt2img.png", steps: int = 50,
                guidance: float = 7.5, seed: int = 0, negative: Sequence[str] | None = None,
                scheduler: str | None = None, height: int = 512, width: int = 512, dtype: str = "float32",
                attention_maps: bool = False, tokenizer: str | None = None) -> list[pathlib.Path]:
    """``ddpm-jax txt2img --model``: one image per prompt (a PNG grid) from Stable Diffusion weights; the
    denoising loop is one compiled program, its tqdm bar fed by ``jax.debug.callback`` from inside the scan.
    With ``attention_maps`` also ``<out stem>_attention_<i>.png`` (per-token cross-attention)."""
    from ddpm_jax import pipelines, plotting

    pipe = _load_stable_diffusion(model, scheduler, dtype, tokenizer)
    result = pipe.txt2img(list(prompts), negative_prompts=negative or None, guidance_scale=guidance,
                          num_steps=steps, height=height, width=width, seed=seed, return_attention=attention_maps,
                          progress=True)
    out_path = pathlib.Path(out)
    written = [plotting.save_image_grid(result["images"], out_path, min_tile=1)]
    if attention_maps:
        for i, tokens in enumerate(result["tokens"]):
            path = out_path.with_name(f"{out_path.stem}_attention_{i}.png")
            written.append(pipelines.save_attention_overlays(
                result["images"][i:i + 1], result["attention"][i:i + 1, :, :, :len(tokens)], tokens, path))
    return written


def read_image(path: str, height: int | None = None, width: int | None = None) -> np.ndarray:
    """A PNG/JPEG → [1, H, W, 3] float32 in [−1, 1], resized (bicubic) to height × width if given."""
    from PIL import Image

    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    with Image.open(path) as im:
        im = im.convert("RGB")
        if height and width:
            im = im.resize((width, height), Image.BICUBIC)
        pixels = np.asarray(im, np.float32)
    return (pixels / 127.5 - 1.0)[None]


def run_img2img(model: str, image: str, prompts: Sequence[str], out: str = "img2img.png", strength: float = 0.75,
                steps: int = 50, guidance: float = 7.5, seed: int = 0, negative: Sequence[str] | None = None,
                scheduler: str | None = "ddim", height: int | None = None, width: int | None = None,
                dtype: str = "float32", tokenizer: str | None = None) -> list[pathlib.Path]:
    """``ddpm-jax img2img``: SDEdit — encode the image, noise it to ``strength``, denoise with the prompt."""
    from ddpm_jax import plotting

    pipe = _load_stable_diffusion(model, scheduler, dtype, tokenizer)
    pixels = read_image(image, height, width)
    prompts = list(prompts)
    result = pipe.img2img(np.repeat(pixels, len(prompts), axis=0), prompts, strength=strength,
                          negative_prompts=negative or None, guidance_scale=guidance, num_steps=steps, seed=seed,
                          progress=True)
    return [plotting.save_image_grid(result["images"], out, min_tile=1)]


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``ddpm-jax`` argument parser (sub-commands train, sample, demo)."""
    parser = argparse.ArgumentParser(prog=PROG, description="DDPM in JAX: train, sample, demo.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,demo}")

    p = sub.add_parser("train", help="train (or resume) a model", description=run_train.__doc__)
    p.add_argument("--config", required=True, help="experiment file with get_config(), e.g. experiments/mnist.py")
    p.add_argument("--workdir", required=True, help="where checkpoints, metrics and samples go")
    p.add_argument("overrides", nargs="*", metavar="group.field=value", help="e.g. train.num_steps=100")

    p = sub.add_parser("sample", help="sample from a trained workdir or a diffusers folder",
                       description=run_sample.__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run trained by ddpm-jax train")
    source.add_argument("--pretrained", metavar="FOLDER",
                        help="a diffusers UNet2DModel + scheduler folder, e.g. a copy of google/ddpm-cifar10-32")
    p.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: the workdir's config")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the workdir's config)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta, 0 = deterministic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG grid or .npz (default <workdir>/samples.png)")
    p.add_argument("--npz", action="store_true", help="also write the images as <out>.npz")
    p.add_argument("--trajectory", action="store_true", help="also write a strip of x_t along the chain")
    p.add_argument("--batch-size", type=int, default=64, help="images per compiled sampling call")
    p.add_argument("--labels", default=None, help="class-conditional runs: comma-separated labels, e.g. 0,1,2 "
                   "(default: 0..9 repeated to --num)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale w (default: config)")

    p = sub.add_parser("demo", help="the `make demo` run: figures, training, samples",
                       description=run_demo.__doc__)
    p.add_argument("--workdir", default="runs/mnist")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("overrides", nargs="*", metavar="group.field=value")

    p = sub.add_parser("eval", help="bits/dim, the offline MNIST judge, FID/IS of a workdir or diffusers folder",
                       description=run_eval.__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run trained by ddpm-jax train (latest checkpoint, EMA)")
    source.add_argument("--pretrained", metavar="FOLDER", help="a diffusers UNet2DModel + scheduler folder")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples to judge (default 1,000; 50,000 with --inception)")
    p.add_argument("--bpd-examples", type=int, default=100, help="images for bits/dim (default 100; 0 skips)")
    p.add_argument("--bpd-batch-size", type=int, default=64)
    p.add_argument("--data", default=None,
                   help="dataset for bits/dim, e.g. tfds:cifar10:test (default: the run's; its test split)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: the model's")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per compiled sampling call")
    p.add_argument("--judge", action=argparse.BooleanOptionalAction, default=None,
                   help="run the offline MNIST judge (default: for 1-channel MNIST runs)")
    p.add_argument("--inception", default=None, metavar="PATH", help="Inception weights for FID/IS")
    p.add_argument("--reference", default=None,
                   help="FID reference: statistics .npz or a dataset name (default: the run's training set)")
    p.add_argument("--outdir", default=None,
                   help="where eval.json and the figures go (default: the workdir, or ./eval_<folder name>)")
    p.add_argument("--sweep-per-class", type=int, default=20,
                   help="conditional runs: samples per digit at each guidance scale of the sweep (default 20)")

    p = sub.add_parser("train-clip", help="train (or resume) a CLIP on captioned digits",
                       description=run_train_clip.__doc__)
    p.add_argument("--config", required=True, help="e.g. experiments/clip_mnist.py")
    p.add_argument("--workdir", required=True, help="where checkpoints, tokenizer/, metrics and eval.json go")
    p.add_argument("overrides", nargs="*", metavar="group.field=value", help="e.g. train.num_steps=100")

    p = sub.add_parser("train-vae", help="train (or resume) a Gaussian VAE or an AutoencoderKL",
                       description=run_train_vae.__doc__)
    p.add_argument("--config", required=True, help="e.g. experiments/vae_mnist.py or experiments/autoencoder_kl_mnist.py")
    p.add_argument("--workdir", required=True, help="where checkpoints, metrics, figures and eval.json go")
    p.add_argument("overrides", nargs="*", metavar="group.field=value", help="e.g. model.latent_dim=2")

    p = sub.add_parser("train-tokenizer", help="fit a CLIP-style BPE on captions",
                       description=run_train_tokenizer.__doc__)
    p.add_argument("--captions", default="mnist_bundled",
                   help="'mnist_bundled' (the captioned digits, default) or a text file, one caption per line")
    p.add_argument("--out", required=True, help="folder for vocab.json and merges.txt")
    p.add_argument("--vocab-size", type=int, default=1000, help="at most this many tokens (>= 514)")
    p.add_argument("--seed", type=int, default=0, help="caption seed for mnist_bundled")

    p = sub.add_parser("txt2img", help="text → image with Stable Diffusion weights (or a text-conditional workdir)",
                       description=run_txt2img.__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a diffusers Stable Diffusion folder or a single-file .safetensors/.ckpt")
    source.add_argument("--workdir", help="a text-conditional run trained by ddpm-jax train")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    _add_sd_arguments(p, steps=None, guidance=None, scheduler=None)
    p.add_argument("--out", default=None, help="PNG grid (default txt2img.png, or <workdir>/txt2img.png)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--attention-maps", action="store_true", help="also write per-token cross-attention overlays")

    p = sub.add_parser("img2img", help="SDEdit: image + text → image with Stable Diffusion weights",
                       description=run_img2img.__doc__)
    p.add_argument("--model", required=True, help="a diffusers Stable Diffusion folder or a single-file checkpoint")
    p.add_argument("--image", required=True, help="the input image (PNG/JPEG)")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--strength", type=float, default=0.75, help="fraction of the steps redone, in (0, 1]")
    _add_sd_arguments(p, steps=50, guidance=7.5, scheduler="ddim")
    p.add_argument("--out", default="img2img.png")
    p.add_argument("--height", type=int, default=None, help="resize the image (default: its size)")
    p.add_argument("--width", type=int, default=None)
    return parser


def _add_sd_arguments(p: argparse.ArgumentParser, steps: int | None, guidance: float | None,
                      scheduler: str | None) -> None:
    p.add_argument("--steps", type=int, default=steps, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=guidance, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative", action="append", default=None, metavar="PROMPT",
                   help="negative prompt (once for all prompts, or once per prompt)")
    p.add_argument("--scheduler", default=scheduler,
                   help="ddim, pndm, euler, euler_ancestral, dpmsolver++ (default: the model's)")
    p.add_argument("--dtype", default="float32", help="float32, bf16, or fp16 (GPU only)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, for a single-file checkpoint")


def _negatives(negative: list[str] | None, num_prompts: int) -> list[str] | None:
    """--negative given once → for every prompt; else one per prompt (checked by the pipeline)."""
    if negative and len(negative) == 1:
        return negative * num_prompts
    return negative


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ddpm-jax`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "orbax", "jax"):  # checkpoint/compile chatter; warnings still show
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "train":
            run_train(args.config, args.workdir, args.overrides)
            print(f"Trained. Outputs in {args.workdir}; sample with: {PROG} sample --workdir {args.workdir}")
        elif args.command == "sample":
            for path in run_sample(args.workdir, args.out, num=args.num, sampler=args.sampler, steps=args.steps,
                                   eta=args.eta, seed=args.seed, npz=args.npz, trajectory=args.trajectory,
                                   batch_size=args.batch_size, pretrained=args.pretrained,
                                   labels=args.labels, guidance=args.guidance):
                print(path)
        elif args.command == "eval":
            run_eval(args.workdir, pretrained=args.pretrained, outdir=args.outdir, num_samples=args.num_samples,
                     bpd_examples=args.bpd_examples, bpd_batch_size=args.bpd_batch_size, data=args.data,
                     sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
                     batch_size=args.batch_size, judge=args.judge, inception=args.inception,
                     reference=args.reference, sweep_per_class=args.sweep_per_class)
        elif args.command == "demo":
            run_demo(args.workdir, args.config, args.overrides)
        elif args.command == "train-clip":
            run_train_clip(args.config, args.workdir, args.overrides)
            print(f"Trained. Outputs in {args.workdir} (eval.json: zero-shot accuracy, recall@k)")
        elif args.command == "train-vae":
            run_train_vae(args.config, args.workdir, args.overrides)
            print(f"Trained. Outputs in {args.workdir} (eval.json, reconstructions/)")
        elif args.command == "train-tokenizer":
            run_train_tokenizer(args.captions, args.out, args.vocab_size, args.seed)
        elif args.command == "txt2img" and args.workdir:
            from ddpm_jax import pipelines

            for path in pipelines.run_txt2img_workdir(args.workdir, args.prompts, args.guidance, args.steps,
                                                      args.seed, args.out, args.attention_maps):
                print(path)
        elif args.command == "txt2img":
            negative = _negatives(args.negative, len(args.prompts))
            for path in run_txt2img(args.model, args.prompts, args.out or "txt2img.png", args.steps or 50,
                                    7.5 if args.guidance is None else args.guidance, args.seed, negative,
                                    args.scheduler, args.height, args.width, args.dtype, args.attention_maps,
                                    args.tokenizer):
                print(path)
        elif args.command == "img2img":
            for path in run_img2img(args.model, args.image, args.prompts, args.out, args.strength, args.steps,
                                    args.guidance, args.seed, _negatives(args.negative, len(args.prompts)),
                                    args.scheduler, args.height, args.width, args.dtype, args.tokenizer):
                print(path)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        if os.environ.get("DDPM_JAX_TRACEBACK"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(1 if isinstance(err, FloatingPointError) else 2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
