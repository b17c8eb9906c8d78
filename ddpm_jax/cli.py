"""The ``ddpm-jax`` command: argument parsing and dispatch; the work is done by importable modules.

::

    ddpm-jax train  --config experiments/mnist.py --workdir runs/mnist [train.num_steps=100 ...]
    ddpm-jax sample --workdir runs/mnist --num 64 --sampler dpmsolver++ --steps 20 --seed 0 --out s.png
    ddpm-jax demo   --workdir runs/mnist            # what `make demo` runs (ends with `eval`)
    ddpm-jax eval   --workdir runs/mnist [--num-samples 1000 --bpd-examples 100 --inception PTH --reference NPZ]
    ddpm-jax sample --pretrained ddpm-cifar10-32 --num 64   # a diffusers folder (google/ddpm-*)
    ddpm-jax train-vae | train-clip | train-flow | train-gan --config experiments/… --workdir runs/…
    ddpm-jax train-tokenizer --out tokenizer/
    ddpm-jax txt2img --model sd-v1-5 "a photo of a cat" [--scheduler ddpm]   # or --workdir (text-conditional run)
    ddpm-jax txt2img --model sdxl-base --refiner sdxl-refiner "a photo of a cat" [--high-noise-frac 0.8]
    ddpm-jax img2img --model sd-v1-5 --image in.png "a painting" [--scheduler dpmsolver++]   # any scheduler
    ddpm-jax inpaint --model sd-v1-5-inpainting --image in.png --mask mask.png "a cat"      # white = repaint
    ddpm-jax txt2img --from-png txt2img_3.png [--steps 30]   # re-run the parameters a PNG recorded

=====================  ===========================================================================
command                library call
=====================  ===========================================================================
train / train-vae /    ``training.diffusion.train`` / ``training.autoencoder.train`` / ``training.clip.train``
train-clip /           / ``training.flow.train`` / ``training.gan.train``
train-flow / train-gan
sample                 ``workdir.load_diffusion_model`` or ``pipelines.generate.load_pretrained_ddpm``,
                       then ``pipelines.generate.sample_to_files`` (any solver of ``samplers.SAMPLERS``)
demo                   ``demo.run_demo`` (what ``make demo`` runs)
eval                   ``evaluation.report.evaluate``
txt2img / img2img /    ``pipelines.stable_diffusion`` (``--model``), ``pipelines.cross_attention`` (``--workdir``)
inpaint
export                 ``pretrained.export.export_run`` (``--workdir`` → a diffusers / transformers folder)
=====================  ===========================================================================

Errors caused by the input (an unknown config key, a bad override value, a missing workdir or
checkpoint, a dataset that is not available offline, an empty image folder, a batch that does not split
over the devices) end the command with one line, ``ddpm-jax: error: <message>``, and exit status 2;
a non-finite training loss ends it with exit status 1. Set ``DDPM_JAX_TRACEBACK=1`` to get the full
traceback instead. Compiled programs are cached on disk for the next call (``compile_cache.py``:
``~/.cache/ddpm_jax/jax_cache``; ``--no-compile-cache`` or ``DDPM_JAX_COMPILE_CACHE=off|<dir>``).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from ddpm_jax import compile_cache
from ddpm_jax import config as config_lib
from ddpm_jax import data, demo, png_metadata, samplers, schedulers, tokenizer
from ddpm_jax.diffusion_model import DiffusionModel
from ddpm_jax.evaluation import report
from ddpm_jax.pipelines import cross_attention, generate
from ddpm_jax.pipelines import stable_diffusion as sd
from ddpm_jax.pretrained import export
from ddpm_jax.training import autoencoder as autoencoder_training
from ddpm_jax.training import clip as clip_training
from ddpm_jax.training import diffusion as diffusion_training
from ddpm_jax.training import flow as flow_training
from ddpm_jax.training import gan as gan_training
from ddpm_jax.workdir import load_diffusion_model

PROG = "ddpm-jax"
# command -> (trainer module with .train(config, workdir), help, what it leaves in the workdir)
TRAINERS = {
    "train": (diffusion_training, "train (or resume) a diffusion model", f"sample with: {PROG} sample --workdir {{}}"),
    "train-vae": (autoencoder_training, "train (or resume) a Gaussian VAE or an AutoencoderKL", "eval.json, reconstructions/"),
    "train-clip": (clip_training, "train (or resume) a CLIP on captioned digits", "eval.json: zero-shot accuracy, recall@k"),
    "train-flow": (flow_training, "train (or resume) a normalizing flow (RealNVP/Glow)", "eval.json: bits/dim, samples/"),
    "train-gan": (gan_training, "train (or resume) a DCGAN", "eval.json: the judge's numbers, samples/, interpolation.png"),
}


def load_config_with_overrides(config_path: str, overrides: Sequence[str] = ()) -> Any:
    """``config.load_config(config_path)`` with ``group.field=value`` overrides applied."""
    return config_lib.apply_overrides(config_lib.load_config(config_path), overrides)


def load_model(workdir: str | None, pretrained: str | None, step: int | None = None
               ) -> tuple[DiffusionModel, pathlib.Path]:
    """The model of ``--workdir`` (at ``--step``) or ``--pretrained`` and where its outputs go by default."""
    if pretrained is not None and step is not None:
        raise ValueError("--step picks a checkpoint of --workdir; a --pretrained folder has one set of weights")
    if pretrained is not None:
        return generate.load_pretrained_ddpm(pretrained), pathlib.Path(f"{pathlib.Path(pretrained).resolve().name}")
    if workdir is not None:
        return load_diffusion_model(workdir, step=step), pathlib.Path(workdir)
    raise ValueError("give --workdir (a trained run) or --pretrained (a diffusers model folder)")


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------

def add_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run trained by ddpm-jax train (latest checkpoint, EMA)")
    source.add_argument("--pretrained", metavar="FOLDER",
                        help="a diffusers UNet2DModel + scheduler folder, e.g. a copy of google/ddpm-cifar10-32")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of --workdir (default: the latest)")


def add_sampler(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=samplers.SAMPLER_NAMES, default=None, metavar="NAME",
                   help=f"{', '.join(samplers.SAMPLER_NAMES)} (default: the model's)")
    p.add_argument("--steps", type=int, default=None,
                   help="solver steps (default: the model's; all T for ddpm unless configured)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta, 0 = deterministic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per compiled sampling call")


def add_stable_diffusion(p: argparse.ArgumentParser, steps: int | None, guidance: float | None,
                         scheduler: str | None) -> None:
    p.add_argument("prompts", nargs="*", metavar="PROMPT")
    p.add_argument("--steps", type=int, default=steps, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=guidance, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="φ of Lin et al. 2024 (0.7 for SD 2.x; default 0)")
    p.add_argument("--seed", type=int, default=None, help="image k's seed is SEED + k (default 0)")
    p.add_argument("--num-images-per-prompt", type=int, default=1, help="each image also its own PNG with its parameters")
    p.add_argument("--negative", action="append", default=None, metavar="PROMPT",
                   help="negative prompt (once for all prompts, or once per prompt)")
    p.add_argument("--prompt-2", action="append", default=None, metavar="PROMPT",
                   help="SDXL base: the second text encoder's prompt (default: PROMPT; once, or once per prompt)")
    p.add_argument("--negative-prompt-2", action="append", default=None, metavar="PROMPT",
                   help="SDXL base: the second text encoder's negative prompt (default: --negative)")
    p.add_argument("--scheduler", default=scheduler, help=f"{', '.join(schedulers.NAMES)}, or a diffusers class name "
                   "(default: the model's); \"_karras\": Karras sigmas, e.g. dpmsolver++_karras = DPM++ 2M Karras")
    p.add_argument("--dtype", default="float32", help="float32, bf16, or fp16 (GPU only)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, for a single-file checkpoint")
    p.add_argument("--config-folder", default=None, help="for a single-file checkpoint (SD v1, 2.x or SDXL): a diffusers "
                   "folder of the same kind whose configs, tokenizers and scheduler to use")
    p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                   help="for a single-file checkpoint (the keys do not show it; default: the config folder's, else "
                   "v_prediction for SD 2.x, epsilon otherwise)")
    p.add_argument("--use-ema", action="store_true", help="for a single full CompVis checkpoint: its model_ema.* U-Net")
    p.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="FILE[:SCALE]",
                   help="a LoRA (diffusers or kohya .safetensors) at SCALE (default 1), repeatable; --model only")


def lora_spec(text: str) -> tuple[str, float]:
    """``--lora file.safetensors:0.8`` → ("file.safetensors", 0.8); no ``:SCALE`` → scale 1."""
    path, sep, scale = text.rpartition(":")
    if not sep or "/" in scale or "\\" in scale:  # no scale (a path may hold ":" itself)
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FILE[:SCALE] with SCALE a number, e.g. lora.safetensors:0.8"
                                         ) from None


def add_image_commands(sub: Any) -> None:
    """``img2img`` and ``inpaint``: an image (and a mask) + prompts → images, with any scheduler."""
    for name, to_files, what, strength in (("img2img", sd.img2img_to_files, "SDEdit: image + text → image", 0.75),
                                           ("inpaint", sd.inpaint_to_files, "image + mask + text → image", 1.0)):
        p = sub.add_parser(name, help=f"{what} with Stable Diffusion weights", description=to_files.__doc__)
        p.add_argument("--model", required=True, help="a diffusers Stable Diffusion folder or a single-file checkpoint "
                       "(inpaint: an inpainting folder, 9-channel U-Net, or any SD model: latent blending)")
        p.add_argument("--image", required=True, help="the input image (PNG/JPEG)")
        if name == "inpaint":
            p.add_argument("--mask", required=True, help="the mask (PNG): white = repaint, resized to the image")
        add_stable_diffusion(p, steps=50, guidance=7.5, scheduler=None)
        p.add_argument("--strength", type=float, default=strength, help="steps redone, in (0, 1] (1: from noise)")
        p.add_argument("--out", default=f"{name}.png")
        p.add_argument("--height", type=int, default=None, help="resize the image (default: its size, floor to 8)")
        p.add_argument("--width", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    """The ``ddpm-jax`` argument parser."""
    parser = argparse.ArgumentParser(prog=PROG, description="DDPM and Stable Diffusion in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (trainer, help_text, _) in TRAINERS.items():
        p = sub.add_parser(name, help=help_text, description=trainer.__doc__.split("\n\n")[0])
        p.add_argument("--config", required=True, help="experiment file with get_config(), e.g. experiments/mnist.py")
        p.add_argument("--workdir", required=True, help="where checkpoints, metrics and figures go")
        p.add_argument("overrides", nargs="*", metavar="group.field=value", help="e.g. train.num_steps=100")

    p = sub.add_parser("sample", help="sample from a trained workdir or a diffusers folder",
                       description=generate.sample_to_files.__doc__)
    add_source(p)
    add_sampler(p)
    p.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--out", default=None, help="PNG grid or .npz (default <workdir>/samples.png)")
    p.add_argument("--npz", action="store_true", help="also write the images as <out>.npz")
    p.add_argument("--trajectory", action="store_true", help="also write a strip of x_t along the chain")
    p.add_argument("--labels", default=None, help="class-conditional runs: comma-separated labels, e.g. 0,1,2")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale w (default: config)")

    p = sub.add_parser("demo", help="the `make demo` run: figures, training, samples", description=demo.run_demo.__doc__)
    p.add_argument("--workdir", default="runs/mnist")
    p.add_argument("--config", default=demo.DEFAULT_CONFIG)
    p.add_argument("overrides", nargs="*", metavar="group.field=value")

    p = sub.add_parser("eval", help="bits/dim, the offline MNIST judge, FID/IS of a workdir or diffusers folder",
                       description=report.evaluate.__doc__)
    add_source(p)
    add_sampler(p)
    p.add_argument("--num-samples", type=int, default=None, help="default 1,000; 50,000 with --inception")
    p.add_argument("--bpd-examples", type=int, default=100, help="images for bits/dim (default 100; 0 skips)")
    p.add_argument("--bpd-batch-size", type=int, default=64)
    p.add_argument("--data", default=None, help="dataset for bits/dim, e.g. tfds:cifar10:test (default: the run's)")
    p.add_argument("--judge", action=argparse.BooleanOptionalAction, default=None,
                   help="run the offline MNIST judge (default: for 1-channel MNIST runs)")
    p.add_argument("--inception", default=None, metavar="PATH", help="Inception weights for FID/IS")
    p.add_argument("--reference", default=None, help="FID reference: statistics .npz or a dataset name")
    p.add_argument("--outdir", default=None, help="default: the workdir, or ./eval_<folder name>")
    p.add_argument("--sweep-per-class", type=int, default=20, help="conditional runs: samples per digit and scale")

    p = sub.add_parser("export", help="a workdir as a diffusers / transformers folder",
                       description=export.export_run.__doc__)
    p.add_argument("--workdir", required=True, help="a run trained by ddpm-jax train, train-vae or train-clip")
    p.add_argument("--out", required=True, help="the folder to write (config.json, *.safetensors, ...)")
    p.add_argument("--raw", action="store_true", help="the raw parameters instead of the EMA ones")

    p = sub.add_parser("train-tokenizer", help="fit a CLIP-style BPE on captions",
                       description=tokenizer.train_tokenizer.__doc__)
    p.add_argument("--captions", default="mnist_bundled", help="'mnist_bundled' or a text file, one caption a line")
    p.add_argument("--out", required=True, help="folder for vocab.json and merges.txt")
    p.add_argument("--vocab-size", type=int, default=1000, help="at most this many tokens (>= 514)")
    p.add_argument("--seed", type=int, default=0, help="caption seed for mnist_bundled")

    add_stable_diffusion_commands(sub)
    for command_parser in sub.choices.values():  # compile_cache.py: DDPM_JAX_COMPILE_CACHE=off|<dir> also works
        command_parser.add_argument("--no-compile-cache", action="store_true", help="do not reuse compiled programs")
    return parser


def add_stable_diffusion_commands(sub: Any) -> None:
    """txt2img and img2img (Stable Diffusion weights; txt2img also a text-conditional workdir)."""
    p = sub.add_parser("txt2img", help="text → image with Stable Diffusion weights (or a text-conditional workdir)",
                       description=sd.txt2img_to_files.__doc__)
    source = p.add_mutually_exclusive_group()  # one of them, or --from-png's recorded model
    source.add_argument("--model", help="a diffusers Stable Diffusion folder or a single-file .safetensors/.ckpt")
    source.add_argument("--workdir", help="a text-conditional run trained by ddpm-jax train")
    add_stable_diffusion(p, steps=None, guidance=None, scheduler=None)
    p.add_argument("--out", default=None, help="PNG grid (default txt2img.png, or <workdir>/txt2img.png)")
    p.add_argument("--height", type=int, default=None, help="default: the model's (U-Net sample_size × VAE factor: "
                   "512 for SD v1, 1024 for SDXL)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--attention-maps", action="store_true", help="also write per-token cross-attention overlays")
    p.add_argument("--refiner", default=None, help="an SDXL refiner folder or file: base → refiner (--model the SDXL base)")
    p.add_argument("--high-noise-frac", type=float, default=None,
                   help="with --refiner: the fraction of the denoising the base does (default 0.8)")
    p.add_argument("--from-png", default=None, help="re-run the parameters recorded in a PNG written by txt2img; "
                   "options given here override them")

    add_image_commands(sub)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

def from_png(args: argparse.Namespace) -> None:
    """``txt2img --from-png``: the PNG's recorded parameters (``png_metadata``) fill every option not given."""
    g = png_metadata.read_generation(args.from_png)
    if g.mode != "txt2img":
        raise ValueError(f"--from-png {args.from_png}: an {g.mode} image; re-run it with ddpm-jax {g.mode}")
    recorded = dict(prompts=[g.prompt], negative=g.negative_prompt and [g.negative_prompt], seed=g.seed,
                    steps=g.steps, guidance=g.guidance_scale, guidance_rescale=g.guidance_rescale, lora=list(g.loras),
                    scheduler=g.scheduler, height=g.height, width=g.width, model=g.model, refiner=g.refiner,
                    high_noise_frac=g.high_noise_frac, prompt_2=g.prompt_2 and [g.prompt_2],
                    negative_prompt_2=g.negative_prompt_2 and [g.negative_prompt_2])
    for name, value in recorded.items():
        if getattr(args, name) in (None, []) and not (name == "model" and args.workdir):
            setattr(args, name, value)


