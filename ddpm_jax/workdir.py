"""Reading trained runs: any workdir written by a ``ddpm-jax`` trainer, into one type.

A workdir holds ``config.json`` (the exact config it was trained with), ``checkpoints/<step>/`` (orbax:
params, EMA params, optimizer state), ``metrics.jsonl`` and, by model:

========================  ==================  ===========================================================
trainer                   ``kind``            also in the workdir
========================  ==================  ===========================================================
``ddpm-jax train``        "diffusion"         (config.latent / config.condition name the first stages)
``ddpm-jax train-vae``    "gaussian_vae"      eval.json (held-out ELBO)
``ddpm-jax train-vae``    "autoencoder_kl"    eval.json (PSNR and the measured latent ``scaling_factor``)
``ddpm-jax train-clip``   "clip"              tokenizer/ (vocab.json + merges.txt), eval.json
``ddpm-jax train-flow``   "flow"              eval.json (held-out bits/dim), samples/ at temperatures
========================  ==================  ===========================================================

:func:`load_run` reads any of them into a :class:`TrainedRun` (config, step, the Flax module built from
the config, its parameters, and what else the run needs: the tokenizer, the scaling factor). The typed
readers below are views of it, for the places that know what they want: latent diffusion reads an
autoencoder (:func:`load_latent_codec`), text conditioning a CLIP text tower (:func:`load_text_encoder`),
sampling and evaluation a :class:`~ddpm_jax.diffusion_model.DiffusionModel` (:func:`load_diffusion_model`).
The config → model conversions live here too, so that the trainers (which import this module) and the
readers build the same module from the same config. Trainers never import each other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import ml_collections
import numpy as np

from ddpm_jax import checkpoints, guidance
from ddpm_jax import config as config_lib
from ddpm_jax.diffusion_model import DiffusionModel, LatentCodec, TextEncoder, condition_kind
from ddpm_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig
from ddpm_jax.models.flow import Flow, FlowConfig, check_flow_config
from ddpm_jax.models.unet import UNet, UNetConfig
from ddpm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig, GaussianVAE, GaussianVAEConfig
from ddpm_jax.schedules import get_schedule
from ddpm_jax.tokenizer import Tokenizer, load_tokenizer

PyTree = Any
EVAL_FILENAME = "eval.json"
TOKENIZER_DIR = "tokenizer"
AUTOENCODER_KINDS = ("gaussian_vae", "autoencoder_kl")
RUN_KINDS = ("diffusion", *AUTOENCODER_KINDS, "clip", "flow")


# ================================================================================================
# Config → model (shared by the trainers and the readers)
# ================================================================================================

def run_kind(config: ml_collections.ConfigDict) -> str:
    """Which trainer wrote ``config``: "diffusion", "gaussian_vae", "autoencoder_kl" or "clip"."""
    if "diffusion" in config:
        return "diffusion"
    if "tokenizer" in config:
        return "clip"
    if config.model.get("kind", None) == "flow":
        return "flow"
    return autoencoder_kind(config)


def autoencoder_kind(config: ml_collections.ConfigDict) -> str:
    """``config.model.kind`` of an autoencoder config: "gaussian_vae" or "autoencoder_kl"."""
    kind = config.model.get("kind", None)
    if kind not in AUTOENCODER_KINDS:
        raise ValueError(f"config.model.kind must be one of {AUTOENCODER_KINDS}, got {kind!r}")
    return kind


def unet_config(config: ml_collections.ConfigDict) -> UNetConfig:
    """The ``UNetConfig`` of a diffusion config's ``config.model``."""
    return UNetConfig(**config.model.to_dict())


def gaussian_vae_config(config: ml_collections.ConfigDict) -> GaussianVAEConfig:
    """``GaussianVAEConfig`` from ``config.model``, the image shape from ``config.data``."""
    m = config.model
    return GaussianVAEConfig(image_shape=(config.data.image_size, config.data.image_size, config.data.channels),
                             hidden_dims=tuple(m.hidden_dims), latent_dim=m.latent_dim, likelihood=m.likelihood,
                             sigma=m.sigma)


