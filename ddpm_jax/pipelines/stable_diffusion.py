"""Stable Diffusion v1 (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models")
from our own pieces, running the released weights.

The block diagram, with the shapes for one 512×512 image (B prompts; SD v1: D = 768, f = 8)::

    prompt  ──tokenizer.py──► ids [B, 77] ──CLIP text transformer (models/clip.py)──► c [B, 77, D]
    "" or a negative prompt ──────────── same ──────────────────────────────────────► ∅ [B, 77, D]

    z_T ~ N(0, I)                                                       [B, 64, 64, 4]   (H/f, W/f)
    for i = 0 … N−1  (a scheduler from schedulers.py: DDPM, DDIM, PNDM, Euler, …; schedulers.run):
        ε̂ = ε_θ(z, t_i, ∅) + w (ε_θ(z, t_i, c) − ε_θ(z, t_i, ∅))         U-Net on [2B, 64, 64, 4] (guidance.py)
        z = step(z, ε̂, i)                                               [B, 64, 64, 4]
    x = VAE decoder(z / 0.18215)  (models/vae.py)                       [B, 512, 512, 3] in [−1, 1]

Everything after the text encoder is ONE compiled program (``jax.jit`` of the ``lax.scan`` over the N
steps and the decoder); the prompt states c, ∅ and the guidance scale w are its traced arguments, so
new prompts or a new w do not recompile. The batch is split over every device (``parallel.py``'s
"data" axis); the parameters are replicated.

img2img is SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations"): encode the image, z_0 = s·E(x); noise it to the point s·N of the grid,
z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε (DDPM Eq. 4, ``diffusion.q_sample``; in σ-space z_0 + σ_t ε: the
scheduler's ``add_noise``); then run the remaining steps of the same loop, with any scheduler (a multistep one
restarted there: ``init_state(N, z, start)``, as diffusers' ``set_begin_index``).

Inpainting (``inpaint``; ``pipelines/inpainting.py``) repaints under a mask, as diffusers'
``StableDiffusionInpaintPipeline``: SD's 9-channel inpainting U-Net reads [z_t, m↓, s·E(x ⊙ (1 − m))]; a plain
U-Net has the known region blended back, noised to the next grid point, after each step.

Randomness follows the library's noise-key rule (``schedulers.py``): ``key_x_T, key_steps =
jax.random.split(jax.random.key(seed))``; txt2img draws z_T from ``key_x_T``, img2img splits ``key_x_T`` into
the VAE's sampling key and the SDEdit noise; step i draws from ``fold_in(key_steps, i)``.

SDXL base (Podell et al. 2023) is the same pipeline with a second text encoder (``text_encoder_2``: OpenCLIP
ViT-bigG with its projection): c = [τ₁(y); τ₂(y)] (both penultimate layers, [B, 77, 2048]), plus the U-Net's added
conditioning, the pooled embedding W_t τ₂(y)[eot] [B, 1280] and six time ids (``sdxl_time_ids``); ∅ = zeros when
no negative prompt is given (``force_zeros_for_empty_prompt``); z / 0.13025 (the VAE config's scaling factor).
The second encoder may read its own text y₂ (``prompts_2``, diffusers' ``prompt_2``), and ∅ its own time ids
(``micro_conditioning``: diffusers' ``negative_original_size`` …).
Its diagram with every shape: ``docs/stable_diffusion.md``; checked against ``StableDiffusionXLPipeline`` in
``tests/test_sdxl.py``.

The SDXL refiner (Podell et al. 2023 §2.5) is the same pipeline with ``text_encoder_2`` alone (c = τ₂(y),
[B, 77, 1280]) and five time ids, an aesthetic score in place of the target size (``refiner_time_ids``); base →
refiner (the "ensemble of expert denoisers") cuts one N-step grid where diffusers does, at t_c = round(T − f·T):
the base's ``txt2img(denoising_end=f)`` stops there and returns the latents undecoded, the refiner's
``img2img(init_latents=…, denoising_start=f)`` runs the rest (``txt2img_with_refiner``; checked against diffusers'
two-pipeline run in ``tests/test_sdxl_refiner.py``).

LoRAs (Hu et al. 2022; ``pretrained/lora.py``): ``load_lora`` adds W' = W + s·(α/r)·B A to the U-Net's and the text
encoders' layers, on the fly inside the compiled program with s traced (``set_lora_scales`` does not recompile),
several at once, ``fuse_lora`` merges them into the weights, ``unload_lora`` restores the original arrays.

Weights: a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``), with diffusers' file variants ("fp16", "non_ema"), or a single-file
checkpoint, SD v1 / 2.x (CompVis ldm layout) or SDXL base and refiner (Stability's sgm layout) (``pretrained/compvis.py``).
Everything is checked against diffusers'
``StableDiffusionPipeline`` in ``tests/test_stable_diffusion.py``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ddpm_jax import guidance, parallel, plotting, png_metadata, schedulers
from ddpm_jax.diffusion_model import TextEncoder
from ddpm_jax.models.clip import CLIPTextModelWithProjection, CLIPTextTransformer
from ddpm_jax.models.unet import UNet
from ddpm_jax.models.vae import AutoencoderKL
from ddpm_jax.pipelines import inpainting
from ddpm_jax.pipelines.cross_attention import prompt_tokens, save_attention_overlays, token_attention_maps
from ddpm_jax.pretrained import compvis, lora
from ddpm_jax.pretrained.convert import Params, random_params
from ddpm_jax.pretrained.export import export_run
from ddpm_jax.pretrained.diffusers import load_unet, load_vae
from ddpm_jax.pretrained.transformers_clip import load_clip_text
from ddpm_jax.progress import progress_bar
from ddpm_jax.tokenizer import Tokenizer, bytes_to_unicode, load_tokenizer

Array = jax.Array

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = COMPONENTS + ("text_encoder_2", "tokenizer_2")  # + OpenCLIP ViT-bigG and its tokenizer
REFINER_COMPONENTS = ("unet", "vae", "scheduler", "text_encoder_2", "tokenizer_2")  # the SDXL refiner: ViT-bigG only
# SDXL's six "time ids" (Podell et al. 2023 §2.2), in the order the U-Net reads them (``sdxl_time_ids``)
SDXL_TIME_IDS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")
# the refiner's five (§2.5, diffusers' requires_aesthetics_score): the target size replaced by an aesthetic score
REFINER_TIME_IDS = ("original_height", "original_width", "crop_top", "crop_left", "aesthetic_score")
# the micro-conditioning arguments base and refiner share (``txt2img_with_refiner`` gives them to both)
REFINER_SHARED = ("original_size", "crops_coords_top_left", "negative_original_size", "negative_crops_coords_top_left")
SDXL_PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")  # base; the refiner's
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline",  # model_index.json _class_name we read
                    *SDXL_PIPELINE_CLASSES)                                       # (the inpainting one: a 9-channel U-Net)
DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}
# Stable Diffusion v1's scheduler_config.json (PNDM), for single-file checkpoints that carry none.
SD_V1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False,
}
# SDXL base's scheduler_config.json (Euler), and which one a single file without a config folder gets, by layout
# (SD 2.x files are mostly 2.1-768, v-prediction: diffusers' default for them too; pass prediction_type otherwise).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
}
SINGLE_FILE_SCHEDULERS = {"sd_v1": SD_V1_SCHEDULER_CONFIG, "sdxl": SDXL_SCHEDULER_CONFIG,
                          "sdxl_refiner": SDXL_SCHEDULER_CONFIG,
                          "sd_v2": SD_V1_SCHEDULER_CONFIG | {"prediction_type": "v_prediction"}}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ================================================================================================
# Weights
# ================================================================================================

def resolve_dtype(dtype: Any) -> Any:
    """"float32"/"bf16"/"fp16"/a jnp dtype → the jnp dtype; float16 on a CPU backend is refused (XLA's CPU
    float16 kernels are emulated and much slower than float32: use bf16 or float32 there)."""
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if dtype == jnp.float16 and jax.default_backend() == "cpu":
        raise ValueError("float16 weights need a GPU; on the CPU backend use dtype='bf16' or 'float32'")
    return dtype


def resolve_path(path: str | Path, variant: str | None = None) -> Path:
    """A local folder/file as is; a hub id ("org/name") through huggingface_hub if installed and online."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    if not _HUB_ID.match(str(path)):
        raise FileNotFoundError(f"{path} does not exist; pass a diffusers Stable Diffusion folder or a "
                                f"single-file .safetensors/.ckpt checkpoint")
    hint = f"download it (e.g. `huggingface-cli download {path}`) and pass the local folder"
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError(f"{path!r} is not a local folder and huggingface_hub is not installed: {hint}") from None
    suffix = f".{variant}" if variant else ""
    patterns = ["*.json", "tokenizer/*", "tokenizer_2/*", f"unet/diffusion_pytorch_model{suffix}.safetensors",
                f"vae/diffusion_pytorch_model{suffix}.safetensors", f"text_encoder/model{suffix}.safetensors",
                f"text_encoder_2/model{suffix}.safetensors"]
    try:
        return Path(huggingface_hub.snapshot_download(str(path), allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, gated, …: all mean "use a local folder"
        raise ValueError(f"{path!r} is not a local folder and the Hugging Face hub could not provide it "
                         f"({type(err).__name__}): {hint}") from None


def folder_components(index: dict[str, Any]) -> tuple[str, ...]:
    """The component folders model_index.json asks for: SD v1/2.x's five, SDXL base's seven, the SDXL refiner's five
    (a StableDiffusionXLImg2ImgPipeline whose text_encoder and tokenizer are null: text_encoder_2 alone)."""
    class_name = index.get("_class_name")
    if class_name == "StableDiffusionXLImg2ImgPipeline" and (index.get("text_encoder") or [None])[0] is None:
        return REFINER_COMPONENTS
    return SDXL_COMPONENTS if class_name in SDXL_PIPELINE_CLASSES else COMPONENTS


def check_folder(folder: Path) -> dict[str, Any]:
    """A diffusers Stable Diffusion folder: model_index.json and the component folders it needs
    (``folder_components``). Returns model_index.json."""
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    class_name = index.get("_class_name")
    if class_name is not None and class_name not in PIPELINE_CLASSES:
        raise ValueError(f"{index_file} is a {class_name}; StableDiffusion reads {', '.join(PIPELINE_CLASSES)} folders")
    components = folder_components(index)
    missing = [name + "/" for name in components if not (folder / name).is_dir()]
    missing = (["model_index.json"] if not index_file.is_file() else []) + missing
    if missing:
        kind = {SDXL_COMPONENTS: "SDXL", REFINER_COMPONENTS: "SDXL refiner"}.get(components, "Stable Diffusion")
        raise FileNotFoundError(f"{folder} is not a diffusers {kind} folder: missing {', '.join(missing)} "
                                f"(expected model_index.json, {', '.join(c + '/' for c in components)})")
    unet_class = (index.get("unet") or [None, None])[1]
    if unet_class not in (None, "UNet2DConditionModel"):
        raise ValueError(f"{folder}/model_index.json has unet {unet_class!r}; Stable Diffusion needs UNet2DConditionModel")
    return index


def load_text_encoder(folder: Path, variant: str | None = None) -> tuple[CLIPTextTransformer, Params]:
    """SD's ``text_encoder/``: a transformers CLIPTextModel (config.json + ``model[.variant].safetensors``)."""
    module, params = load_clip_text(folder, variant=variant)
    if not isinstance(module, CLIPTextTransformer):
        raise ValueError(f"{folder} holds a CLIPTextModelWithProjection; Stable Diffusion v1's text encoder is a "
                         f"CLIPTextModel")
    return module, params


def load_text_encoder_2(folder: Path, variant: str | None = None) -> tuple[CLIPTextModelWithProjection, Params]:
    """SDXL's ``text_encoder_2/``: a transformers CLIPTextModelWithProjection (OpenCLIP ViT-bigG in transformers'
    layout), whose projected pooled output is the U-Net's ``text_embeds``."""
    module, params = load_clip_text(folder, variant=variant)
    if not isinstance(module, CLIPTextModelWithProjection):
        raise ValueError(f"{folder} holds a CLIPTextModel; SDXL's text_encoder_2 is a CLIPTextModelWithProjection "
                         f"(its pooled, projected output conditions the U-Net)")
    return module, params


def _cast(params: Params, dtype: Any) -> Params:
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


# ================================================================================================
# The pipeline
# ================================================================================================

@dataclasses.dataclass(eq=False)
class StableDiffusion:
    """Tokenizer → CLIP text encoder → U-Net with cross-attention stepped by a scheduler → VAE decoder.

    SDXL (Podell et al. 2023) is the same pipeline with a second text encoder, ``text_encoder_2`` (OpenCLIP
    ViT-bigG, a CLIPTextModelWithProjection) and its ``tokenizer_2``: both encoders' penultimate states are
    concatenated into the context, the second one's projected pooled output is the U-Net's ``text_embeds``, and
    the six ``time_ids`` (``sdxl_time_ids``) complete the U-Net's added conditioning; with
    ``force_zeros_for_empty_prompt`` (model_index.json; true for SDXL base) ∅ is zeros when no negative prompt
    is given, as in diffusers.

    The SDXL refiner (Podell et al. 2023 §2.5; diffusers' StableDiffusionXLImg2ImgPipeline with
    ``requires_aesthetics_score``) has ``text_encoder_2`` alone (no ``text_encoder``/``tokenizer``: its context is
    τ₂(y), 1280 wide) and five time ids, an aesthetic score in place of the target size (``refiner_time_ids``).
    It is an img2img model, trained on the low noise levels: base → refiner is ``txt2img(denoising_end=0.8)`` then
    ``img2img(init_latents=…, denoising_start=0.8)`` (``txt2img_with_refiner``).

    ``params`` = {"text_encoder", "unet", "vae"} (+ "text_encoder_2"; the refiner: no "text_encoder");
    ``trace_count`` counts compilations of the sampling program (for tests: new prompts, guidance or LoRA scales
    must not add any). ``loras``: the LoRAs loaded by ``load_lora`` (``lora.LoRASet``; shared with
    ``with_scheduler``'s copies).
    """

    tokenizer: Tokenizer | None                                 # None: the SDXL refiner
    text_encoder: CLIPTextTransformer | None                    # None: the SDXL refiner
    unet: UNet
    vae: AutoencoderKL
    scheduler: schedulers.Scheduler
    params: dict[str, Params]
    mesh: Any = None
    text_encoder_2: CLIPTextModelWithProjection | None = None   # SDXL only
    tokenizer_2: Tokenizer | None = None                        # SDXL only
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False                     # the SDXL refiner's time ids (REFINER_TIME_IDS)
    source: str | None = None                                   # what from_pretrained read (recorded in PNGs)

    def __post_init__(self):
        self._check_components()
        self.mesh = self.mesh if self.mesh is not None else parallel.make_mesh()
        self._replicated = parallel.replicated_sharding(self.mesh)
        if self.mesh.devices.size > 1:
            self.params = jax.device_put(self.params, self._replicated)
        layer = -2 if self.is_sdxl else -1  # SDXL reads both encoders' penultimate states (hidden_states[-2])
        self.text = (TextEncoder(self.tokenizer, self.text_encoder, self.params["text_encoder"], layer)
                     if self.text_encoder is not None else None)
        self.text_2 = (TextEncoder(self.tokenizer_2, self.text_encoder_2, self.params["text_encoder_2"], -2)
                       if self.is_sdxl else None)
        self._programs: dict[tuple, Callable] = {}
        self._encoder = jax.jit(self._encode)
        self._bar = None
        self.trace_count = 0
        self.loras = lora.LoRASet()   # load_lora / set_lora_scales / fuse_lora / unload_lora (pretrained/lora.py)

    @property
    def is_sdxl(self) -> bool:
        """True for SDXL (two text encoders, the U-Net's added conditioning), base or refiner."""
        return self.text_encoder_2 is not None

    @property
    def is_inpainting_unet(self) -> bool:
        """True for SD's inpainting U-Net, which reads [z, m↓, s·E(x ⊙ (1 − m))]: in_channels = 2·latent + 1 (9)."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    @property
    def is_refiner(self) -> bool:
        """True for the SDXL refiner: time ids with an aesthetic score (``requires_aesthetics_score``)."""
        return self.requires_aesthetics_score

    def _check_components(self) -> None:
        """One clear error for components that do not fit together (an SDXL U-Net with one text encoder, …)."""
        unet = self.unet.config
        if unet.addition_embed_type == "text_time" and not self.is_sdxl:
            raise ValueError("this U-Net takes SDXL's added conditioning (addition_embed_type='text_time': pooled text "
                             "embedding + time ids) but the pipeline has one text encoder (SD v1/2.x): SDXL needs "
                             "text_encoder_2 (a CLIPTextModelWithProjection) and tokenizer_2; load the whole SDXL folder")
        if self.text_encoder is None and not self.is_sdxl:
            raise ValueError("the pipeline has no text encoder: give text_encoder (SD v1/2.x, SDXL base) or "
                             "text_encoder_2 (the SDXL refiner)")
        if self.is_refiner and not self.is_sdxl:
            raise ValueError("requires_aesthetics_score is the SDXL refiner's time ids; this pipeline has no text_encoder_2")
        if not self.is_sdxl:
            return
        if unet.addition_embed_type != "text_time":
            raise ValueError("text_encoder_2 was given but the U-Net has no SDXL added conditioning "
                             "(addition_embed_type=None): it is not an SDXL U-Net")
        if self.tokenizer_2 is None or "text_encoder_2" not in self.params:
            raise ValueError("SDXL's text_encoder_2 needs tokenizer_2 and params['text_encoder_2'] too")
        widths = [enc.config.hidden_size for enc in (self.text_encoder, self.text_encoder_2) if enc is not None]
        if sum(widths) != unet.cross_attention_dim:
            raise ValueError(f"the text encoders give {' + '.join(map(str, widths))} context features, but the U-Net's "
                             f"cross_attention_dim is {unet.cross_attention_dim}")
        pooled, n = self.text_encoder_2.config.projection_dim, len(REFINER_TIME_IDS if self.is_refiner else SDXL_TIME_IDS)
        if pooled + n * unet.addition_time_embed_dim != unet.projection_class_embeddings_input_dim:
            hint = ("the base's take 6 (requires_aesthetics_score=False)" if self.is_refiner else
                    "the refiner's take 5 (requires_aesthetics_score=True in its model_index.json)")
            raise ValueError(f"text_encoder_2's pooled embedding ({pooled}) and {n} time ids × {unet.addition_time_embed_dim} "
                             f"give {pooled + n * unet.addition_time_embed_dim} features, but the U-Net's add_embedding "
                             f"takes {unet.projection_class_embeddings_input_dim}: {hint}")

    # --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = "float32", scheduler: str | schedulers.Scheduler | None = None,
                        variant: str | None = None, *, config_folder: str | Path | None = None,
                        tokenizer: str | Path | Tokenizer | None = None, use_ema: bool = False,
                        prediction_type: str | None = None, mesh: Any = None) -> StableDiffusion:
        """Load a diffusers folder, a single-file CompVis checkpoint (.safetensors/.ckpt), or a hub id.

        Args:
          dtype: the weights' and the computation's dtype: "float32", "bf16" (halves the memory; fine on
            CPU) or "fp16" (GPU only). Schedulers and guidance always run in float32.
          scheduler: a name (``schedulers.NAMES``: "ddim", "euler", "dpmsolver++_karras", "heun", …), a diffusers class
            name, or a scheduler object; None = the folder's own (PNDM for SD v1). Configured from the
            folder's scheduler_config.json either way.
          variant: diffusers' file variant of the diffusers folder ("fp16", "non_ema", …).
          config_folder: for a single file, a diffusers folder of the same kind whose configs, tokenizer(s) and
            scheduler to use (default: the released configs of the layout its keys show, SD v1, SD 2.x or SDXL
            base; then ``tokenizer`` is required).
          tokenizer: for a single file, a folder with vocab.json and merges.txt (or tokenizer.json), or a
            ``Tokenizer`` (e.g. an SDXL base's ``tokenizer_2`` for its refiner: ``load_refiner``).
          use_ema: for a single "full" CompVis checkpoint, take the U-Net from its ``model_ema.*`` copy.
          prediction_type: for a single file, "epsilon" or "v_prediction" (diffusers' name; the keys do not show
            it): default the config folder's scheduler's, else the release's (v-prediction for SD 2.x, as 2.1-768).
        """
        dtype = resolve_dtype(dtype)
        path = resolve_path(path, variant)
        sdxl: dict[str, Any] = {}  # SDXL's text_encoder_2, tokenizer_2, force_zeros_for_empty_prompt
        if path.is_file():
            tokenizer_obj, text_encoder, unet, vae, scheduler_config, params, sdxl = _load_single_file(
                path, config_folder, tokenizer, use_ema, prediction_type)
        else:
            index = check_folder(path)
            unet, unet_params = load_unet(path / "unet", variant)
            vae, vae_params = load_vae(path / "vae", variant)
            scheduler_config = schedulers.read_scheduler_config(path / "scheduler")
            params = {"unet": unet_params, "vae": vae_params}
            tokenizer_obj = text_encoder = None                  # the SDXL refiner has text_encoder_2 alone
            if "text_encoder" in folder_components(index):
                text_encoder, params["text_encoder"] = load_text_encoder(path / "text_encoder", variant)
                # prompts padded to the text tower's positions (77 in SD; fewer in an exported small run)
                tokenizer_obj = load_tokenizer(path / "tokenizer",
                                               context_length=text_encoder.config.max_position_embeddings)
            if "text_encoder_2" in folder_components(index):
                sdxl, params["text_encoder_2"] = _load_sdxl_parts(path, variant, index)
        if not isinstance(scheduler, tuple(schedulers.SCHEDULERS.values())):
            scheduler = schedulers.get_scheduler(scheduler, scheduler_config)
        if dtype != jnp.float32:
            params = _cast(params, dtype)
            unet = UNet(dataclasses.replace(unet.config, dtype=dtype))
            vae = AutoencoderKL(dataclasses.replace(vae.config, dtype=dtype))
            text_encoder = CLIPTextTransformer(text_encoder.config, dtype=dtype) if text_encoder is not None else None
            if sdxl:
                sdxl["text_encoder_2"] = CLIPTextModelWithProjection(sdxl["text_encoder_2"].config, dtype=dtype)
        return cls(tokenizer_obj, text_encoder, unet, vae, scheduler, params, mesh, **sdxl, source=str(path))

    @classmethod
    def from_workdir(cls, workdir: str | Path, out: str | Path, dtype: Any = "float32",
                     scheduler: str | schedulers.Scheduler | None = None) -> StableDiffusion:
        """A text-to-image latent diffusion run trained with this repo (``experiments/ldm_text_mnist.py``: its U-Net,
        the AutoencoderKL and CLIP workdirs it names) as a Stable Diffusion: written to ``out`` in diffusers' layout
        by ``export.export_run`` (what ``ddpm-jax export`` does; an earlier export there is replaced), then read
        back by :meth:`from_pretrained` (``dtype``, ``scheduler``: as there; None = the run's DDPM scheduler).

        Raises ValueError (one line) for a run whose export is not a StableDiffusionPipeline folder.
        """
        export_run(workdir, out)
        index = Path(out) / "model_index.json"
        kind = json.loads(index.read_text()).get("_class_name") if index.is_file() else "folder without model_index.json"
        if kind != "StableDiffusionPipeline":
            raise ValueError(f"workdir {str(workdir)!r} exports as a {kind}, not a StableDiffusionPipeline: give a "
                             "text-to-image latent diffusion run conditioned on CLIP's last layer "
                             "(experiments/ldm_text_mnist.py)")
        return cls.from_pretrained(out, dtype, scheduler)

    @classmethod
    def from_configs(cls, unet_config: Any, vae_config: Any, text_config: Any, scheduler: Any = None,
                     tokenizer: Tokenizer | None = None, seed: int = 0, dtype: Any = "float32",
                     mesh: Any = None, text_config_2: Any = None, refiner: bool = False) -> StableDiffusion:
        """A RANDOMLY initialised pipeline (for the notebook, benchmarks and tests without weights).

        Each network's parameters are drawn in NumPy on its traced shapes (``convert.random_params``: LeCun-normal
        kernels, unit norm scales, zero biases, as Flax's initialisers; nothing is compiled, which on a CPU saves
        seconds per network) and put on the device once. The tokenizer defaults to one over the 256 bytes (no merges), enough to feed
        random weights (the same one for both encoders); the scheduler to SD v1's PNDM, SDXL's Euler.

        SDXL: ``text_config_2`` (a ``CLIPTextConfig`` with ``projection_dim``) adds ``text_encoder_2``
        (CLIPTextModelWithProjection); the U-Net's ``addition_embed_type`` must be "text_time" and its
        ``cross_attention_dim`` the two encoders' widths together (checked with a one-line error). ∅ is zeros for
        empty prompts (``force_zeros_for_empty_prompt``, as SDXL base's model_index.json). ``refiner``: the SDXL
        refiner, ``text_encoder_2`` alone (``text_config`` None) with the aesthetic-score time ids.
        """
        dtype = resolve_dtype(dtype)
        unet = UNet(dataclasses.replace(unet_config, dtype=dtype))
        vae = AutoencoderKL(dataclasses.replace(vae_config, dtype=dtype))
        text = CLIPTextTransformer(text_config, dtype=dtype) if not refiner else None
        text_2 = CLIPTextModelWithProjection(text_config_2, dtype=dtype) if text_config_2 is not None else None
        if refiner and (text_2 is None or text_config is not None):
            raise ValueError("an SDXL refiner has text_encoder_2 alone: pass text_config=None and text_config_2")
        f = vae.config.downsampling_factor
        init = lambda module, part, *inputs: _cast(jax.device_put(  # noqa: E731
            random_params(module, *inputs, seed=[seed, part])), dtype)
        params = {
            "unet": init(unet, 0, *unet.config.input_specs(context_length=1)),
            "vae": init(vae, 1, jax.ShapeDtypeStruct((1, f, f, vae.config.in_channels), jnp.float32)),
        }
        for name, module, config, part in (("text_encoder", text, text_config, 2),
                                           ("text_encoder_2", text_2, text_config_2, 3)):
            if module is not None:
                params[name] = init(module, part, jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32))
        if not isinstance(scheduler, tuple(schedulers.SCHEDULERS.values())):
            default = SDXL_SCHEDULER_CONFIG if text_2 is not None else SD_V1_SCHEDULER_CONFIG
            scheduler = schedulers.get_scheduler(scheduler, default)
        some_config = text_config if text_config is not None else text_config_2
        tokenizer = tokenizer or byte_tokenizer(some_config.vocab_size)
        sdxl = dict(text_encoder_2=text_2, tokenizer_2=tokenizer, force_zeros_for_empty_prompt=not refiner,
                    requires_aesthetics_score=refiner) if text_2 is not None else {}
        return cls(None if refiner else tokenizer, text, unet, vae, scheduler, params, mesh, **sdxl)

    def with_scheduler(self, scheduler: str | schedulers.Scheduler, config: Any = None) -> StableDiffusion:
        """The same weights with another scheduler (configured like the current one unless ``config``)."""
        if isinstance(scheduler, str):
            scheduler = schedulers.get_scheduler(scheduler, config or self.scheduler.config)
        other = dataclasses.replace(self, scheduler=scheduler)
        # share the text encoders, the compiled image encoder and the LoRAs
        other.text, other.text_2, other._encoder, other.loras = self.text, self.text_2, self._encoder, self.loras
        return other

    # --------------------------------------------------------------------------------------------
    # LoRA (Hu et al. 2022; pretrained/lora.py, docs/stable_diffusion.md "LoRA")
    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Add a LoRA file (diffusers or kohya/A1111 format, U-Net and text encoders) at ``scale``, applied on the
        fly: W' = W + s·(α/r)·B A (``lora.merge``) inside the compiled program with s a traced argument, so
        ``set_lora_scales`` never recompiles (loading or unloading a LoRA changes the program's inputs: one new
        compilation, cached). Returns its name (default: the file's stem), the key of ``set_lora_scales``."""
        if self.loras.fused is not None:
            raise ValueError("the LoRAs are fused into the weights: unfuse_lora() before loading another")
        targets = {c: self.params[c] for c in lora.COMPONENTS if c in self.params}
        adapter = lora.read_lora(path, targets, name, self.unet.config)
        if self.mesh.devices.size > 1:
            adapter = dataclasses.replace(adapter, factors=jax.device_put(adapter.factors, self._replicated))
        self.loras.add(adapter, scale)
        self._refresh_text_encoders()
        return adapter.name

    def set_lora_scales(self, scales: float | dict[str, float]) -> None:
        """New scales s_k: one float for every loaded LoRA, or {name: s}; traced, so nothing recompiles."""
        if self.loras.fused is not None:
            raise ValueError("the LoRAs are fused into the weights at their scales: unfuse_lora() to change them")
        self.loras.set_scales(dict.fromkeys(self.loras.loras, scales) if isinstance(scales, (int, float)) else scales)
        self._refresh_text_encoders()

    @property
    def lora_files(self) -> tuple[tuple[str, float], ...]:
        """(file, scale) of each loaded LoRA, in load order: what a PNG records (``png_metadata``)."""
        return tuple((self.loras.loras[name].source, scale) for name, scale in self.loras.scales.items())

    @property
    def lora_scales(self) -> dict[str, float]:
        """{name: scale} of the loaded LoRAs, in load order."""
        return dict(self.loras.scales)

    def fuse_lora(self) -> None:
        """Merge the loaded LoRAs at their scales into the weights, W ← W' (no LoRA work left per call); the original
        arrays are kept for ``unfuse_lora`` / ``unload_lora``."""
        if not self.loras.loras:
            raise ValueError("no LoRA loaded: load_lora(path) first")
        if self.loras.fused is None:
            merged = {c: self.loras.apply(p, c) for c, p in self.params.items()}
            self.loras.fused, self.params = self.params, merged
            self._refresh_text_encoders()

    def unfuse_lora(self) -> None:
        """Back from ``fuse_lora`` to the original weights with the LoRAs applied on the fly."""
        if self.loras.fused is not None:
            self.params, self.loras.fused = self.loras.fused, None
            self._refresh_text_encoders()

    def unload_lora(self, name: str | None = None) -> None:
        """Remove the LoRA ``name`` (None: all); the original parameters are back bit for bit (also after fuse)."""
        self.unfuse_lora()
        self.loras.remove(name)
        self._refresh_text_encoders()

    def _refresh_text_encoders(self) -> None:
        if self.text is not None:                                                  # None: the SDXL refiner
            self.text.params = self.loras.apply(self.params["text_encoder"], "text_encoder")
        if self.text_2 is not None:
            self.text_2.params = self.loras.apply(self.params["text_encoder_2"], "text_encoder_2")

    # --------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsampling_factor                                    # f = 8

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at, as diffusers' default: the U-Net's sample_size × f
        (512 × 512 for SD v1, 768 for SD 2.x-v, 1024 for SDXL)."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[B, H/f, W/f, 4]; one-line errors for sizes the VAE or the U-Net cannot take."""
        f, levels = self.vae_scale_factor, 2 ** (self.unet.config.num_levels - 1)
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} (the VAE's downsampling factor), "
                             f"got {height}×{width}")
        if (height // f) % levels or (width // f) % levels:
            raise ValueError(f"height and width must be multiples of {f * levels} for this U-Net (latents divisible "
                             f"by 2^(levels−1) = {levels}), got {height}×{width}")
        return batch, height // f, width // f, self.vae.config.latent_channels

    def prompt_condition(self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None) -> dict[str, Array]:
        """prompts → the U-Net's text conditions: {"context": the text encoder's last hidden states [B, 77, D]}
        (SD v1: D = 768); SDXL: "context" = [τ₁(y); τ₂(y₂)], both encoders' penultimate states concatenated along
        the features ([B, 77, 768 + 1280]), and "text_embeds" = text_encoder_2's projected pooled output W_t τ₂(y₂)
        [B, 1280], where y₂ = ``prompts_2`` (diffusers' ``prompt_2``: the second encoder's text; default y₂ = y);
        the SDXL refiner: "context" = τ₂(y) alone [B, 77, 1280] (diffusers' encode_prompt over its one encoder)."""
        prompts = list(prompts)
        if not self.is_sdxl:
            return {"context": jnp.asarray(self.text(prompts))}                           # [B, 77, D]
        prompts_2 = prompts if prompts_2 is None else list(prompts_2)
        states_2, pooled = self.text_2.encode(prompts_2)                                    # [B, 77, D₂], [B, P]
        states = ([self.text(prompts)] if self.text is not None else []) + [states_2]     # refiner: τ₂ alone
        return {"context": jnp.concatenate([jnp.asarray(x) for x in states], axis=-1),    # [B, 77, D₁ + D₂]
                "text_embeds": jnp.asarray(pooled)}

    def encode_prompt(self, prompts: Sequence[str]) -> Array:
        """prompts → the context [B, 77, D] that cross-attention reads (``prompt_condition``'s "context")."""
        return self.prompt_condition(prompts)["context"]

    def time_ids(self, height: int, width: int, original_size: Sequence[int] | None = None,
                 crops_coords_top_left: Sequence[int] | None = None, target_size: Sequence[int] | None = None
                 ) -> np.ndarray | None:
        """SDXL's ``sdxl_time_ids`` for an image of height × width; None (and no size arguments) for SD v1/2.x.
        The refiner's are ``refiner_time_ids`` (``img2img``'s aesthetic scores)."""
        if self.is_refiner:
            raise ValueError("the SDXL refiner's time ids hold an aesthetic score, not a target size: use "
                             "refiner_time_ids (img2img's aesthetic_score, negative_aesthetic_score)")
        return self.micro_conditioning(height, width, original_size, crops_coords_top_left, target_size)[0]

    def micro_conditioning(self, height: int, width: int, original_size: Sequence[int] | None = None,
                           crops_coords_top_left: Sequence[int] | None = None, target_size: Sequence[int] | None = None,
                           negative_original_size: Sequence[int] | None = None,
                           negative_crops_coords_top_left: Sequence[int] | None = None,
                           negative_target_size: Sequence[int] | None = None, aesthetic_score: float = 6.0,
                           negative_aesthetic_score: float = 2.5) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The time ids of c and of ∅ (Podell et al. 2023 §2.2, §2.5) for an image of height × width; (None, None)
        for SD v1/2.x (which take none of these arguments).

        SDXL base: c's are ``sdxl_time_ids``; ∅'s the same unless a ``negative_*`` is given (diffusers' "negative
        micro-conditioning", e.g. negative_original_size=(512, 512) steers away from low-resolution training images),
        then ``sdxl_time_ids`` of (negative_original_size, negative_crops_coords_top_left, negative_target_size), the
        sizes defaulting to c's and the crop to (0, 0). (diffusers' txt2img uses them only when both sizes are
        given; its img2img keeps c's crop for ∅: both agree with this where they agree with each other.)
        The refiner: ``refiner_time_ids`` with ``aesthetic_score`` for c, ``negative_aesthetic_score`` with
        negative_original_size (default c's) and negative_crops_coords_top_left (default (0, 0)) for ∅, as diffusers'
        StableDiffusionXLImg2ImgPipeline; it has no target size."""
        negatives = (negative_original_size, negative_crops_coords_top_left, negative_target_size)
        if not self.is_sdxl:
            if any(v is not None for v in (original_size, crops_coords_top_left, target_size, *negatives)):
                raise ValueError("original_size, crops_coords_top_left, target_size and their negative_* are SDXL's "
                                 "micro-conditioning; this U-Net has none (addition_embed_type=None)")
            return None, None
        negative_crop = (0, 0) if negative_crops_coords_top_left is None else negative_crops_coords_top_left
        if self.is_refiner:
            if target_size is not None or negative_target_size is not None:
                raise ValueError("the SDXL refiner's time ids hold an aesthetic score in place of the target size: "
                                 "target_size and negative_target_size are the base's; give aesthetic_score instead")
            negative_size = original_size if negative_original_size is None else negative_original_size
            return (refiner_time_ids(height, width, aesthetic_score, original_size, crops_coords_top_left),
                    refiner_time_ids(height, width, negative_aesthetic_score, negative_size, negative_crop))
        time_ids = sdxl_time_ids(height, width, original_size, crops_coords_top_left, target_size)       # [6]
        if all(v is None for v in negatives):
            return time_ids, time_ids
        return time_ids, sdxl_time_ids(height, width, time_ids[0:2] if negative_original_size is None else
                                       negative_original_size, negative_crop,
                                       time_ids[4:6] if negative_target_size is None else negative_target_size)

    def _conditions(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None,
                    time_ids: np.ndarray | None = None, negative_time_ids: np.ndarray | None = None,
                    prompts_2: str | Sequence[str] | None = None, negative_prompts_2: str | Sequence[str] | None = None
                    ) -> tuple[list[str], dict[str, Array], dict[str, Array]]:
        """(prompts, c, ∅): the U-Net's condition dicts (``prompt_condition`` + SDXL's time ids: the same for both
        unless ``negative_time_ids``, ``micro_conditioning``'s). SDXL base: ``prompts_2`` / ``negative_prompts_2`` the
        second encoder's texts (diffusers' ``prompt_2`` / ``negative_prompt_2``), default the first's; ∅ = zeros
        when neither negative is given and ``force_zeros_for_empty_prompt``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if (prompts_2 is not None or negative_prompts_2 is not None) and (not self.is_sdxl or self.is_refiner):
            raise ValueError("prompts_2 / negative_prompts_2 are for SDXL base's second text encoder; this model has one "
                             "text encoder (" + ("the SDXL refiner's reads prompts, as diffusers'" if self.is_sdxl else
                                                 "SD v1/2.x") + "): put the text in prompts / negative_prompts")
        zeros = negative_prompts is None and negative_prompts_2 is None and self.force_zeros_for_empty_prompt
        negative_prompts = per_prompt(negative_prompts, len(prompts), "negative prompts") or [""] * len(prompts)
        cond = self.prompt_condition(prompts, per_prompt(prompts_2, len(prompts), "prompts_2"))
        uncond = jax.tree.map(jnp.zeros_like, cond) if zeros else self.prompt_condition(
            negative_prompts, per_prompt(negative_prompts_2, len(prompts), "negative_prompts_2"))
        if time_ids is not None:                                          # SDXL: [B, 6]; the refiner: [B, 5]
            negative_time_ids = time_ids if negative_time_ids is None else negative_time_ids
            cond["time_ids"] = jnp.broadcast_to(jnp.asarray(time_ids), (len(prompts), len(time_ids)))
            uncond["time_ids"] = jnp.broadcast_to(jnp.asarray(negative_time_ids), (len(prompts), len(time_ids)))
        return prompts, cond, uncond

    # --------------------------------------------------------------------------------------------
    def _on_step(self, i: Any) -> None:
        if self._bar is not None:  # called once per device with the (replicated) step index: idempotent
            self._bar.n = max(self._bar.n, int(i) + 1 - self._bar_start)
            self._bar.refresh()

    def _program(self, num_steps: int, start: int, end: int | None, scale_init: bool, keep_trajectory: bool,
                 sharded: bool, decode: bool = True) -> Callable:
        """The compiled sampler: (params, LoRAs, c, ∅, w, φ, z, key, inpaint) → (images, z, trajectory), c and ∅ dicts
        of U-Net condition arguments (``_conditions``), LoRAs the U-Net's factors and their traced scales
        (``LoRASet.traced``); grid steps start … end−1, z the sample after them (z_0 when the grid is run to its
        end); images None without ``decode`` (SDXL's base part of base → refiner). ``inpaint``: {} or the traced
        inputs of inpainting (``inpaint``: m↓ and the masked image's latents for a 9-channel U-Net; m↓, the image's
        latents and ε for latent blending). One per static setting (and kind of ``inpaint``)."""
        key = (num_steps, start, end, scale_init, keep_trajectory, sharded, decode)
        if key in self._programs:
            return self._programs[key]

        def run(params, loras, cond, uncond, guidance_scale, guidance_rescale, z, rng, inpaint):
            self.trace_count += 1                                                     # Python: runs at trace time only
            unet_params = lora.merge(params["unet"], *loras)        # W + Σ s_k B_k A_k, scales traced (no LoRA: W)
            eps_fn = guidance.guided_eps_fn(guidance.unet_model_fn(self.unet, unet_params),
                                            cond, uncond, guidance_scale, guidance_rescale)
            after_step = None
            if "masked_latents" in inpaint:        # SD's inpainting U-Net reads [z, m↓, s·E(x ⊙ (1 − m))]: 9 channels
                eps_fn = inpainting.unet_inputs(eps_fn, inpaint["mask"], inpaint["masked_latents"])
            elif inpaint:                          # a plain U-Net: the known region blended back after each step
                after_step = inpainting.blend_fn(self.scheduler, inpaint["image_latents"], inpaint["noise"],
                                                 inpaint["mask"])
            # txt2img (scale_init): z is z_T, scaled by init_noise_sigma in run; img2img: z at grid point start
            out = schedulers.run(self.scheduler, eps_fn, z, rng, num_steps, start=start, end=end,
                                 x_is_noise=scale_init, on_step=self._on_step, after_step=after_step,
                                 return_trajectory=keep_trajectory)
            z0, trajectory = out if keep_trajectory else (out, None)                 # [B, h, w, 4], Trajectory
            if not decode:
                return None, z0, trajectory
            images = self.vae.apply({"params": params["vae"]}, z0, method=AutoencoderKL.decode_latents)
            return jnp.clip(images, -1.0, 1.0), z0, trajectory                       # [B, H, W, 3]

        if sharded:
            batch, rep = parallel.batch_sharding(self.mesh), self._replicated
            program = jax.jit(run, in_shardings=(rep, rep, batch, batch, rep, rep, batch, rep, batch))
        else:
            program = jax.jit(run)
        self._programs[key] = program
        return program

    def _sample(self, prompts: list[str], cond: dict[str, Array], uncond: dict[str, Array], guidance_scale: float,
                z: Array, key: Array, num_steps: int, start: int, scale_init: bool, keep: bool, progress: bool,
                guidance_rescale: float = 0.0, end: int | None = None, inpaint: dict[str, Array] | None = None
                ) -> dict[str, Any]:
        """Runs the program for grid steps start … end−1; with ``end`` (``denoising_end``) the latents at grid point
        ``end`` come back undecoded: {"latents"} (+ the trajectory), no "images". ``inpaint``: see ``_program``."""
        inpaint = inpaint or {}
        if "masked_latents" not in inpaint:
            self._check_not_inpainting_unet()
        guidance.check_guidance_scale(guidance_scale)
        if not 0.0 <= float(guidance_rescale) <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1] (φ of Lin et al. 2024 Eq. 16; 0.7 is theirs), "
                             f"got {guidance_rescale}")
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        sharded = z.shape[0] % self.mesh.devices.size == 0 and self.mesh.devices.size > 1
        program = self._program(int(num_steps), start, end, scale_init, keep, sharded, decode=end is None)
        n = self.scheduler.init_state(num_steps, z).timesteps.shape[0] if end is None else end
        if progress:
            self._bar, self._bar_start = progress_bar(total=n - start, desc="denoising", unit="step"), start
        try:
            images, z0, trajectory = program(self.params, self.loras.traced("unet"), cond, uncond,
                                             jnp.float32(guidance_scale), jnp.float32(guidance_rescale), z, key,
                                             inpaint)
            z0 = np.asarray(z0)
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
        result: dict[str, Any] = {"latents": z0} if images is None else {"images": np.asarray(images), "latents": z0}
        if keep:  # z after each step [S, B, h, w, 4] (Trajectory.x without its start point), what the U-Net saw, t
            result["trajectory"] = np.asarray(trajectory.x[1:])
            result["model_inputs"], result["timesteps"] = np.asarray(trajectory.model_input), np.asarray(trajectory.t)
        return result

    def txt2img(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None,
                guidance_scale: float = 7.5, num_steps: int = 50, height: int | None = None, width: int | None = None,
                seed: int = 0, latents: Array | None = None, return_latents: bool = False, return_attention: bool = False,
                progress: bool = False, guidance_rescale: float = 0.0, original_size: Sequence[int] | None = None,
                crops_coords_top_left: Sequence[int] | None = None, target_size: Sequence[int] | None = None,
                denoising_end: float | None = None, prompts_2: str | Sequence[str] | None = None,
                negative_prompts_2: str | Sequence[str] | None = None,
                negative_original_size: Sequence[int] | None = None,
                negative_crops_coords_top_left: Sequence[int] | None = None,
                negative_target_size: Sequence[int] | None = None) -> dict[str, Any]:
        """Text → images. Returns {"images": [B, H, W, 3] in [−1, 1], "latents": z_0 [B, h, w, 4]}, plus
        with ``return_latents`` "trajectory" (z after each step, [N, B, h, w, 4]), "model_inputs" and
        "timesteps", and with ``return_attention`` "attention" [B, h, w, 77] (per-token cross-attention,
        averaged over heads, layers and steps; ``cross_attention.token_attention_maps``) and "tokens" (per prompt).

        ``latents``: the initial noise z_T ~ N(0, I) [B, h, w, 4] (NHWC; diffusers' ``latents`` are NCHW),
        else drawn from ``seed``: image b from seed + b alone (``image_keys``), so the same seed gives the same
        images, and image b is the image of seed + b in a batch of any size. ``guidance_rescale``: φ of Lin et al.
        2024 Eq. 16 (``guidance.rescale_guidance``; 0.7 for SD 2.x v-prediction models), traced like w.
        SDXL only: ``original_size``, ``crops_coords_top_left``, ``target_size`` (h, w) pairs, its time ids
        (``sdxl_time_ids``; defaults (height, width), (0, 0), (height, width) as diffusers'), and ∅'s
        ``negative_original_size``, ``negative_crops_coords_top_left``, ``negative_target_size``
        (``micro_conditioning``); ``prompts_2`` / ``negative_prompts_2``: the second text encoder's texts (diffusers'
        ``prompt_2`` / ``negative_prompt_2``; default the first's; a string for all prompts or one per prompt).
        ``height``, ``width``: default ``default_size`` (the model's own).
        ``denoising_end`` in (0, 1): SDXL base → refiner (``txt2img_with_refiner``): stop where the grid's timesteps
        fall below round(T − denoising_end·T) (``denoising_end_index``) and return {"latents"} there, undecoded.
        """
        self._check_not_inpainting_unet()
        if self.is_refiner:
            raise ValueError("this is the SDXL refiner (an img2img model for the low noise levels, Podell et al. 2023 "
                             "§2.5): txt2img needs the SDXL base; run base → refiner (--model <base> --refiner <this>)")
        height, width = height or self.default_size[0], width or self.default_size[1]
        time_ids = self.micro_conditioning(height, width, original_size, crops_coords_top_left, target_size,
                                           negative_original_size, negative_crops_coords_top_left, negative_target_size)
        prompts, cond, uncond = self._conditions(prompts, negative_prompts, *time_ids, prompts_2, negative_prompts_2)
        shape = self.latent_shape(len(prompts), height, width)
        key_latents, key_steps = image_keys(seed, len(prompts))                          # [B] keys each
        if latents is None:
            latents = normal_each(key_latents, shape[1:])                                  # z_T [B, h, w, 4]
        elif tuple(np.shape(latents)) != shape:
            raise ValueError(f"latents must have shape {shape} (NHWC) for {len(prompts)} prompts at {height}×{width}, "
                             f"got {tuple(np.shape(latents))}")
        keep = return_latents or return_attention
        end = None if denoising_end is None else denoising_end_index(self.grid(num_steps), denoising_end,
                                                                     self.scheduler.config.num_train_timesteps)
        result = self._sample(prompts, cond, uncond, guidance_scale, jnp.asarray(latents, jnp.float32), key_steps,
                              num_steps, 0, True, keep, progress, guidance_rescale, end)
        if return_attention:
            self._add_attention(result, prompts, cond)
        return result

    def img2img(self, images: Array, prompts: str | Sequence[str], strength: float = 0.8,
                negative_prompts: str | Sequence[str] | None = None, guidance_scale: float = 7.5, num_steps: int = 50,
                seed: int = 0, init_latents: Array | None = None, noise: Array | None = None,
                return_latents: bool = False, progress: bool = False, guidance_rescale: float = 0.0,
                denoising_start: float | None = None, aesthetic_score: float = 6.0,
                negative_aesthetic_score: float = 2.5, prompts_2: str | Sequence[str] | None = None,
                negative_prompts_2: str | Sequence[str] | None = None, **micro_conditioning: Any) -> dict[str, Any]:
        """SDEdit: images [B, H, W, 3] in [−1, 1] → z_0 = s·E(x) (a sample of q(z|x), as diffusers) → noised to
        grid point (1 − strength)·N → the remaining ⌊strength·N⌋ steps → decoded, with any scheduler (a multistep
        one restarts its history there, as diffusers' ``set_begin_index``). ``init_latents`` (scaled
        latents [B, h, w, 4]) replace the encoding, ``noise`` the ε drawn from ``seed`` (for tests). SDXL's
        time ids: ``micro_conditioning``'s for the image's size, its keyword arguments (original_size, …,
        negative_target_size) passed on; the refiner's hold ``aesthetic_score`` for c and ``negative_aesthetic_score``
        for ∅ (diffusers' defaults 6.0 and 2.5; ``refiner_time_ids``). ``prompts_2`` / ``negative_prompts_2``: as
        ``txt2img`` (SDXL base only).

        ``denoising_start`` in (0, 1): the refiner's half of base → refiner (``txt2img_with_refiner``):
        ``init_latents`` are the base's latents at that point of the same N-step grid, taken as they are (no noise
        added, ``strength`` ignored); the steps run are those whose timestep is below round(T − denoising_start·T)
        (``denoising_start_index``).
        """
        self._check_not_inpainting_unet()
        start = strength_start(num_steps, strength, self.scheduler.order) if denoising_start is None else None
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        key_x_T, key_steps = image_keys(seed, len(prompts))          # the noise-key rule per image: [B] keys each
        key_encode, key_noise = split_each(key_x_T)
        if init_latents is None:
            init_latents = self.encode_images(self._check_images(images, len(prompts)), key_encode)  # [B, h, w, 4]
        init_latents = jnp.asarray(init_latents, jnp.float32)
        size = (init_latents.shape[1] * self.vae_scale_factor, init_latents.shape[2] * self.vae_scale_factor)
        time_ids = self.micro_conditioning(*size, aesthetic_score=aesthetic_score,                # (c's, ∅'s)
                                           negative_aesthetic_score=negative_aesthetic_score, **micro_conditioning)
        prompts, cond, uncond = self._conditions(prompts, negative_prompts, *time_ids, prompts_2, negative_prompts_2)
        if denoising_start is not None:           # the refiner after the base: z is already the sample at t_start
            start = denoising_start_index(self.grid(num_steps), denoising_start, self.scheduler.config.num_train_timesteps)
            return self._sample(prompts, cond, uncond, guidance_scale, init_latents, key_steps, num_steps, start, False,
                                return_latents, progress, guidance_rescale)
        if noise is None:
            noise = normal_each(key_noise, init_latents.shape[1:])                          # ε [B, h, w, 4]
        state = self.scheduler.init_state(num_steps, init_latents, start=start)
        z = self.scheduler.add_noise(state, init_latents, jnp.asarray(noise, jnp.float32), start)   # z at t_start
        return self._sample(prompts, cond, uncond, guidance_scale, z, key_steps, num_steps, start, False,
                            return_latents, progress, guidance_rescale)

    def inpaint(self, images: Array, mask: Array, prompts: str | Sequence[str], strength: float = 1.0,
                negative_prompts: str | Sequence[str] | None = None, guidance_scale: float = 7.5, num_steps: int = 50,
                seed: int = 0, noise: Array | None = None, return_latents: bool = False, progress: bool = False,
                guidance_rescale: float = 0.0, prompts_2: str | Sequence[str] | None = None,
                negative_prompts_2: str | Sequence[str] | None = None) -> dict[str, Any]:
        """Repaint images [B, H, W, 3] in [−1, 1] where ``mask`` is 1 (white), keep the rest (``pipelines/inpainting.py``),
        as diffusers' ``StableDiffusionInpaintPipeline``: SD's 9-channel inpainting U-Net reads [z, m↓, s·E(x ⊙ (1 − m))];
        a plain U-Net blends the image's noised latents back into the known region after each step. ``mask``: one
        channel in [0, 1] of the images' size ([B, H, W(, 1)] or one [H, W(, 1)] for all), binarised at 0.5.

        ``strength`` as in img2img: the last ⌊strength·N⌋ steps of the grid are run from s·E(x) noised to that point;
        1.0 (the default) starts from pure noise z_T·init_noise_sigma, as diffusers. ``noise``: the ε [B, h, w, 4]
        drawn from ``seed`` otherwise (for tests). Any scheduler; one compiled program as txt2img. Returns {"images",
        "latents"} (+ the trajectory with ``return_latents``)."""
        if self.is_sdxl:
            raise ValueError("inpaint runs SD v1/2.x U-Nets (StableDiffusionInpaintPipeline); SDXL inpainting is not "
                             "implemented: use an SD v1/2.x model or its inpainting variant")
        channels = self.vae.config.latent_channels
        if self.unet.config.in_channels not in (channels, 2 * channels + 1):
            raise ValueError(f"inpainting needs a U-Net with {channels} input channels (latent blending) or "
                             f"{2 * channels + 1} (SD's inpainting U-Net), got {self.unet.config.in_channels}")
        start = strength_start(num_steps, strength, self.scheduler.order)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = self._check_images(images, len(prompts))                                 # [B, H, W, 3]
        mask = jnp.asarray(inpainting.prepare_mask(mask, images.shape))                   # [B, H, W, 1] of 0/1
        key_x_T, key_steps = image_keys(seed, len(prompts))          # the noise-key rule per image: [B] keys each
        key_encode, key_noise = split_each(key_x_T)
        key_image, key_masked = split_each(key_encode)
        if noise is None:
            noise = normal_each(key_noise, self.latent_shape(*images.shape[:3])[1:])      # ε [B, h, w, 4]
        noise = jnp.asarray(noise, jnp.float32)
        mask_latent = inpainting.latent_mask(mask, self.vae_scale_factor)                 # m↓ [B, h, w, 1]
        if self.is_inpainting_unet:
            inputs = {"mask": mask_latent,
                      "masked_latents": self.encode_images(inpainting.masked_image(images, mask), key_masked)}
        else:
            inputs = {"mask": mask_latent, "noise": noise}
        image_latents = self.encode_images(images, key_image) if strength < 1.0 or "noise" in inputs else None
        if "noise" in inputs:
            inputs["image_latents"] = image_latents                                        # z_0^image [B, h, w, 4]
        prompts, cond, uncond = self._conditions(prompts, negative_prompts, None, None, prompts_2, negative_prompts_2)
        if strength == 1.0:                                       # diffusers: pure noise, scaled by init_noise_sigma
            return self._sample(prompts, cond, uncond, guidance_scale, noise, key_steps, num_steps, 0, True,
                                return_latents, progress, guidance_rescale, inpaint=inputs)
        state = self.scheduler.init_state(num_steps, image_latents, start=start)
        z = self.scheduler.add_noise(state, image_latents, noise, start)                  # z at grid point start
        return self._sample(prompts, cond, uncond, guidance_scale, z, key_steps, num_steps, start, False,
                            return_latents, progress, guidance_rescale, inpaint=inputs)

    def _check_not_inpainting_unet(self) -> None:
        if self.is_inpainting_unet:
            raise ValueError("this U-Net is SD's inpainting U-Net (in_channels = 9: latents, mask, masked image): use "
                             "inpaint(images, mask, prompts) (ddpm-jax inpaint), not txt2img or img2img")

    def _check_images(self, images: Array, batch: int) -> Array:
        """images [B, H, W, C] in [−1, 1] with B = ``batch``, C the VAE's channels (3; 1 for the digit model) and a
        size the VAE and U-Net take, as float32."""
        images = jnp.asarray(images, jnp.float32)
        channels = self.vae.config.in_channels
        if images.ndim != 4 or images.shape[-1] != channels or images.shape[0] != batch:
            raise ValueError(f"images must be [B, H, W, {channels}] in [-1, 1] with B = {batch} (one per prompt), "
                             f"got shape {tuple(images.shape)}")
        self.latent_shape(batch, images.shape[1], images.shape[2])
        return images

    def encode_images(self, images: Array, key: Array | None) -> Array:
        """z_0 = s·E(x): images [B, H, W, 3] in [−1, 1] → scaled latents [B, h, w, 4], a sample of q(z|x) from ``key``
        (one key, or per-image keys [B]: image b's draw from its own; the mode if None), as diffusers' pipelines
        encode (one compiled encoder, shared by ``with_scheduler``)."""
        return self._encoder(self.params["vae"], jnp.asarray(images, jnp.float32), key)

    def _encode(self, params: Params, images: Array, key: Array | None) -> Array:
        encode = lambda x, k: self.vae.apply({"params": params}, x, k, method=AutoencoderKL.encode_latents)  # noqa: E731
        if key is None or key.ndim == 0:
            return encode(images, key)
        return jax.vmap(lambda x, k: encode(x[None], k)[0])(images, key)                 # per-image keys [B]

    def grid(self, num_steps: int) -> np.ndarray:
        """The scheduler's timesteps for ``num_steps`` [n] (the model's t at each grid point, in sampling order)."""
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        return np.asarray(self.scheduler.init_state(int(num_steps), jnp.zeros((1, 1))).timesteps)

    # --------------------------------------------------------------------------------------------
    def _add_attention(self, result: dict[str, Any], prompts: list[str], cond: dict[str, Array]) -> None:
        """Per-token cross-attention maps averaged over heads, layers and steps (cross_attention.token_attention_maps),
        the U-Net run with the prompts' condition ``cond``."""
        unet_params = self.loras.apply(self.params["unet"], "unet")
        model = types.SimpleNamespace(text_encoder=self.text, unet=self.unet, params=unet_params)
        result["attention"] = token_attention_maps(model, result["model_inputs"], prompts, result["timesteps"],
                                                   condition=cond)                    # [B, h, w, 77]
        result["tokens"] = [prompt_tokens(self.text, p) for p in prompts]


def per_prompt(values: str | Sequence[str] | None, num_prompts: int, what: str) -> list[str] | None:
    """One text per prompt: a string → that string for each of the ``num_prompts`` prompts; a list of exactly
    ``num_prompts`` as it is; None stays None (the default: diffusers' "" for a negative prompt, the prompt itself for
    a second encoder's text)."""
    if values is None or isinstance(values, str):
        return None if values is None else [values] * num_prompts
    values = list(values)
    if len(values) != num_prompts:
        raise ValueError(f"{num_prompts} prompts but {len(values)} {what}; give one per prompt (or one string for all)")
    return values


def image_keys(seed: int, batch: int) -> tuple[Array, Array]:
    """The noise-key rule (``schedulers`` docstring) per image: image b of a call with ``seed`` draws everything
    from ``split(key(seed + b))`` = (its z_T key, its steps' key), so it is the same image whatever the batch it is
    made in, and its own seed is seed + b (as AUTOMATIC1111 numbers a batch's seeds; ``png_metadata``).
    Returns (key_x_T [B], key_steps [B]); the steps' keys go to ``schedulers.run`` as per-example keys."""
    return split_each(jnp.stack([jax.random.key(seed + b) for b in range(batch)]))


def split_each(keys: Array) -> tuple[Array, Array]:
    """Per-image keys [B] → two per-image keys [B] each: ``jax.random.split`` of every key."""
    pairs = jax.vmap(jax.random.split)(keys)                                            # [B, 2]
    return pairs[:, 0], pairs[:, 1]


def normal_each(keys: Array, shape: Sequence[int]) -> Array:
    """ε ~ N(0, I) [B, *shape], image b's from its own key (so it does not depend on the batch)."""
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), jnp.float32))(keys)