def load_stable_diffusion(args: argparse.Namespace, base: sd.StableDiffusion | None = None) -> sd.StableDiffusion:
    """The ``--model`` pipeline with its ``--lora`` files, or the ``--refiner`` of ``base`` (``sd.load_refiner``)."""
    print(f"loading {args.refiner if base else args.model} ({args.dtype}) ...", file=sys.stderr)
    options = dict(dtype=args.dtype, scheduler=args.scheduler, tokenizer=args.tokenizer,
                   prediction_type=args.prediction_type, use_ema=args.use_ema)
    if base is not None:  # (--config-folder is the base's)
        return sd.load_refiner(args.refiner, base, **options)
    pipe = sd.StableDiffusion.from_pretrained(args.model, config_folder=args.config_folder, **options)
    for path, scale in args.lora:
        print(f"LoRA {pipe.load_lora(path, scale)} at {scale}", file=sys.stderr)
    return pipe


def dispatch(args: argparse.Namespace) -> list[Any]:
    """Runs the command; returns the paths it wrote (printed by :func:`main`)."""
    if args.command in TRAINERS:
        trainer, _, outputs = TRAINERS[args.command]
        trainer.train(load_config_with_overrides(args.config, args.overrides), args.workdir)
        return [f"Trained. Outputs in {args.workdir} ({outputs.format(args.workdir)})"]
    if args.command == "demo":
        demo.run_demo(args.workdir, args.config, args.overrides)
        return []
    if args.command == "sample":
        model, where = load_model(args.workdir, args.pretrained, args.step)
        out = args.out or (where / "samples.png" if args.workdir else f"samples_{where}.png")
        return generate.sample_to_files(
            model, out, num=args.num, sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
            npz=args.npz, trajectory=args.trajectory, batch_size=args.batch_size, labels=args.labels,
            guidance_scale=args.guidance, progress=args.pretrained is not None)
    if args.command == "eval":
        model, where = load_model(args.workdir, args.pretrained, args.step)
        report.evaluate(model, args.outdir or (where if args.workdir else f"eval_{where}"),
                        num_samples=args.num_samples, bpd_examples=args.bpd_examples,
                        bpd_batch_size=args.bpd_batch_size, data=args.data, sampler=args.sampler, steps=args.steps,
                        eta=args.eta, seed=args.seed, batch_size=args.batch_size, judge=args.judge,
                        inception=args.inception, reference=args.reference, sweep_per_class=args.sweep_per_class)
        return []
    if args.command == "export":
        return export.export_run(args.workdir, args.out, ema=not args.raw)
    if args.command == "train-tokenizer":
        texts = data.read_captions(args.captions, args.seed)
        tok = tokenizer.train_tokenizer(texts, args.out, vocab_size=args.vocab_size)
        return [f"{len(texts)} captions -> {tok.vocab_size} tokens ({len(tok.merges)} merges) in {args.out}"]
    if getattr(args, "from_png", None):
        from_png(args)
    if not args.prompts or not (args.model or getattr(args, "workdir", None)):
        raise ValueError(f"{args.command}: give --model (or --workdir) and at least one PROMPT, or --from-png IMAGE")
    if args.command == "txt2img" and args.workdir and (args.lora or args.prompt_2 or args.negative_prompt_2):
        raise ValueError("--lora applies to Stable Diffusion weights (--model), not to a --workdir run (so do --prompt-2 "
                         "and --negative-prompt-2)")
    if args.command == "txt2img" and args.workdir:
        return cross_attention.txt2img_to_files(
            load_diffusion_model(args.workdir), args.prompts, args.out or pathlib.Path(args.workdir) / "txt2img.png",
            guidance_scale=args.guidance, steps=args.steps, seed=args.seed or 0, attention_maps=args.attention_maps,
            sampler=args.scheduler)
    texts = {name: sd.per_prompt(text[0] if text and len(text) == 1 else text, len(args.prompts), what)  # once → all
             for name, what, text in (("negative_prompts", "negative prompts", args.negative),
                                      ("prompts_2", "prompts_2", args.prompt_2),
                                      ("negative_prompts_2", "negative_prompts_2", args.negative_prompt_2))}
    kwargs = dict(seed=args.seed or 0, height=args.height, width=args.width, **texts,
                  num_images_per_prompt=args.num_images_per_prompt, guidance_rescale=args.guidance_rescale or 0.0)
    if args.command == "txt2img":
        pipe = load_stable_diffusion(args)
        return sd.txt2img_to_files(
            pipe, args.prompts, args.out or "txt2img.png", steps=args.steps or 50,
            guidance_scale=7.5 if args.guidance is None else args.guidance, attention_maps=args.attention_maps,
            refiner=load_stable_diffusion(args, pipe) if args.refiner else None,
            high_noise_frac=args.high_noise_frac or 0.8, **kwargs)
    kwargs |= dict(strength=args.strength, steps=args.steps, guidance_scale=args.guidance)
    if args.command == "inpaint":
        return sd.inpaint_to_files(load_stable_diffusion(args), args.image, args.mask, args.prompts, args.out, **kwargs)
    return sd.img2img_to_files(load_stable_diffusion(args), args.image, args.prompts, args.out, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ddpm-jax`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "orbax", "jax"):  # checkpoint/compile chatter; warnings still show
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        compile_cache.enable(not args.no_compile_cache)
        for line in dispatch(args):
            print(line)
    except (ValueError, OSError, FloatingPointError) as err:  # OSError: also an unwritable --workdir, a full disk
        if os.environ.get("DDPM_JAX_TRACEBACK"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(1 if isinstance(err, FloatingPointError) else 2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