def autoencoder_kl_config(config: ml_collections.ConfigDict) -> AutoencoderKLConfig:
    """``AutoencoderKLConfig`` from ``config.model``, checked against ``config.data``."""
    fields = {k: v for k, v in config.model.to_dict().items() if k != "kind"}
    known = {f.name for f in dataclasses.fields(AutoencoderKLConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config.model has fields {unknown} that AutoencoderKLConfig does not know")
    cfg = AutoencoderKLConfig(**fields)
    channels, size, f = config.data.channels, config.data.image_size, cfg.downsampling_factor
    if cfg.in_channels != channels or cfg.out_channels != channels:
        raise ValueError(f"model.in_channels={cfg.in_channels} and model.out_channels={cfg.out_channels} must equal "
                         f"data.channels={channels}")
    if size % f:
        raise ValueError(f"data.image_size={size} is not divisible by the downsampling factor f={f} of "
                         f"model.block_out_channels={cfg.block_out_channels}; pick a multiple of {f} (MNIST: 32)")
    return cfg


def flow_config(config: ml_collections.ConfigDict) -> FlowConfig:
    """``FlowConfig`` from ``config.model`` (kind "flow"), the image shape from ``config.data``; checked."""
    fields = {k: v for k, v in config.model.to_dict().items() if k != "kind"}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(FlowConfig)} - {"image_shape"})
    if unknown:
        raise ValueError(f"config.model has fields {unknown} that FlowConfig does not know")
    fields["image_shape"] = (config.data.image_size, config.data.image_size, config.data.channels)
    cfg = FlowConfig(**fields)
    check_flow_config(cfg)
    return cfg


def clip_config(config: ml_collections.ConfigDict) -> CLIPConfig:
    """The ``CLIPConfig`` of ``config.model`` (after the CLIP trainer's ``resolve_config`` has filled in the
    tokenizer's sizes)."""
    m = config.model
    projection_dim = int(m.projection_dim)
    text = CLIPTextConfig(**{**m.text.to_dict(), "projection_dim": projection_dim})
    vision_fields = {**m.vision.to_dict(), "projection_dim": projection_dim}
    vision_fields["patch_size"] = int(vision_fields["patch_size"])
    vision = CLIPVisionConfig(**vision_fields)
    if vision.image_size % vision.patch_size:
        raise ValueError(f"model.vision.patch_size={vision.patch_size} does not divide the image size "
                         f"{vision.image_size}; pick a divisor (28: 4, 7 or 14)")
    for name, c in (("text", text), ("vision", vision)):
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"model.{name}.hidden_size={c.hidden_size} is not divisible by "
                             f"num_attention_heads={c.num_attention_heads}")
    return CLIPConfig(text=text, vision=vision, projection_dim=projection_dim,
                      logit_scale_init_value=float(m.logit_scale_init_value))


# ================================================================================================
# One type for every run
# ================================================================================================

@dataclasses.dataclass
class TrainedRun:
    """A trained workdir: its config, the latest checkpoint's step and parameters, and the module."""

    path: pathlib.Path
    kind: str                                   # one of RUN_KINDS
    config: ml_collections.ConfigDict
    step: int | None                            # the checkpoint's step (None: params given otherwise)
    model: Any                                  # UNet | GaussianVAE | AutoencoderKL | CLIPModel
    params: PyTree                              # EMA parameters unless read with ema=False
    tokenizer: Tokenizer | None = None          # clip
    scaling_factor: float | None = None         # autoencoder_kl: the measured latent scale s
    evaluation: dict[str, Any] = dataclasses.field(default_factory=dict)  # eval.json, when written


def check_kind(workdir: str | os.PathLike, kind: str, expected: tuple[str, ...]) -> None:
    """A one-line ValueError when a run of ``kind`` is read where one of ``expected`` is needed."""
    if kind not in expected:
        wanted = " or ".join(f"{'an' if k[0] in 'aeiou' else 'a'} {k}" for k in expected)
        raise ValueError(f"workdir {os.fspath(workdir)!r} holds a model.kind={kind!r} run, not {wanted} one")


def read_evaluation(workdir: str | os.PathLike) -> dict[str, Any]:
    """``<workdir>/eval.json`` as a dict ({} when it has not been written)."""
    path = pathlib.Path(workdir) / EVAL_FILENAME
    return json.loads(path.read_text()) if path.is_file() else {}