def byte_tokenizer(vocab_size: int = 514) -> Tokenizer:
    """A CLIP-format tokenizer over the 256 bytes (+ their '</w>' forms) and the two special tokens, no
    merges: every word is spelled byte by byte. For random weights (``from_configs``)."""
    symbols = list(bytes_to_unicode().values())
    tokens = (symbols + [s + "</w>" for s in symbols])[: max(vocab_size, 4) - 2] + ["<|startoftext|>", "<|endoftext|>"]
    return Tokenizer({t: i for i, t in enumerate(tokens)}, [])


def sdxl_time_ids(height: int, width: int, original_size: Sequence[int] | None = None,
                  crops_coords_top_left: Sequence[int] | None = None, target_size: Sequence[int] | None = None
                  ) -> np.ndarray:
    """SDXL's micro-conditioning (Podell et al. 2023 §2.2), the U-Net's ``time_ids`` [6] (``SDXL_TIME_IDS``):
    c_size = ``original_size`` (h, w) of the training image before any resizing, c_crop = ``crops_coords_top_left``
    (top, left) of the crop, and the ``target_size`` (h, w); diffusers' defaults (height, width), (0, 0),
    (height, width) ask for an uncropped image of the requested size."""
    parts = [(height, width) if original_size is None else original_size,
             (0, 0) if crops_coords_top_left is None else crops_coords_top_left,
             (height, width) if target_size is None else target_size]
    if any(len(tuple(part)) != 2 for part in parts):
        raise ValueError(f"original_size, crops_coords_top_left and target_size must be (h, w) / (top, left) pairs, "
                         f"got {parts}")
    return np.asarray([float(v) for part in parts for v in part], np.float32)            # [6]


