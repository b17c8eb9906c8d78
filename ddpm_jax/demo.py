"""What ``make demo`` runs (``ddpm-jax demo``): the forward-process figure, training, samples and the evaluation.

The top of the library, above ``evaluation.report``: only the CLI imports it.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from ddpm_jax import config as config_lib
from ddpm_jax import data, plotting
from ddpm_jax.evaluation import report
from ddpm_jax.pipelines import generate
from ddpm_jax.schedules import get_schedule
from ddpm_jax.training import diffusion as diffusion_training
from ddpm_jax.workdir import load_diffusion_model

DEFAULT_CONFIG = "experiments/mnist.py"


def run_demo(workdir: str, config_path: str = DEFAULT_CONFIG, overrides: Sequence[str] = (), num: int = 64,
             evaluate: bool = True) -> list[pathlib.Path]:
    """``make demo``: forward-process figure, training, 64 samples, a trajectory strip and the evaluation.

    Writes into ``workdir``: forward_process.png, the training outputs (checkpoints/, metrics.jsonl,
    loss.png, samples/), samples.png and samples_trajectory.png and (``evaluate``) eval.json with bits/dim
    and the offline judge's classifier FID, eval_samples.png, eval_vlb_terms.png. Re-running resumes training.
    """
    config = config_lib.apply_overrides(config_lib.load_config(config_path), overrides)
    work = pathlib.Path(workdir)
    images = data.load_dataset(config.data)
    schedule = get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    examples = data.get_batch(images, 0, 4, config.train.seed)  # 4 digits of the first batch
    written = [plotting.plot_forward_process(examples, schedule, work / "forward_process.png")]
    print(f"forward process figure: {written[0]}", flush=True)
    diffusion_training.train(config, workdir, images=images)
    model = load_diffusion_model(workdir)
    written += generate.sample_to_files(model, work / "samples.png", num=num, seed=config.train.seed, trajectory=True)
    if evaluate:  # classifier FID (offline judge) and bits/dim, into eval.json (~1 min on 2 cores)
        report.evaluate(model, work, num_samples=report.DEMO_EVAL_SAMPLES, bpd_examples=report.DEMO_BPD_EXAMPLES,
                        seed=config.train.seed)
        written += [work / "eval.json", work / "eval_samples.png"]
    metrics = work / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        written.append(plotting.plot_loss_curve(metrics, work / "loss.png"))
    print("\nDemo finished. Files written:")
    for path in written:
        print(f"  {path}")
    print(f"  {work / 'checkpoints'}  (model; sample more: ddpm-jax sample --workdir {workdir})")
    return written