def load_run(workdir: str | os.PathLike, ema: bool = True, kinds: tuple[str, ...] = RUN_KINDS,
             step: int | None = None) -> TrainedRun:
    """Any trained workdir (latest checkpoint, or ``step``; EMA parameters by default, = the raw ones without EMA).

    ``kinds``: the kinds of run the caller can use; another kind is a one-line ValueError before anything is read.

    Raises FileNotFoundError naming what is missing (the workdir, config.json, a checkpoint, tokenizer/,
    an AutoencoderKL's eval.json with its scaling factor), and ``checkpoints.CheckpointDamaged`` (a
    ValueError: which step folder, what is wrong, which older ``step`` to pass) for a damaged checkpoint.
    """
    path = pathlib.Path(workdir)
    config = config_lib.load_workdir_config(path)
    kind = run_kind(config)
    check_kind(workdir, kind, kinds)
    tokenizer, scaling_factor = None, None
    evaluation = read_evaluation(path)
    if kind == "diffusion":
        model = UNet(unet_config(config))
    elif kind == "gaussian_vae":
        model = GaussianVAE(gaussian_vae_config(config))
    elif kind == "autoencoder_kl":
        if "scaling_factor" not in evaluation:
            raise FileNotFoundError(f"{path / EVAL_FILENAME} does not exist: the scaling factor is measured at the end "
                                    f"of training; finish it with `ddpm-jax train-vae --config <config> --workdir {path}`")
        scaling_factor = float(evaluation["scaling_factor"])
        model = AutoencoderKL(dataclasses.replace(autoencoder_kl_config(config), scaling_factor=scaling_factor))
    elif kind == "flow":
        model = Flow(flow_config(config))
    else:
        tokenizer_dir = path / TOKENIZER_DIR
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"workdir {os.fspath(workdir)!r} has no {TOKENIZER_DIR}/ folder; was it written "
                                    "by ddpm-jax train-clip?")
        tokenizer = load_tokenizer(tokenizer_dir, context_length=int(config.tokenizer.context_length))
        model = CLIPModel(clip_config(config))
    params = checkpoints.load_params(path, ema=ema, step=step)
    step = checkpoints.latest_step(path) if step is None else step
    return TrainedRun(path, kind, config, step, model, params, tokenizer, scaling_factor, evaluation)


# ================================================================================================
# Typed views
# ================================================================================================

def load_autoencoder(workdir: str | os.PathLike, ema: bool = True) -> tuple[AutoencoderKL, PyTree, float]:
    """The AutoencoderKL trained in ``workdir``: (model, params, scaling_factor).

    ``model.config.scaling_factor`` is the measured one from ``workdir/eval.json``, so
    ``model.apply({"params": params}, x, method=AutoencoderKL.encode_latents)`` gives unit-variance
    latents and ``decode_latents`` inverts it.
    """
    run = load_run(workdir, ema, ("autoencoder_kl",))
    return run.model, run.params, run.scaling_factor


def load_gaussian_vae(workdir: str | os.PathLike, ema: bool = True) -> tuple[GaussianVAE, PyTree]:
    """The Gaussian VAE trained in ``workdir``: (module, params)."""
    run = load_run(workdir, ema, ("gaussian_vae",))
    return run.model, run.params


def load_flow(workdir: str | os.PathLike, ema: bool = True) -> tuple[Flow, PyTree]:
    """The normalizing flow trained in ``workdir``: (module, params); ``Flow.sample`` / ``Flow.log_likelihood``."""
    run = load_run(workdir, ema, ("flow",))
    return run.model, run.params


def load_clip_model(workdir: str | os.PathLike, ema: bool = True
                    ) -> tuple[CLIPModel, PyTree, Tokenizer, ml_collections.ConfigDict]:
    """(CLIPModel, params, tokenizer, config) of a `ddpm-jax train-clip` workdir."""
    run = load_run(workdir, ema, ("clip",))
    return run.model, run.params, run.tokenizer, run.config


def load_clip_text(workdir: str | os.PathLike, ema: bool = True
                   ) -> tuple[CLIPTextModelWithProjection, PyTree, Tokenizer]:
    """The text side of a CLIP workdir: (text model, its params, tokenizer).

    ``text_model.apply({"params": params}, tokenizer(prompts))`` → ``CLIPEncoderOutput`` with
    ``last_hidden_state`` [B, T, D] (per-token states, what cross-attention reads), ``pooled`` and
    ``embeds`` (in the joint space, comparable with the image embeddings).
    """
    model, params, tokenizer, _ = load_clip_model(workdir, ema)
    text_params = {"text_model": params["text_model"], "text_projection": params["text_projection"]}
    return CLIPTextModelWithProjection(model.config.text), text_params, tokenizer