def refiner_time_ids(height: int, width: int, aesthetic_score: float = 6.0,
                     original_size: Sequence[int] | None = None, crops_coords_top_left: Sequence[int] | None = None
                     ) -> np.ndarray:
    """The SDXL refiner's micro-conditioning (Podell et al. 2023 §2.5; diffusers' ``requires_aesthetics_score``), its
    ``time_ids`` [5] (``REFINER_TIME_IDS``): c_size, c_crop as in ``sdxl_time_ids`` and the aesthetic score a of the
    training image, in place of the target size; diffusers asks for a = 6.0 with the prompt, 2.5 with ∅."""
    return np.concatenate([sdxl_time_ids(height, width, original_size, crops_coords_top_left)[:4],
                           np.asarray([aesthetic_score], np.float32)])                       # [5]


def strength_start(num_steps: int, strength: float, order: int = 1) -> int:
    """The grid point an img2img/inpainting run begins at, diffusers' ``get_timesteps``: the last ⌊strength·N⌋ steps of
    the N-step grid are run, from step N − ⌊strength·N⌋ (SDEdit's t_0 = strength, Meng et al. 2022 §3), which is grid
    point (N − ⌊strength·N⌋)·order (``order`` = the scheduler's grid points per step: 2 for Heun)."""
    if isinstance(strength, bool) or not isinstance(strength, (float, int, np.floating)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (the fraction of the steps to redo; 1 = from pure noise), "
                         f"got {strength!r}")
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    start = num_steps - min(int(num_steps * strength), num_steps)
    if start >= num_steps:
        raise ValueError(f"strength {strength} × {num_steps} steps leaves no step to run; raise either")
    return start * order


