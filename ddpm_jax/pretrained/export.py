"""``ddpm-jax export``: a trained workdir → the folder diffusers / transformers read, weights as safetensors.

The inverse of the loaders, through the same mapping read backwards (``convert.export_state_dict``,
the ``*_to_diffusers`` config functions next to the ``*_from_diffusers`` ones), so that each folder
loads back here into exactly the parameters it was written from:

========================  =======================================================================================
run (``workdir.load_run``)  folder written
========================  =======================================================================================
pixel diffusion           a ``DDPMPipeline`` folder: ``model_index.json``, ``unet/`` (UNet2DModel; a class-conditional
(``ddpm-jax train``)      run sets ``num_class_embeds`` = classes + 1, the last label being ∅), ``scheduler/``
                          (DDPMScheduler with the run's β's, prediction, variance and clipping). Read back by
                          ``ddpm-jax sample --pretrained`` (``pipelines.generate.load_pretrained_ddpm``) and by
                          ``diffusers.DDPMPipeline.from_pretrained``.
AutoencoderKL             an ``AutoencoderKL`` folder (``config.json`` with the measured ``scaling_factor``,
(``train-vae``)           ``diffusion_pytorch_model.safetensors``): ``pretrained.diffusers.load_vae``.
CLIP (``train-clip``)     a transformers ``CLIPModel`` folder (``config.json``, ``model.safetensors``) with the
                          tokenizer's ``vocab.json`` / ``merges.txt``: ``pretrained.transformers_clip.load_clip``.
text-to-image latent      a ``StableDiffusionPipeline`` folder: ``unet/`` (UNet2DConditionModel), ``vae/`` and
diffusion                 ``text_encoder/`` (CLIPTextModel) from the run's autoencoder and CLIP workdirs,
(``ddpm-jax train``)      ``tokenizer/`` (``model_max_length`` = the CLIP run's context), ``scheduler/``:
                          ``pipelines.stable_diffusion.StableDiffusion.from_pretrained`` and diffusers' pipeline.
========================  =======================================================================================

EMA parameters by default (``ema=False``: the raw ones; the first stages of a text-to-image run are always
their EMA ones, as the run trained and samples with them). A Gaussian VAE, a latent run without text and a
pixel text-conditional run have no such folder: a one-line ValueError says so.

Layers: this module is a reader's inverse and sits with them in the "readers" layer; it reads runs
through ``workdir`` (same layer; ``workdir`` imports nothing from ``pretrained``, so there is no cycle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.numpy import save_file

from ddpm_jax import workdir as workdir_lib
from ddpm_jax.models.clip import CLIPModel
from ddpm_jax.models.unet import UNet
from ddpm_jax.models.vae import AutoencoderKL
from ddpm_jax.pretrained.convert import Params, export_state_dict
from ddpm_jax.pretrained.diffusers import (
    DIFFUSERS_FORMAT_VERSION,
    autoencoder_kl_config_to_diffusers,
    ddpm_scheduler_config_to_diffusers,
    unet_config_to_diffusers,
)
from ddpm_jax.pretrained.state_dict import DIFFUSERS_STEM, SAFETENSORS_SUFFIX, TRANSFORMERS_STEM
from ddpm_jax.pretrained.transformers_clip import (
    TRANSFORMERS_FORMAT_VERSION,
    clip_config_to_transformers,
    clip_text_config_to_transformers,
    transformers_clip_key,
)
from ddpm_jax.tokenizer import Tokenizer

# safetensors metadata torch writes (transformers refuses a file without a known "format")
SAFETENSORS_METADATA = {"format": "pt"}


def write_json(path: Path, config: dict[str, Any]) -> Path:
    """A config as diffusers / transformers write it: indent 2, keys sorted, a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def save_model_folder(folder: Path, config: dict[str, Any], params: Params, stem: str,
                      rename: Callable[[str], str] = lambda key: key) -> list[Path]:
    """``folder/config.json`` + ``folder/{stem}.safetensors`` (the params through ``export_state_dict``)."""
    weights = folder / f"{stem}{SAFETENSORS_SUFFIX}"
    written = [write_json(folder / "config.json", config)]
    save_file(export_state_dict(params, rename), weights, metadata=SAFETENSORS_METADATA)
    return [*written, weights]


