"""The ``ddpm-jax`` command: train, sample, and the two-minute-to-read demo.

::

    ddpm-jax train  --config experiments/mnist.py --workdir runs/mnist [train.num_steps=100 ...]
    ddpm-jax sample --workdir runs/mnist --num 64 --sampler ddim --steps 50 --eta 0 --seed 0 \\
                    --out samples.png [--npz] [--trajectory]
    ddpm-jax demo   --workdir runs/mnist            # what `make demo` runs

The argument parsing here is thin; the work is done by :func:`run_train`, :func:`sample_from_workdir`
and :func:`run_demo`, which notebooks can import and call.

Errors caused by the input (an unknown config key, a bad override value, a missing workdir or
checkpoint, a dataset that is not available offline, an empty image folder, a batch that does not split
over the devices) end the command with one line, ``ddpm-jax: error: <message>``, and exit status 2;
a non-finite training loss ends it with exit status 1. Set ``DDPM_JAX_TRACEBACK=1`` to get the full
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["main", "build_parser", "run_train", "sample_from_workdir", "run_sample", "run_demo"]

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
    import jax

    from ddpm_jax import checkpoints, samplers, training
    from ddpm_jax import config as config_lib
    from ddpm_jax.models.unet import UNet, UNetConfig
    from ddpm_jax.schedules import get_schedule

    if num < 1 or batch_size < 1:
        raise ValueError(f"--num and --batch-size must be >= 1, got {num} and {batch_size}")
    config = config_lib.load_workdir_config(workdir)
    sampler = sampler or config.sample.sampler
    steps = config.sample.steps if steps is None else steps
    eta = config.sample.eta if eta is None else eta
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"--sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    params = checkpoints.load_params(workdir, ema=ema)
    model = UNet(UNetConfig(**config.model.to_dict()))
    schedule = get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    eps_fn = training.make_eps_fn(model, params)
    chunk = min(batch_size, num)
    shape = (chunk, config.data.image_size, config.data.image_size, config.data.channels)
    prediction = config.diffusion.get("prediction", "eps")

    def run(key: jax.Array, return_trajectory: bool) -> Any:
        if sampler == "ddim":
            return samplers.ddim_sample(eps_fn, schedule, shape, key, num_steps=steps, eta=eta,
                                        prediction=prediction, return_trajectory=return_trajectory)
        return samplers.ddpm_sample(eps_fn, schedule, shape, key, prediction=prediction,
                                    variance=config.diffusion.variance, return_trajectory=return_trajectory)

    key = jax.random.key(seed)
    jitted = jax.jit(run, static_argnums=1)  # compiled once per (chunk shape, trajectory flag)
    images, traj = [], None
    for i in range((num + chunk - 1) // chunk):  # the last chunk is sampled whole, then trimmed
        want_traj = trajectory and i == 0
        out = jitted(jax.random.fold_in(key, i), want_traj)
        if want_traj:
            out, traj = out
            traj = np.asarray(traj)
        images.append(np.asarray(out))
    return np.concatenate(images)[:num], traj


def run_sample(
    workdir: str,
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
) -> list[pathlib.Path]:
    """Samples (see :func:`sample_from_workdir`) and writes the files; returns their paths.

    ``out`` ending in ``.npz`` writes only the arrays; otherwise a PNG grid, plus ``<out>.npz`` with
    ``npz``. The .npz holds ``images`` (uint8 [N, H, W, C], 0..255; what FID tools read) and, with
    ``trajectory``, ``trajectory`` (uint8 [S+1, b, H, W, C]). ``trajectory`` also writes a PNG strip
    ``<out stem>_trajectory.png``. ``out`` defaults to ``<workdir>/samples.png``.
    """
    from ddpm_jax import plotting

    images, traj = sample_from_workdir(workdir, num, sampler=sampler, steps=steps, eta=eta, seed=seed,
                                       trajectory=trajectory, batch_size=batch_size)
    out_path = pathlib.Path(out) if out else pathlib.Path(workdir) / "samples.png"
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


def run_demo(
    workdir: str, config_path: str = DEFAULT_CONFIG, overrides: Sequence[str] = (), num: int = 64
) -> list[pathlib.Path]:
    """``make demo``: forward-process figure, training, 64 samples and a trajectory strip.

    Writes into ``workdir``: forward_process.png (the data under q(x_t | x_0)), the training outputs
    (checkpoints/, metrics.jsonl, loss.png, samples/), samples.png and samples_trajectory.png.
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

    p = sub.add_parser("sample", help="sample from a trained workdir", description=run_sample.__doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: the workdir's config")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the workdir's config)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta, 0 = deterministic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG grid or .npz (default <workdir>/samples.png)")
    p.add_argument("--npz", action="store_true", help="also write the images as <out>.npz")
    p.add_argument("--trajectory", action="store_true", help="also write a strip of x_t along the chain")
    p.add_argument("--batch-size", type=int, default=64, help="images per compiled sampling call")

    p = sub.add_parser("demo", help="the `make demo` run: figures, training, samples",
                       description=run_demo.__doc__)
    p.add_argument("--workdir", default="runs/mnist")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("overrides", nargs="*", metavar="group.field=value")
    p = sub.add_parser("train-clip", help="train (or resume) a CLIP on captioned digits",
                       description=run_train_clip.__doc__)
    p.add_argument("--config", required=True, help="e.g. experiments/clip_mnist.py")
    p.add_argument("--workdir", required=True, help="where checkpoints, tokenizer/, metrics and eval.json go")
    p.add_argument("overrides", nargs="*", metavar="group.field=value", help="e.g. train.num_steps=100")

    p = sub.add_parser("train-tokenizer", help="fit a CLIP-style BPE on captions",
                       description=run_train_tokenizer.__doc__)
    p.add_argument("--captions", default="mnist_bundled",
                   help="'mnist_bundled' (the captioned digits, default) or a text file, one caption per line")
    p.add_argument("--out", required=True, help="folder for vocab.json and merges.txt")
    p.add_argument("--vocab-size", type=int, default=1000, help="at most this many tokens (>= 514)")
    p.add_argument("--seed", type=int, default=0, help="caption seed for mnist_bundled")
    return parser


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
                                   batch_size=args.batch_size):
                print(path)
        elif args.command == "demo":
            run_demo(args.workdir, args.config, args.overrides)
        elif args.command == "train-clip":
            run_train_clip(args.config, args.workdir, args.overrides)
            print(f"Trained. Outputs in {args.workdir} (eval.json: zero-shot accuracy, recall@k)")
        elif args.command == "train-tokenizer":
            run_train_tokenizer(args.captions, args.out, args.vocab_size, args.seed)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        if os.environ.get("DDPM_JAX_TRACEBACK"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(1 if isinstance(err, FloatingPointError) else 2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