def _timestep_cutoff(fraction: float, num_train_timesteps: int, name: str) -> int:
    """diffusers' discrete cutoff of base → refiner: round(T − fraction·T), for a fraction in (0, 1)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (float, int, np.floating)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1) of the denoising (0.8: the base takes the first 80%), "
                         f"got {fraction!r}")
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def denoising_end_index(timesteps: np.ndarray, denoising_end: float, num_train_timesteps: int) -> int:
    """Where the SDXL base stops (diffusers' pipeline_stable_diffusion_xl.py, "Apply denoising_end"): it runs the
    grid's steps with t ≥ t_c = round(T − denoising_end·T), the first ``end`` of them; returns ``end``."""
    cutoff = _timestep_cutoff(denoising_end, num_train_timesteps, "denoising_end")
    end = int(np.sum(np.asarray(timesteps) >= cutoff))
    if end == 0:
        raise ValueError(f"denoising_end={denoising_end} leaves no step of this {len(timesteps)}-point grid to the base "
                         f"(its first timestep {float(timesteps[0]):g} < {cutoff}); raise denoising_end or the steps")
    return end


def denoising_start_index(timesteps: np.ndarray, denoising_start: float, num_train_timesteps: int) -> int:
    """Where the SDXL refiner starts (diffusers' StableDiffusionXLImg2ImgPipeline.get_timesteps with
    ``denoising_start``): it runs the grid's last steps, those with t < t_c = round(T − denoising_start·T); returns the
    index of the first (for our first-order schedulers; diffusers adds one for a second-order one's pairs). With the
    base's ``denoising_end`` equal, the refiner starts exactly where the base stopped."""
    cutoff = _timestep_cutoff(denoising_start, num_train_timesteps, "denoising_start")
    start = len(timesteps) - int(np.sum(np.asarray(timesteps) < cutoff))
    if start == len(timesteps):
        raise ValueError(f"denoising_start={denoising_start} leaves no step of this {len(timesteps)}-point grid to the "
                         f"refiner (its last timestep {float(timesteps[-1]):g} ≥ {cutoff}); lower it or add steps")
    return start


def txt2img_with_refiner(base: StableDiffusion, refiner: StableDiffusion, prompts: str | Sequence[str],
                         negative_prompts: str | Sequence[str] | None = None, guidance_scale: float = 5.0,
                         num_steps: int = 40, high_noise_frac: float = 0.8, seed: int = 0, latents: Array | None = None,
                         progress: bool = False, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                         **txt2img_kwargs: Any) -> dict[str, Any]:
    """SDXL's "ensemble of expert denoisers" (Podell et al. 2023 §2.5), as diffusers runs base → refiner: over the
    same N-step grid the base takes the high-noise steps, ``txt2img(denoising_end=high_noise_frac)`` → latents
    [B, h, w, 4] at the cut, undecoded; the refiner the rest, ``img2img(init_latents=those,
    denoising_start=high_noise_frac)`` → images. Two compiled programs, one per model. ``txt2img_kwargs`` go to the
    base (height, width, time ids, prompts_2, return_attention, …); the micro-conditioning the refiner has too
    (``REFINER_SHARED``: original size, crop, and ∅'s) to both; the refiner's one encoder reads ``prompts`` (as
    diffusers': ``prompts_2`` is the base's). Returns the refiner's result (+ "attention", "tokens")."""
    first = base.txt2img(prompts, negative_prompts, guidance_scale=guidance_scale, num_steps=num_steps, seed=seed,
                         latents=latents, progress=progress, denoising_end=high_noise_frac, **txt2img_kwargs)
    result = refiner.img2img(None, prompts, negative_prompts=negative_prompts, guidance_scale=guidance_scale,
                             num_steps=num_steps, seed=seed, init_latents=first["latents"], progress=progress,
                             denoising_start=high_noise_frac, aesthetic_score=aesthetic_score,
                             negative_aesthetic_score=negative_aesthetic_score,
                             **{k: v for k, v in txt2img_kwargs.items() if k in REFINER_SHARED})
    return result | {k: first[k] for k in ("attention", "tokens") if k in first}


def load_refiner(path: str | Path, base: StableDiffusion, **kwargs: Any) -> StableDiffusion:
    """The SDXL refiner for the SDXL ``base`` (``txt2img_with_refiner``; ``ddpm-jax txt2img --refiner``): a diffusers
    folder, or a single file in sgm's refiner layout (``compvis``: the released refiner's configs implied) whose
    tokenizer, unless ``tokenizer=`` is given, is the base's ``tokenizer_2`` (the same OpenCLIP ViT-bigG BPE).
    ``kwargs`` go to ``from_pretrained`` (dtype, scheduler, config_folder: a refiner folder, …). One-line errors
    when ``base`` is no SDXL base or ``path`` no refiner."""
    if not base.is_sdxl or base.is_refiner:
        raise ValueError("a refiner continues an SDXL base's denoising: the base model must be the SDXL base "
                         f"(two text encoders), not {'the refiner' if base.is_refiner else 'an SD v1/2.x model'}")
    if kwargs.get("tokenizer") is None:
        kwargs["tokenizer"] = base.tokenizer_2
    refiner = StableDiffusion.from_pretrained(path, **kwargs)
    if not refiner.is_refiner:
        raise ValueError(f"--refiner {path} is not an SDXL refiner (text_encoder_2 alone, aesthetic-score time ids): give "
                         f"the base as --model and sd_xl_refiner_1.0 (its folder or single file) as --refiner")
    return refiner


def _load_sdxl_parts(path: Path, variant: str | None, index: dict[str, Any]) -> tuple[dict[str, Any], Params]:
    """An SDXL folder's text_encoder_2/, tokenizer_2/ and model_index.json's ``force_zeros_for_empty_prompt``
    (diffusers' default: true) and ``requires_aesthetics_score`` (the refiner's: true), as ``StableDiffusion``
    fields, and text_encoder_2's params."""
    text_encoder_2, params = load_text_encoder_2(path / "text_encoder_2", variant)
    tokenizer_2 = load_tokenizer(path / "tokenizer_2", context_length=text_encoder_2.config.max_position_embeddings)
    refiner = folder_components(index) == REFINER_COMPONENTS
    return {"text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, **sdxl_flags(index, refiner)}, params


def sdxl_flags(index: dict[str, Any], refiner: bool = False) -> dict[str, bool]:
    """model_index.json's ``force_zeros_for_empty_prompt`` and ``requires_aesthetics_score`` as ``StableDiffusion``
    fields; absent, the release's: SDXL base true / false, the ``refiner`` false / true (sd_xl_refiner_1.0's)."""
    return {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", not refiner)),
            "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", refiner))}


