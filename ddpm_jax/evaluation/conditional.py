"""Does a conditional model follow its condition? The guidance sweep, judged offline.

For a class-conditional or text-conditional MNIST model: generate ``per_class`` digits for each class c
(condition: the label c, or the prompt "a handwritten digit <name of c>"), at several guidance scales
w, and let the offline MNIST judge (``evaluation/judge.py``) say

* **accuracy**: the share of samples the judge classifies as the class they were conditioned on
  (chance: 10%), per class too;
* **classifier FID** against real digits (a proxy for sample quality *and* diversity, not FID).

Classifier-free guidance (Ho & Salimans 2021, Fig. 1/Table 1) trades one for the other: as w grows the
samples follow the condition more often, until they lose diversity and the classifier FID rises again.
``plot_guidance_sweep`` draws both against w (PNG).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ddpm_jax.data import DIGIT_NAMES
from ddpm_jax.diffusion_model import DiffusionModel
from ddpm_jax.evaluation import judge as judge_lib
from ddpm_jax.pipelines.generate import generate
from ddpm_jax.plotting import new_figure, save_figure, save_image_grid
from ddpm_jax.progress import progress_bar


DEFAULT_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)
PROMPT_TEMPLATE = "a handwritten digit {name}"


def class_conditions(kind: str, num_classes: int = 10, per_class: int = 10,
                     template: str = PROMPT_TEMPLATE) -> tuple[np.ndarray, list[str] | None]:
    """(intended classes [num_classes · per_class], prompts or None): class c repeated ``per_class`` times."""
    classes = np.repeat(np.arange(num_classes), per_class)
    if kind == "class":
        return classes, None
    if kind == "text":
        return classes, [template.format(name=DIGIT_NAMES[c]) for c in classes]
    raise ValueError(f"a guidance sweep needs a class- or text-conditional model, got condition.kind={kind!r}")


def guidance_sweep(model: DiffusionModel, scales: Sequence[float] = DEFAULT_SCALES, per_class: int = 10, seed: int = 0,
                   steps: int | None = None, judge: Any = None, progress: bool = True, sampler: str | None = None) -> dict[str, Any]:
    """Judge ``model`` (a class- or text-conditional DiffusionModel) at each guidance scale; a JSON-serialisable dict.

    The same seed at every w: the sweep changes only the guidance, not the initial noise.
    """
    classes, prompts = class_conditions(model.kind, per_class=per_class)
    rows, samples = [], {}
    iterator = scales
    if progress:
        iterator = progress_bar(scales, desc=f"guidance sweep ({len(classes)} samples per scale)", unit="scale")
    for w in iterator:
        out = generate(model, prompts=prompts, labels=None if prompts else classes, guidance_scale=float(w),
                                 steps=steps, seed=seed, sampler=sampler)
        images = out["images"]
        if judge is None:
            judge = judge_lib.get_judge(images.shape[1], progress=progress)
        first = not rows
        report = judge_lib.judge_report(images, judge, labels=classes, baseline=first)
        if first:
            baseline = report["classifier_fid_real_baseline"]
        rows.append({"guidance": float(w), "accuracy": report["accuracy"],
                     "per_class_accuracy": report["per_class_accuracy"],
                     "classifier_fid": report["classifier_fid"], "confidence": report["confidence"]})
        samples[float(w)] = images
    return {"kind": model.kind, "per_class": per_class, "seed": seed, "prompt_template": PROMPT_TEMPLATE if prompts else None,
            "protocol": report["protocol"], "classifier_fid_real_baseline": baseline, "rows": rows,
            "samples": samples}


def plot_guidance_sweep(sweep: dict[str, Any], path: str | os.PathLike) -> pathlib.Path:
    """Accuracy (left axis) and classifier FID (right axis) against the guidance scale w. PNG."""
    w = [r["guidance"] for r in sweep["rows"]]
    fig = new_figure(figsize=(5, 3.4))
    ax = fig.subplots()
    ax.plot(w, [100 * r["accuracy"] for r in sweep["rows"]], "o-", color="tab:blue")
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel("judged as the intended digit (%)", color="tab:blue")
    ax.axhline(10, color="tab:blue", ls=":", lw=0.8)
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(w, [r["classifier_fid"] for r in sweep["rows"]], "s--", color="tab:red")
    ax2.set_ylabel("classifier FID (proxy, lower is better)", color="tab:red")
    if sweep.get("classifier_fid_real_baseline") is not None:
        ax2.axhline(sweep["classifier_fid_real_baseline"], color="tab:red", ls=":", lw=0.8)
    ax.set_title(f"{sweep['kind']}-conditional: {sweep['per_class']} samples per digit", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def save_sweep(sweep: dict[str, Any], workdir: str | os.PathLike, name: str = "guidance_sweep"
               ) -> list[pathlib.Path]:
    """``<name>.json`` (without the images), ``<name>.png`` (the plot) and ``<name>_w<w>.png`` grids."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in sweep.items() if k != "samples"}
    json_path = workdir / f"{name}.json"
    json_path.write_text(json.dumps(record, indent=2))
    written = [json_path, plot_guidance_sweep(sweep, workdir / f"{name}.png")]
    for w, images in sweep["samples"].items():
        written.append(save_image_grid(images, workdir / f"{name}_w{w:g}.png", nrow=sweep["per_class"]))
    return written