def load_text_encoder(clip_workdir: str | os.PathLike, layer: int = -1) -> TextEncoder:
    """τ(y) of latent text-to-image diffusion: the text side of a CLIP workdir (EMA parameters)."""
    model, params, tokenizer = load_clip_text(clip_workdir)
    return TextEncoder(tokenizer, model, params, layer)


def load_latent_codec(autoencoder_workdir: str | os.PathLike) -> LatentCodec:
    """E, D of latent diffusion: the AutoencoderKL of a `ddpm-jax train-vae` workdir with its scaling factor."""
    model, params, _ = load_autoencoder(autoencoder_workdir)
    return LatentCodec(model, params)


def clip_denoised(config: ml_collections.ConfigDict) -> bool:
    """Whether sampling clips x̂_0 to [-1, 1]: ``sample.clip_denoised``, by default on in pixel space and off
    for latents (which have no such range)."""
    return bool(config.sample.get("clip_denoised", not config.get("latent", {}).get("autoencoder", None)))


def stage_workdir(workdir: str | os.PathLike, named: str | os.PathLike) -> pathlib.Path:
    """A first-stage workdir that the config of the run in ``workdir`` names (``latent.autoencoder``,
    ``condition.clip_workdir``): the path as written if it is a folder (a relative one is relative to the folder the
    run was trained from, e.g. ``runs/autoencoder_kl_mnist`` from the repository), else the folder of that name
    beside the run (``runs/ldm_text_mnist`` → ``runs/autoencoder_kl_mnist``), so that a run and its stages can be
    read from any current folder (a notebook's) or moved together. Neither: the path as written (loading it then
    fails with the usual one-line error)."""
    path = pathlib.Path(named)
    beside = pathlib.Path(workdir).parent / path.name
    return beside if not path.is_dir() and beside.is_dir() else path


def load_diffusion_model(workdir: str | os.PathLike, ema: bool = True, step: int | None = None) -> DiffusionModel:
    """A `ddpm-jax train` workdir (pixel or latent; unconditional, class- or text-conditional) as a
    :class:`DiffusionModel` (latest checkpoint, or ``step``), with its frozen autoencoder and text encoder read
    from their workdirs."""
    run = load_run(workdir, ema, ("diffusion",), step)
    config = run.config
    autoencoder = config.get("latent", {}).get("autoencoder", None)
    kind = condition_kind(config)
    text_encoder, null = None, {}
    if kind == "text":
        text_encoder = load_text_encoder(stage_workdir(workdir, config.condition.clip_workdir),
                                         int(config.condition.get("layer", -1)))
        null["context"] = text_encoder([""])[0]                                             # [L, D]
    elif kind == "class":
        null["label"] = np.asarray(guidance.null_class_label(int(config.condition.num_classes)), np.int32)
    return diffusion_model_from_config(
        config, run.model, run.params, codec=load_latent_codec(stage_workdir(workdir, autoencoder)) if autoencoder else None,
        text_encoder=text_encoder, null_condition=null,
        description=f"workdir {os.fspath(workdir)} (step {run.step}, {'EMA' if ema else 'raw'} parameters)")


def diffusion_model_from_config(config: ml_collections.ConfigDict, unet: UNet, params: PyTree, *,
                                codec: LatentCodec | None = None, text_encoder: TextEncoder | None = None,
                                null_condition: dict[str, np.ndarray] | None = None, description: str = ""
                                ) -> DiffusionModel:
    """The :class:`DiffusionModel` a diffusion ``config`` describes (schedule, prediction, variance, clipping,
    sampler defaults), around ``unet`` and ``params`` (None while training: the sampler takes them)."""
    size = int(config.model.sample_size)
    return DiffusionModel(
        unet=unet, params=params, schedule=get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps),
        x0_shape=(size, size, int(config.model.in_channels)),
        prediction=config.diffusion.get("prediction", "eps"), variance=config.diffusion.variance,
        clip_denoised=clip_denoised(config), sampler=config.sample.get("sampler", "ddim"),
        steps=int(config.sample.get("steps", 50)), eta=float(config.sample.get("eta", 0.0)),
        guidance_scale=float(config.sample.get("guidance", 1.0)), kind=condition_kind(config),
        null_condition=dict(null_condition or {}), codec=codec, text_encoder=text_encoder, config=config,
        description=description)