def _load_single_file(path: Path, config_folder: str | Path | None, tokenizer: str | Path | Tokenizer | None,
                      use_ema: bool, prediction_type: str | None):
    """A single file's networks (``compvis.load_single_file``: SD v1, SD 2.x, SDXL base or refiner, told from its
    keys) with tokenizers, a scheduler config and (SDXL) the ``StableDiffusion`` fields of ``_load_sdxl_parts``.

    With ``config_folder`` (a diffusers folder of the same kind) its tokenizer/ (tokenizer_2/), scheduler/
    and model_index.json; else the ``tokenizer`` (a folder, or a ``Tokenizer`` such as the base's ``tokenizer_2``
    for a refiner) for every text encoder (an OpenCLIP one pads with "!", as OpenCLIP does) and the release's
    scheduler (``SINGLE_FILE_SCHEDULERS``). ``prediction_type``
    ("epsilon", "v_prediction"), not visible in the keys, overrides the scheduler's."""
    if config_folder is None and tokenizer is None:
        raise ValueError(f"{path} is a single-file checkpoint without a tokenizer: pass tokenizer=<folder with "
                         f"vocab.json and merges.txt, or tokenizer.json> (e.g. the tokenizer/ of any SD diffusers "
                         f"folder) or config_folder=<a diffusers folder of the same kind>")
    models = compvis.load_single_file(path, config_folder, use_ema=use_ema)
    folder = Path(config_folder) if config_folder is not None else None
    tokenizers = {}
    for entry in compvis.LAYOUTS[models.layout].text_encoders:
        length = getattr(models, entry.component).config.max_position_embeddings
        name = entry.component.replace("text_encoder", "tokenizer")  # tokenizer, tokenizer_2
        if folder is not None:
            tokenizers[name] = load_tokenizer(tokenizer if tokenizer and name == "tokenizer" else folder / name, length)
        else:
            tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer, length)
            pad = compvis.OPENCLIP_PAD_TOKEN if entry.names == "openclip" else tok.pad_token
            tokenizers[name] = Tokenizer(tok.vocab, tok.merges, pad_token=pad, context_length=length)
    if folder is not None:
        scheduler_config = schedulers.read_scheduler_config(folder / "scheduler")
    else:
        scheduler_config = SINGLE_FILE_SCHEDULERS[models.layout]
    if prediction_type is not None:
        scheduler_config = dict(scheduler_config, prediction_type=prediction_type)
    sdxl: dict[str, Any] = {}
    if models.text_encoder_2 is not None:
        index_file = folder / "model_index.json" if folder is not None else None
        index = json.loads(index_file.read_text()) if index_file is not None and index_file.is_file() else {}
        sdxl = {"text_encoder_2": models.text_encoder_2, "tokenizer_2": tokenizers["tokenizer_2"],
                **sdxl_flags(index, refiner=models.layout == "sdxl_refiner")}
    return (tokenizers.get("tokenizer"), models.text_encoder, models.unet, models.vae, scheduler_config, models.params,
            sdxl)