def save_unet(folder: Path, unet: UNet, params: Params) -> list[Path]:
    """A diffusers UNet2DModel / UNet2DConditionModel folder (``pretrained.diffusers.load_unet`` reads it)."""
    return save_model_folder(folder, unet_config_to_diffusers(unet.config), params, DIFFUSERS_STEM)


def save_vae(folder: Path, vae: AutoencoderKL, params: Params) -> list[Path]:
    """A diffusers AutoencoderKL folder (``pretrained.diffusers.load_vae`` reads it)."""
    return save_model_folder(folder, autoencoder_kl_config_to_diffusers(vae.config), params, DIFFUSERS_STEM)


def save_clip(folder: Path, clip: CLIPModel, params: Params, tokenizer: Tokenizer | None = None) -> list[Path]:
    """A transformers CLIPModel folder (``pretrained.transformers_clip.load_clip`` reads it), with the
    tokenizer's vocab.json / merges.txt beside it (what ``CLIPTokenizer.from_pretrained`` reads)."""
    token_ids = None if tokenizer is None else {"bos_token_id": tokenizer.bos_token_id,
                                                "pad_token_id": tokenizer.pad_token_id}
    written = save_model_folder(folder, clip_config_to_transformers(clip.config, token_ids), params,
                                TRANSFORMERS_STEM, rename=transformers_clip_key)
    if tokenizer is not None:
        tokenizer.save(folder)
        written += [folder / "vocab.json", folder / "merges.txt"]
    return written


def save_clip_text(folder: Path, clip: CLIPModel, params: Params, tokenizer: Tokenizer) -> list[Path]:
    """A transformers CLIPTextModel folder of a CLIP run's text tower (Stable Diffusion's ``text_encoder/``;
    ``pretrained.transformers_clip.load_clip_text`` reads it)."""
    config = clip_text_config_to_transformers(clip.config.text, {"bos_token_id": tokenizer.bos_token_id,
                                                                 "pad_token_id": tokenizer.pad_token_id})
    config.update(architectures=["CLIPTextModel"], dtype="float32", transformers_version=TRANSFORMERS_FORMAT_VERSION)
    return save_model_folder(folder, config, {"text_model": params["text_model"]}, TRANSFORMERS_STEM,
                             rename=transformers_clip_key)


def save_tokenizer(folder: Path, tokenizer: Tokenizer) -> list[Path]:
    """vocab.json + merges.txt + special_tokens_map.json, and tokenizer_config.json with the context length
    (``model_max_length``: what diffusers' pipelines pad prompts to)."""
    tokenizer.save(folder)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.context_length,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": tokenizer.pad_token}
    return [folder / "vocab.json", folder / "merges.txt", write_json(folder / "tokenizer_config.json", config)]


def scheduler_config_of_run(config: Any) -> dict[str, Any]:
    """The DDPMScheduler config of a diffusion run's ``config`` (schedule, T, prediction, variance, clipping)."""
    d = config.diffusion
    return ddpm_scheduler_config_to_diffusers(
        d.schedule, int(d.num_timesteps), prediction=d.get("prediction", "eps"), variance=d.variance,
        clip_sample=workdir_lib.clip_denoised(config))


def export_pixel_diffusion(run: workdir_lib.TrainedRun, out: Path) -> list[Path]:
    """A pixel diffusion run → a diffusers DDPMPipeline folder (unet/, scheduler/, model_index.json)."""
    written = save_unet(out / "unet", run.model, run.params)
    written.append(write_json(out / "scheduler" / "scheduler_config.json", scheduler_config_of_run(run.config)))
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    return [write_json(out / "model_index.json", index), *written]


