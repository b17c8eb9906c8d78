"""The evaluation report of a diffusion model (what ``ddpm-jax eval`` writes): samples, bits/dim, judge, FID/IS.

:func:`evaluate` takes any :class:`~ddpm_jax.diffusion_model.DiffusionModel` (a workdir or a diffusers
folder) and runs, in order:

1. **Samples**: ``num_samples`` with any solver of ``samplers.SAMPLERS`` (the model's by default).
2. **Bits/dim**: the full variational bound (Ho et al. Eq. 5, all T terms, ``likelihood.dataset_bpd``),
   held out where the dataset has a test split. Pixel models only (a latent model's bound is over latents).
3. **The offline MNIST judge** (``judge.py``): predicted digits, confidence, classifier FID (a proxy).
4. **The guidance sweep** of a class- or text-conditional model (``conditional.py``).
5. **FID / IS** with user-supplied Inception weights (``fid.py``), protocol recorded with the number.

Everything goes into ``eval.json`` with its protocol, plus ``eval_samples.png`` and ``eval_vlb_terms.png``.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ddpm_jax import data as data_lib
from ddpm_jax import plotting
from ddpm_jax.diffusion_model import DiffusionModel
from ddpm_jax.evaluation import conditional, likelihood
from ddpm_jax.evaluation import fid as fid_lib
from ddpm_jax.evaluation import inception as inception_lib
from ddpm_jax.evaluation import judge as judge_lib
from ddpm_jax.pipelines.generate import model_calls, resolve_sampler, sample_images

Say = Callable[[str], None]
# The MNIST demo's evaluation: a few tens of seconds on 2 CPU cores.
DEMO_EVAL_SAMPLES = 128
DEMO_BPD_EXAMPLES = 8


def is_digits(data_name: str | None) -> bool:
    """MNIST digits (the bundled 5,000 or tfds' mnist): the runs the offline judge can judge."""
    if not data_name:
        return False
    return data_name == "mnist_bundled" or (data_name.startswith("tfds:") and data_name.split(":")[1] == "mnist")


def bpd_images(model: DiffusionModel, data_name: str, num: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """``num`` images for bits/dim and a description of which (held-out where the dataset has a test split)."""
    data_dir = model.data_config.get("data_dir") if model.data_config is not None else None
    if data_name == "mnist_bundled":
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


def bits_per_dim(model: DiffusionModel, data_name: str, num: int, batch_size: int, seed: int, out: pathlib.Path,
                 progress: bool, say: Say) -> dict[str, Any]:
    """Step 2: the variational bound on ``num`` images of ``data_name``; writes eval_vlb_terms.png."""
    start = time.perf_counter()
    images, where = bpd_images(model, data_name, num, seed)
    n_dev = jax.device_count()
    batch = -(-min(batch_size, images.shape[0]) // n_dev) * n_dev  # a multiple of the device count
    res = likelihood.dataset_bpd(model.eps_fn, model.schedule, images, jax.random.key(seed), batch,
                                 prediction=model.prediction, variance=model.variance,
                                 clip_denoised=model.clip_denoised, progress=progress)
    likelihood.plot_vlb_terms(res.terms, str(out / "eval_vlb_terms.png"))
    say(f"bits/dim: {res.bpd:.4f} ± {res.std_error:.4f} (on {res.num_examples} images, {where['dataset']} "
        f"{where['split']}; {where['note']})")
    return {"bits_per_dim": {
        "value": res.bpd, "std_error": res.std_error, "prior_L_T": res.prior, "decoder_L_0": float(res.terms[0]),
        "num_examples": res.num_examples, **where, "seconds": round(time.perf_counter() - start, 2),
        "protocol": (f"variational bound of Ho et al. Eq. 5, all {model.schedule.num_timesteps} terms + L_T, "
                     f"one x_t per term and image, discretized decoder for L_0, on {res.num_examples} "
                     f"images ({where['dataset']}, {where['split']}); mean ± standard error")},
        "bits_per_dim_terms": [float(v) for v in res.terms]}


def fid_and_is(samples: np.ndarray, model: DiffusionModel, net: Any, reference: str, say: Say) -> dict[str, Any]:
    """Step 5: FID against ``reference`` (.npz statistics or a dataset name) and the Inception score.

    With fewer samples than the 2,048 features the FID is still computed (a biased quick check, said in
    the output); the paper's protocol is 50,000 samples against the training set.
    """
    name = str(reference)
    if not name.endswith(".npz"):
        data_dir = model.data_config.get("data_dir") if model.data_config is not None else None
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


def evaluate(model: DiffusionModel, out: str | pathlib.Path, *, num_samples: int | None = None,
             bpd_examples: int = 100, bpd_batch_size: int = 64, data: str | None = None, sampler: str | None = None,
             steps: int | None = None, eta: float | None = None, seed: int = 0, batch_size: int = 64,
             judge: bool | None = None, inception: str | None = None, reference: str | None = None,
             progress: bool = True, sweep_per_class: int = 20) -> dict[str, Any]:
    """Evaluates ``model`` into ``out``/eval.json (see the module docstring); returns that dict.

    ``num_samples``: default 1,000, or 50,000 with ``inception`` (the paper's protocol). ``bpd_examples``
    images (0 skips) of ``data`` (default the run's dataset; its test split for tfds, the judge's test split
    for the bundled digits). ``judge`` forces the judge on/off (default: MNIST digits). ``sweep_per_class``
    samples per digit at w = 0, 1, 2, 3, 5 for conditional models. ``inception`` (weights file) turns on
    FID/IS against ``reference`` (statistics .npz or a dataset name; default the run's training set).
    """
    out = pathlib.Path(out)
    if bpd_examples < 0 or (num_samples is not None and num_samples < 2):
        raise ValueError(f"--num-samples must be >= 2 and --bpd-examples >= 0, got {num_samples} and {bpd_examples}")
    data_name = data or (model.data_config.get("name") if model.data_config is not None else None)
    if judge is None:  # MNIST digits: the bundled/tfds ones, or the captioned digits of a text model
        judge = (model.channels == 1 or model.codec is not None) and (is_digits(data_name) or model.kind == "text")
    num_samples = num_samples or (50_000 if inception else 1_000)
    name, num_steps, eta = resolve_sampler(model, sampler, steps, eta)
    inception_net = None
    if inception:  # before the long sampling run: a missing weights file or reference fails now
        if not (reference or data_name):
            raise ValueError("FID needs a reference: pass --reference stats.npz or a dataset (e.g. tfds:cifar10)")
        inception_net = inception_lib.load_inception(inception)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": model.description, "image_size": model.image_size, "channels": model.channels,
                              "devices": jax.device_count()}
    say: Say = (lambda line: print(line, flush=True)) if progress else (lambda line: None)

    start = time.perf_counter()                                                          # 1. samples
    samples, _ = sample_images(model, num_samples, sampler=name, steps=num_steps, eta=eta, seed=seed,
                               batch_size=batch_size, progress=progress)
    result["samples"] = {"num": num_samples, "sampler": name, "steps": model_calls(model, name, num_steps),
                         "eta": eta if name == "ddim" else None, "seed": seed,
                         "seconds": round(time.perf_counter() - start, 2)}
    say(f"samples: {num_samples} from {model.description}, sampler {name} ({num_steps} steps), seed {seed}")

    if bpd_examples and model.codec is not None:                                         # 2. bits/dim
        say("bits/dim: skipped (a latent model's bound is over latents, not pixels)")
    elif bpd_examples and data_name:
        result.update(bits_per_dim(model, data_name, bpd_examples, bpd_batch_size, seed, out, progress, say))
    elif bpd_examples:
        say("bits/dim: skipped (no dataset: pass --data, e.g. tfds:cifar10:test)")

    predicted = None
    if judge:                                                                            # 3. the judge
        start = time.perf_counter()
        report = judge_lib.judge_report(samples, judge_lib.get_judge(samples.shape[1], progress=progress))
        predicted = np.asarray(report.pop("predicted"))
        result["judge"] = {**report, "seconds": round(time.perf_counter() - start, 2)}
        say(judge_lib.format_report(report))
    if judge and model.kind in ("class", "text"):                                        # 4. guidance sweep
        sweep = conditional.guidance_sweep(model, per_class=sweep_per_class, seed=seed, steps=steps,
                                           progress=progress, sampler=sampler)
        conditional.save_sweep(sweep, out)
        result["guidance_sweep"] = {k: v for k, v in sweep.items() if k != "samples"}
        say("guidance sweep (judged as the intended digit; classifier FID): " + ", ".join(
            f"w={r['guidance']:g}: {r['accuracy']:.1%}, {r['classifier_fid']:.1f}" for r in sweep["rows"]))
    if inception:                                                                        # 5. FID / IS
        result.update(fid_and_is(samples, model, inception_net, reference or data_name, say))

    if predicted is not None:
        judge_lib.save_labelled_grid(samples, predicted, out / "eval_samples.png")
    else:
        plotting.save_image_grid(samples[:64], out / "eval_samples.png")
    path = out / "eval.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {path}")
    return result