__all__ = ["REFINER_SHARED", "REFINER_TIME_IDS", "SDXL_TIME_IDS", "StableDiffusion", "byte_tokenizer",
           "denoising_end_index", "denoising_start_index", "folder_components", "img2img_to_files", "inpaint_to_files",
           "load_refiner", "load_text_encoder", "load_text_encoder_2", "per_prompt", "preprocess_image", "read_image",
           "refiner_time_ids", "resolve_dtype", "resolve_path", "sdxl_flags", "sdxl_time_ids", "strength_start",
           "txt2img_to_files", "txt2img_with_refiner"]


# ================================================================================================
# What `ddpm-jax txt2img --model` and `ddpm-jax img2img` write
# ================================================================================================

def preprocess_image(im: Image.Image, height: int | None = None, width: int | None = None, multiple: int = 8,
                     grayscale: bool = False) -> np.ndarray:
    """A PIL image → [1, H, W, C] float32 as diffusers' ``VaeImageProcessor.preprocess``: H × W = ``height`` ×
    ``width``, default the image's own size rounded down to a ``multiple`` of the VAE's factor, resized with Lanczos
    (before the mode conversion, as diffusers); then RGB in [−1, 1] (C = 3), or with ``grayscale`` (the mask
    processor) one channel in [0, 1] (C = 1)."""
    height = height or im.height - im.height % multiple
    width = width or im.width - im.width % multiple
    im = im.resize((width, height), Image.LANCZOS)
    pixels = np.asarray(im.convert("L" if grayscale else "RGB"), np.float32) / 255.0        # [H, W(, 3)] in [0, 1]
    return pixels[None, ..., None] if grayscale else (2.0 * pixels - 1.0)[None]