# model_index.json of a StableDiffusionPipeline without safety checker or feature extractor
STABLE_DIFFUSION_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
    "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def export_text_to_image(run: workdir_lib.TrainedRun, out: Path) -> list[Path]:
    """A text-to-image latent diffusion run (Rombach et al. 2022, §3.3: ε_θ(z_t, t, τ(y)) on the latents of a
    frozen AutoencoderKL) → a StableDiffusionPipeline folder: unet/ (UNet2DConditionModel), vae/ (the run's
    autoencoder workdir, its measured scaling factor), text_encoder/ (CLIPTextModel: the CLIP workdir's text
    tower), tokenizer/, scheduler/ and model_index.json. The pipeline feeds the text tower's last layer to the
    U-Net; a run conditioned on the penultimate one (``condition.layer = -2``, "clip skip") gets the same
    components without model_index.json (give diffusers ``clip_skip=1`` when calling it)."""
    autoencoder = workdir_lib.load_run(workdir_lib.stage_workdir(run.path, run.config.latent.autoencoder),
                                       kinds=("autoencoder_kl",))
    clip = workdir_lib.load_run(workdir_lib.stage_workdir(run.path, run.config.condition.clip_workdir), kinds=("clip",))
    written = [*save_unet(out / "unet", run.model, run.params),
               *save_vae(out / "vae", autoencoder.model, autoencoder.params),
               *save_clip_text(out / "text_encoder", clip.model, clip.params, clip.tokenizer),
               *save_tokenizer(out / "tokenizer", clip.tokenizer),
               write_json(out / "scheduler" / "scheduler_config.json", scheduler_config_of_run(run.config))]
    if int(run.config.condition.get("layer", -1)) == -1:
        written.insert(0, write_json(out / "model_index.json", STABLE_DIFFUSION_INDEX))
    return written


def export_run(workdir: str | os.PathLike, out: str | os.PathLike, ema: bool = True) -> list[Path]:
    """Writes the run in ``workdir`` (latest checkpoint, EMA parameters unless ``ema=False``) as the folder
    its format's tools read (see the module docstring) into ``out``; returns the files written.

    Raises ValueError (one line) for a run with no diffusers / transformers equivalent, and when ``out``
    is the workdir itself or a non-empty folder that is not an earlier export.
    """
    out_path = Path(out)
    if out_path.resolve() == Path(workdir).resolve():
        raise ValueError(f"--out {os.fspath(out)!r} is the workdir itself; give a new folder")
    if out_path.exists() and any(out_path.iterdir()) and not (
            (out_path / "model_index.json").is_file() or (out_path / "config.json").is_file()):
        raise ValueError(f"--out {os.fspath(out)!r} is a non-empty folder that is not an export; give a new folder")
    run = workdir_lib.load_run(workdir, ema)
    if run.kind == "diffusion":
        latent = run.config.get("latent", {}).get("autoencoder", None)
        text = run.config.get("condition", {}).get("kind", "none") == "text"
        if latent and text:
            return export_text_to_image(run, out_path)
        if latent or text:
            raise ValueError(f"workdir {os.fspath(workdir)!r} is a {'latent' if latent else 'pixel text-conditional'} "
                             "diffusion run: only pixel DDPMs and text-to-image latent runs are exported (export "
                             "its autoencoder / CLIP workdirs separately)")
        return export_pixel_diffusion(run, out_path)
    if run.kind == "autoencoder_kl":
        return save_vae(out_path, run.model, run.params)
    if run.kind == "clip":
        return save_clip(out_path, run.model, run.params, run.tokenizer)
    raise ValueError(f"workdir {os.fspath(workdir)!r} holds a {run.kind} run, which has no diffusers or "
                     "transformers equivalent; export diffusion, autoencoder_kl or clip runs")


__all__ = ["SAFETENSORS_METADATA", "STABLE_DIFFUSION_INDEX", "export_pixel_diffusion", "export_run",
           "export_text_to_image", "save_clip", "save_clip_text", "save_model_folder", "save_tokenizer", "save_unet",
           "save_vae", "scheduler_config_of_run", "write_json"]