def read_image(path: str | Path, height: int | None = None, width: int | None = None, multiple: int = 8,
               grayscale: bool = False, name: str = "--image") -> np.ndarray:
    """A PNG/JPEG → [1, H, W, 3] float32 in [−1, 1] (``preprocess_image``: diffusers' preprocessing; a mask with
    ``grayscale``: [1, H, W, 1] in [0, 1])."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{name} {path}: no such file")
    with Image.open(path) as im:
        return preprocess_image(im, height, width, multiple, grayscale)


def txt2img_to_files(pipe: StableDiffusion, prompts: Sequence[str], out: str | Path = "txt2img.png", *,
                     steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                     negative_prompts: Sequence[str] | None = None, height: int | None = None,
                     width: int | None = None, attention_maps: bool = False, refiner: StableDiffusion | None = None,
                     high_noise_frac: float = 0.8, num_images_per_prompt: int = 1,
                     guidance_rescale: float = 0.0, prompts_2: Sequence[str] | None = None,
                     negative_prompts_2: Sequence[str] | None = None) -> list[Path]:
    """``num_images_per_prompt`` images per prompt, each its own PNG ``<out stem>_<k>.png`` recording how it was
    made (``png_metadata``: prompt, seed + k, steps, scheduler, size, model, LoRAs, …), and all of them as the grid
    ``out`` (a row per prompt). SDXL base: ``prompts_2`` / ``negative_prompts_2``, the second text encoder's texts
    (one per prompt; recorded too). The denoising loop is one compiled program, its tqdm bar fed by
    ``jax.debug.callback`` from inside the scan. With ``attention_maps`` also ``<out stem>_attention_<k>.png``.
    With an SDXL ``refiner``: base → refiner (``txt2img_with_refiner``), the base taking the first
    ``high_noise_frac`` of the denoising (the attention maps are the base's)."""
    n = num_images_per_prompt
    prompts = png_metadata.per_image(prompts, n)
    negative_prompts, prompts_2, negative_prompts_2 = (png_metadata.per_image(texts or None, n) for texts in (
        negative_prompts, prompts_2, negative_prompts_2))
    height, width = height or pipe.default_size[0], width or pipe.default_size[1]
    kwargs = dict(negative_prompts=negative_prompts, guidance_scale=guidance_scale, num_steps=steps, height=height,
                  width=width, seed=seed, return_attention=attention_maps, progress=True,
                  guidance_rescale=guidance_rescale, prompts_2=prompts_2, negative_prompts_2=negative_prompts_2)
    result = (pipe.txt2img(prompts, **kwargs) if refiner is None else
              txt2img_with_refiner(pipe, refiner, prompts, high_noise_frac=high_noise_frac, **kwargs))
    written = save_generations(pipe, result["images"], out, prompts, negative_prompts, seed, n, prompts_2,
                               negative_prompts_2, steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                               guidance_rescale=guidance_rescale, refiner=refiner and refiner.source,
                               high_noise_frac=high_noise_frac if refiner else None)
    out_path = Path(out)
    if attention_maps:
        for k, tokens in enumerate(result["tokens"]):
            path = out_path.with_name(f"{out_path.stem}_attention_{k}.png")
            written.append(save_attention_overlays(result["images"][k:k + 1],
                                                   result["attention"][k:k + 1, :, :, :len(tokens)], tokens, path))
    return written


def img2img_to_files(pipe: StableDiffusion, image: str | Path, prompts: Sequence[str], out: str | Path = "img2img.png",
                     *, strength: float = 0.75, steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                     negative_prompts: Sequence[str] | None = None, height: int | None = None,
                     width: int | None = None, num_images_per_prompt: int = 1, guidance_rescale: float = 0.0,
                     prompts_2: Sequence[str] | None = None, negative_prompts_2: Sequence[str] | None = None
                     ) -> list[Path]:
    """SDEdit on the image file: encode it, noise it to ``strength``, denoise with each prompt; each result its own
    PNG ``<out stem>_<k>.png`` recording how it was made (``png_metadata``), and all of them as the grid ``out``."""
    pixels = read_image(image, height, width, pipe.vae_scale_factor)
    n = num_images_per_prompt
    prompts = png_metadata.per_image(prompts, n)
    negative_prompts, prompts_2, negative_prompts_2 = (png_metadata.per_image(texts or None, n) for texts in (
        negative_prompts, prompts_2, negative_prompts_2))
    result = pipe.img2img(np.repeat(pixels, len(prompts), axis=0), prompts, strength=strength,
                          negative_prompts=negative_prompts, guidance_scale=guidance_scale, num_steps=steps,
                          seed=seed, progress=True, guidance_rescale=guidance_rescale, prompts_2=prompts_2,
                          negative_prompts_2=negative_prompts_2)
    return save_generations(pipe, result["images"], out, prompts, negative_prompts, seed, n, prompts_2,
                            negative_prompts_2, steps=steps,
                            guidance_scale=guidance_scale, height=pixels.shape[1], width=pixels.shape[2],
                            guidance_rescale=guidance_rescale, mode="img2img", image=str(image), strength=strength)


def inpaint_to_files(pipe: StableDiffusion, image: str | Path, mask: str | Path, prompts: Sequence[str],
                     out: str | Path = "inpaint.png", *, strength: float = 1.0, steps: int = 50,
                     guidance_scale: float = 7.5, seed: int = 0, negative_prompts: Sequence[str] | None = None,
                     height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                     guidance_rescale: float = 0.0, prompts_2: Sequence[str] | None = None,
                     negative_prompts_2: Sequence[str] | None = None) -> list[Path]:
    """Inpainting on the image file where the mask file is white (``StableDiffusion.inpaint``), each prompt; each
    result its own PNG recording how it was made, and the grid ``out``. The mask is resized to the image's size and
    read as one channel in [0, 1] (diffusers' mask processor)."""
    pixels = read_image(image, height, width, pipe.vae_scale_factor)
    masks = read_image(mask, pixels.shape[1], pixels.shape[2], pipe.vae_scale_factor, grayscale=True, name="--mask")
    n = num_images_per_prompt
    prompts = png_metadata.per_image(prompts, n)
    negative_prompts, prompts_2, negative_prompts_2 = (png_metadata.per_image(texts or None, n) for texts in (
        negative_prompts, prompts_2, negative_prompts_2))
    result = pipe.inpaint(np.repeat(pixels, len(prompts), axis=0), masks, prompts, strength=strength,
                          negative_prompts=negative_prompts, guidance_scale=guidance_scale, num_steps=steps,
                          seed=seed, progress=True, guidance_rescale=guidance_rescale, prompts_2=prompts_2,
                          negative_prompts_2=negative_prompts_2)
    return save_generations(pipe, result["images"], out, prompts, negative_prompts, seed, n, prompts_2,
                            negative_prompts_2, steps=steps,
                            guidance_scale=guidance_scale, height=pixels.shape[1], width=pixels.shape[2],
                            guidance_rescale=guidance_rescale, mode="inpaint", image=str(image), mask=str(mask),
                            strength=strength)


def save_generations(pipe: StableDiffusion, images: np.ndarray, out: str | Path, prompts: list[str],
                     negative_prompts: list[str] | None, seed: int, num_images_per_prompt: int,
                     prompts_2: list[str] | None = None, negative_prompts_2: list[str] | None = None,
                     **settings: Any) -> list[Path]:
    """The grid ``out`` (a row per prompt when several images per prompt), then image k as ``<out stem>_<k>.png``
    with its ``png_metadata.Generation``: its prompt, negative prompt (and SDXL's second-encoder texts) and seed + k,
    the pipeline's scheduler, model
    and LoRAs, and the run's other ``settings`` (steps, guidance_scale, height, width, …; ``Generation``'s fields)."""
    record = dict(scheduler=pipe.scheduler.name, model=pipe.source, loras=pipe.lora_files, **settings)
    out = Path(out)
    n = num_images_per_prompt
    written = [plotting.save_image_grid(images, out, nrow=n if len(prompts) > n else None, min_tile=1)]
    for k, image in enumerate(images):
        texts = {name: values[k] for name, values in (("negative_prompt", negative_prompts), ("prompt_2", prompts_2),
                                                      ("negative_prompt_2", negative_prompts_2)) if values}
        generation = png_metadata.Generation(prompts[k], seed + k, **texts, **record)
        written.append(png_metadata.save_png(image, out.with_name(f"{out.stem}_{k}.png"), generation))
    return written
