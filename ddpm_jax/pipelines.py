"""Pipelines: what is diffused (pixels or an autoencoder's latents) and what conditions it.

The diffusion equations and the training step do not change between a DDPM on pixels, a
class-conditional model and Stable Diffusion's latent text-to-image model; what changes is the data
they see. This module builds that data from a config and runs the same pieces backwards to generate:

    training  images ──(AutoencoderKL.encode_latents, if config.latent.autoencoder)──► x0 [N, h, w, c]
              labels ──────────────────────────────────────────────────────────────► "label" [N]
              captions ──(tokenizer → CLIP text transformer, frozen)─────────────────► "context" [N, L, D]
    sampling  prompt ──► context ──► guided sampler (guidance.py) in latent space ──► decode_latents ──► image

Latent diffusion (Rombach et al. 2022, §3–4): the U-Net learns ε_θ(z_t, t, τ(y)) on z = s · E(x),
the scaled latents of a frozen autoencoder (s = its measured scaling factor, so z has unit variance,
which the β schedule assumes), with cross-attention to the text encoder's token states τ(y) (LDM
Eq. 3). A 32×32 digit becomes an 8×8×4 latent: 4× fewer values per example, and the U-Net needs one
fewer level. Latents are precomputed once (the mode of q(z|x)), so the frozen encoder costs nothing
per training step.

Config groups read here (``experiments/mnist_class.py``, ``experiments/ldm_text_mnist.py``)::

    config.condition.kind         "none" | "class" | "text"
    config.condition.p_uncond     conditioning dropout (0.1), for classifier-free guidance
    config.condition.clip_workdir a `ddpm-jax train-clip` workdir (text): its tokenizer and text tower
    config.condition.grid_prompts the prompts of the sample grids (text)
    config.latent.autoencoder     a `ddpm-jax train-vae` AutoencoderKL workdir, or None for pixel space
    config.sample.guidance        the guidance scale w of the sample grids and `ddpm-jax txt2img`

The null condition ∅ (what conditioning dropout substitutes and guidance extrapolates away from) is
the extra label ``num_classes`` for classes (``guidance.null_class_label``) and the text encoder's
states of the empty prompt "" for captions, as in Stable Diffusion.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import guidance

PyTree = Any

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# ================================================================================================
# The text encoder τ(y): tokenizer + CLIP text transformer
# ================================================================================================

@dataclasses.dataclass
class TextEncoder:
    """prompts → per-token states [B, L, D] for cross-attention (``layer`` -1: last, -2: "clip skip")."""

    tokenizer: Any                      # ddpm_jax.tokenizer.Tokenizer
    model: Any                          # a CLIP text tower (CLIPTextModel / CLIPTextModelWithProjection)
    params: PyTree
    layer: int = -1

    def __post_init__(self):
        if self.layer not in (-1, -2):
            raise ValueError(f"text encoder layer must be -1 (last) or -2 (penultimate), got {self.layer}")
        self._encode = jax.jit(self._states)

    def _states(self, params: PyTree, input_ids: jax.Array) -> jax.Array:
        out = self.model.apply({"params": params}, input_ids)
        return out.last_hidden_state if self.layer == -1 else out.hidden_states[-2]   # [B, L, D]

    def token_ids(self, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.tokenizer.tokenize(list(prompts)))                      # [B, L] int

    def __call__(self, prompts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        ids = self.token_ids(prompts)
        return np.concatenate([np.asarray(self._encode(self.params, jnp.asarray(ids[i:i + batch_size])))
                               for i in range(0, len(ids), batch_size)])               # [B, L, D]


def load_text_encoder(clip_workdir: str | os.PathLike, layer: int = -1) -> TextEncoder:
    """The text side of a `ddpm-jax train-clip` workdir (EMA parameters)."""
    from ddpm_jax import clip_training

    model, params, tokenizer = clip_training.load_clip_workdir(clip_workdir)
    return TextEncoder(tokenizer, model, params, layer)


# ================================================================================================
# The autoencoder E, D of latent diffusion
# ================================================================================================

@dataclasses.dataclass
class LatentCodec:
    """x [B, H, W, C] ↔ z = s · E(x) [B, H/f, W/f, c] with a frozen AutoencoderKL (s: scaling_factor)."""

    model: Any                          # ddpm_jax.models.vae.AutoencoderKL
    params: PyTree

    def __post_init__(self):
        from ddpm_jax.models.vae import AutoencoderKL

        self._encode = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method=AutoencoderKL.encode_latents))
        self._decode = jax.jit(lambda p, z: self.model.apply({"params": p}, z, method=AutoencoderKL.decode_latents))

    def encode(self, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
        """Images in [-1, 1] → scaled latents (the mode of q(z|x)), in batches."""
        return np.concatenate([np.asarray(self._encode(self.params, jnp.asarray(images[i:i + batch_size])))
                               for i in range(0, len(images), batch_size)])

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents → images (clipped to [-1, 1])."""
        return jnp.clip(self._decode(self.params, latents), -1.0, 1.0)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)


def load_latent_codec(autoencoder_workdir: str | os.PathLike) -> LatentCodec:
    """The AutoencoderKL of a `ddpm-jax train-vae` workdir with its measured scaling factor."""
    from ddpm_jax import vae_training

    model, params, _ = vae_training.load_autoencoder(autoencoder_workdir)
    return LatentCodec(model, params)


# ================================================================================================
# Training data
# ================================================================================================

@dataclasses.dataclass
class DiffusionData:
    """What the diffusion training step sees, and what its sample grids are conditioned on.

    arrays:          "x0" [N, h, w, c] (images or scaled latents), plus "label" [N] int or
                     "context" [N, L, D] for a conditional model (``training.CONDITION_KEYS``).
    null_condition:  ∅ for each condition key, one example's worth ("label": [], "context": [L, D]).
    grid_condition:  the condition of each sample-grid image ([G] labels or [G, L, D] contexts).
    grid_titles:     what each grid image was conditioned on (class names or prompts).
    codec:           the latent autoencoder (None in pixel space): samples are decoded with it.
    """

    arrays: dict[str, np.ndarray]
    null_condition: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    grid_condition: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    grid_titles: list[str] = dataclasses.field(default_factory=list)
    codec: LatentCodec | None = None

    @property
    def x0_shape(self) -> tuple[int, ...]:
        return tuple(self.arrays["x0"].shape[1:])

    def decode(self, x0: jax.Array) -> jax.Array:
        return x0 if self.codec is None else self.codec.decode(x0)


def condition_kind(config: ml_collections.ConfigDict) -> str:
    kind = config.get("condition", {}).get("kind", "none")
    if kind not in ("none", "class", "text"):
        raise ValueError(f"condition.kind must be 'none', 'class' or 'text', got {kind!r}")
    return kind


def load_training_data(config: ml_collections.ConfigDict, num_grid: int = 16) -> DiffusionData:
    """The arrays for ``training.train`` from ``config.data``, ``config.condition`` and ``config.latent``.

    Raises ValueError for a condition the U-Net config cannot take (see :func:`check_model_fits`).
    """
    from ddpm_jax import data as data_lib

    kind = condition_kind(config)
    autoencoder = config.get("latent", {}).get("autoencoder", None)
    codec = load_latent_codec(autoencoder) if autoencoder else None

    arrays: dict[str, np.ndarray] = {}
    null: dict[str, np.ndarray] = {}
    grid: dict[str, np.ndarray] = {}
    titles: list[str] = []
    if kind == "text":
        digits = data_lib.load_captioned_digits(int(config.data.image_size), seed=int(config.data.get("seed", 0)),
                                                layout=config.data.get("layout", "random"),
                                                num_examples=config.data.get("num_examples", None))
        images = digits.images
        encoder = load_text_encoder(config.condition.clip_workdir, int(config.condition.get("layer", -1)))
        arrays["context"] = encoder(list(digits.captions))                                  # [N, L, D]
        null["context"] = encoder([""])[0]                                                   # [L, D]
        titles = list(config.condition.get("grid_prompts", [f"a handwritten digit {n}" for n in DIGIT_NAMES]))
        titles = [titles[i % len(titles)] for i in range(num_grid)]
        grid["context"] = encoder(titles)                                                    # [G, L, D]
    else:
        dataset = data_lib.load_dataset_with_labels(config.data)
        images = dataset.images
        if kind == "class":
            if dataset.labels is None:
                raise ValueError(f"condition.kind='class' needs a labelled dataset; data.name={config.data.name!r} "
                                 "has no labels")
            num_classes = int(config.condition.get("num_classes", dataset.num_classes))
            arrays["label"] = dataset.labels.astype(np.int32)
            null["label"] = np.asarray(guidance.null_class_label(num_classes), np.int32)
            grid["label"] = (np.arange(num_grid) % num_classes).astype(np.int32)
            names = DIGIT_NAMES if num_classes == 10 else tuple(str(i) for i in range(num_classes))
            titles = [names[i] for i in grid["label"]]
    arrays["x0"] = images if codec is None else codec.encode(images)
    result = DiffusionData(arrays, null, grid, titles, codec)
    check_model_fits(config, result)
    return result


def check_model_fits(config: ml_collections.ConfigDict, data: DiffusionData) -> None:
    """One-line ValueErrors when the U-Net config does not fit the data: x0's size/channels (e.g. a VAE
    whose latent channels differ from the U-Net's in_channels), the context's width, the label range."""
    from ddpm_jax.models.unet import UNetConfig, check_condition

    unet = UNetConfig(**config.model.to_dict())
    h, w, c = data.x0_shape
    where = f"the {'latents of ' + str(config.latent.autoencoder) if data.codec else 'images'}"
    if c != unet.in_channels:
        raise ValueError(f"{where} have {c} channels but model.in_channels={unet.in_channels}; set model.in_channels="
                         f"{c} (and out_channels) or use an autoencoder with {unet.in_channels} latent channels")
    if unet.out_channels != c:
        raise ValueError(f"model.out_channels={unet.out_channels} must equal the {c} channels of {where} (ε has x's shape)")
    levels = 2 ** (unet.num_levels - 1)
    if h % levels or w % levels:
        raise ValueError(f"{where} are {h}×{w}, not divisible by 2^(levels-1) = {levels} of the U-Net")
    from ddpm_jax.training import model_condition

    check_condition(unet, **model_condition({k: v[:8] for k, v in data.arrays.items() if k != "x0"}))


# ================================================================================================
# Generation
# ================================================================================================

def guided_sample(sample_fn: Callable, params: PyTree, key: jax.Array, cond: dict[str, Any] | None,
                  uncond: dict[str, Any] | None, guidance_scale: float) -> Any:
    """``sample_fn`` (``training.make_sample_fn``) with the condition in U-Net names, or unconditional."""
    from ddpm_jax.training import model_condition

    if not cond:
        return sample_fn(params, key)
    return sample_fn(params, key, model_condition(cond), model_condition(uncond), guidance_scale)


@dataclasses.dataclass
class WorkdirModel:
    """A trained diffusion workdir with everything generation needs: U-Net, params, schedule, config,
    the null condition and, for latent / text models, the autoencoder and the text encoder."""

    config: ml_collections.ConfigDict
    unet: Any
    params: PyTree
    schedule: Any
    codec: LatentCodec | None
    text_encoder: TextEncoder | None
    null_condition: dict[str, np.ndarray]

    @property
    def kind(self) -> str:
        return condition_kind(self.config)

    @property
    def x0_shape(self) -> tuple[int, int, int]:
        size = int(self.config.model.sample_size)
        return (size, size, int(self.config.model.in_channels))

    def condition_for(self, prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(cond, uncond) for prompts (text model) or labels (class model), each [B, ...]."""
        if self.kind == "text":
            if not prompts:
                raise ValueError("this is a text-conditional model: give at least one prompt")
            cond = {"context": self.text_encoder(list(prompts))}
        elif self.kind == "class":
            if labels is None or not len(labels):
                raise ValueError("this is a class-conditional model: give class labels")
            cond = {"label": np.asarray(labels, np.int32)}
        else:
            return {}, {}
        uncond = {k: np.broadcast_to(self.null_condition[k], v.shape).copy() for k, v in cond.items()}
        return cond, uncond


def load_workdir_model(workdir: str | os.PathLike, ema: bool = True) -> WorkdirModel:
    """Loads a `ddpm-jax train` workdir (pixel or latent, unconditional, class or text)."""
    from ddpm_jax import checkpoints
    from ddpm_jax import config as config_lib
    from ddpm_jax.models.unet import UNet, UNetConfig
    from ddpm_jax.schedules import get_schedule

    config = config_lib.load_workdir_config(workdir)
    params = checkpoints.load_params(workdir, ema=ema)
    unet = UNet(UNetConfig(**config.model.to_dict()))
    schedule = get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    autoencoder = config.get("latent", {}).get("autoencoder", None)
    codec = load_latent_codec(autoencoder) if autoencoder else None
    kind = condition_kind(config)
    text_encoder, null = None, {}
    if kind == "text":
        text_encoder = load_text_encoder(config.condition.clip_workdir, int(config.condition.get("layer", -1)))
        null["context"] = text_encoder([""])[0]
    elif kind == "class":
        null["label"] = np.asarray(guidance.null_class_label(int(config.condition.num_classes)), np.int32)
    return WorkdirModel(config, unet, params, schedule, codec, text_encoder, null)


def generate(model: WorkdirModel, *, prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None,
             num: int | None = None, guidance_scale: float | None = None, steps: int | None = None,
             eta: float | None = None, seed: int = 0, return_latents: bool = False,
             ) -> dict[str, np.ndarray]:
    """Images from a workdir model: one per prompt/label (or ``num`` unconditional ones).

    Classifier-free guidance with scale ``guidance_scale`` (default ``config.sample.guidance``) in one
    batched U-Net call per step; DDIM with ``steps``/``eta`` (default the config's). Returns
    {"images": [B, H, W, C] in [-1, 1], "x0": the sampled latents (or images), "trajectory": x_t along
    the chain (when ``return_latents``)}.
    """
    from ddpm_jax.models.unet import check_condition
    from ddpm_jax.training import make_sample_fn, model_condition

    config = ml_collections.ConfigDict(model.config.to_dict())
    if steps is not None:
        config.sample.steps = int(steps)
    if eta is not None:
        config.sample.eta = float(eta)
    w = float(config.sample.get("guidance", 1.0) if guidance_scale is None else guidance_scale)
    guidance.check_guidance_scale(w)
    cond, uncond = model.condition_for(prompts, labels)
    batch = len(next(iter(cond.values()))) if cond else int(num or 16)
    if cond:
        check_condition(model.unet.config, **model_condition(cond))           # concrete: label range checked here
    sample_fn = make_sample_fn(model.unet, model.schedule, config, (batch, *model.x0_shape),
                               return_trajectory=return_latents)
    run = jax.jit(lambda p, k, c, u, w: guided_sample(sample_fn, p, k, c, u, w))
    out = run(model.params, jax.random.key(seed), cond or None, uncond or None, jnp.float32(w))
    x0, trajectory = out if return_latents else (out, None)
    images = x0 if model.codec is None else model.codec.decode(x0)
    result = {"images": np.asarray(images), "x0": np.asarray(x0)}
    if trajectory is not None:
        result["trajectory"] = np.asarray(trajectory)
    return result


# ================================================================================================
# Cross-attention maps ("which pixels does 'seven' look at")
# ================================================================================================

def token_attention_maps(model: WorkdirModel, trajectory: np.ndarray, prompts: Sequence[str],
                         timesteps: np.ndarray) -> np.ndarray:
    """Per-token cross-attention maps averaged over heads, layers and sampling steps.

    ``trajectory`` [S, B, h, w, c] are the x_t the sampler visited at ``timesteps`` [S]; the U-Net is
    re-run on each with the prompts' context (conditional branch) to read its attention probabilities.
    Each layer's [B, heads, h_l·w_l, L] is averaged over heads, resized to h × w and averaged over layers
    and steps. Returns [B, h, w, L]: for each image and token, where that token was looked at.
    """
    from ddpm_jax.models.unet import apply_with_attention_maps

    if model.text_encoder is None:
        raise ValueError("attention maps need a text-conditional model (condition.kind='text')")
    context = jnp.asarray(model.text_encoder(list(prompts)))                              # [B, L, D]
    h, w = trajectory.shape[2:4]

    @jax.jit
    def maps_at(x_t: jax.Array, t: jax.Array) -> jax.Array:
        _, maps = apply_with_attention_maps(model.unet, model.params, x_t, jnp.full((x_t.shape[0],), t), context)
        per_layer = []
        for probs in maps.values():                                                      # [B, heads, hw_l, L]
            side = int(round(np.sqrt(probs.shape[2] * w / h)))
            m = probs.mean(axis=1).reshape(probs.shape[0], probs.shape[2] // side, side, probs.shape[3])
            per_layer.append(jax.image.resize(m, (m.shape[0], h, w, m.shape[3]), "bilinear"))
        return jnp.mean(jnp.stack(per_layer), axis=0)                                    # [B, h, w, L]

    total = sum(maps_at(jnp.asarray(x), jnp.int32(t)) for x, t in zip(trajectory, timesteps))
    return np.asarray(total / len(timesteps))


def save_attention_overlays(images: np.ndarray, maps: np.ndarray, tokens: Sequence[str],
                            path: str | os.PathLike) -> pathlib.Path:
    """One row per image: the image, then its map for each token overlaid (hot = attended). PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddpm_jax import plotting

    rows, cols = len(images), len(tokens) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    for i in range(rows):
        gray = (np.asarray(images[i]).mean(axis=-1) + 1) / 2                              # [H, W] in [0, 1]
        axes[i, 0].imshow(gray, cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title("image", fontsize=7)
        for j, token in enumerate(tokens):
            m = np.asarray(jax.image.resize(jnp.asarray(maps[i, :, :, j]), gray.shape, "bilinear"))
            axes[i, j + 1].imshow(gray, cmap="gray", vmin=0, vmax=1)
            axes[i, j + 1].imshow(m, cmap="jet", alpha=0.5)
            axes[i, j + 1].set_title(token, fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    return plotting.save_figure(fig, path)


def prompt_tokens(encoder: TextEncoder, prompt: str) -> list[str]:
    """The prompt's tokens as text, from the start token through the end token (not the padding):
    position j of the list is position j of the context, the last axis of the attention maps."""
    tok = encoder.tokenizer
    ids = encoder.token_ids([prompt])[0]
    n = int(np.argmax(ids == tok.eos_token_id)) + 1
    special = {tok.bos_token_id: "<start>", tok.eos_token_id: "<end>"}
    return [special.get(int(i)) or tok.decode([int(i)]).strip() for i in ids[:n]]


def run_txt2img_workdir(workdir: str | os.PathLike, prompts: Sequence[str], guidance_scale: float | None = None,
                        steps: int | None = None, seed: int = 0, out: str | os.PathLike | None = None,
                        attention_maps: bool = False, eta: float | None = None) -> list[pathlib.Path]:
    """`ddpm-jax txt2img --workdir`: one image per prompt from a text-conditional workdir, as a PNG grid.

    With ``attention_maps`` also ``<out stem>_attention.png``: per prompt, the image and the
    cross-attention map of each of its tokens (averaged over heads, layers and sampling steps).
    Returns the written paths.
    """
    from ddpm_jax import plotting

    model = load_workdir_model(workdir)
    if model.kind != "text":
        raise ValueError(f"workdir {os.fspath(workdir)!r} is not a text-conditional model (condition.kind="
                         f"{model.kind!r}); use `ddpm-jax sample` for it")
    prompts = list(prompts)
    result = generate(model, prompts=prompts, guidance_scale=guidance_scale, steps=steps, eta=eta, seed=seed,
                      return_latents=attention_maps)
    out_path = pathlib.Path(out) if out else pathlib.Path(workdir) / "txt2img.png"
    written = [plotting.save_image_grid(result["images"], out_path)]
    if attention_maps:
        from ddpm_jax import samplers

        T = model.schedule.num_timesteps
        timesteps = (samplers.ddim_timesteps(T, int(steps or model.config.sample.steps))
                     if model.config.sample.get("sampler", "ddim") == "ddim" else np.arange(T)[::-1])
        trajectory = result["trajectory"][:-1]                       # x_t fed to step k is at timesteps[k]
        maps = token_attention_maps(model, trajectory, prompts, np.asarray(timesteps))    # [B, h, w, L]
        for i, prompt in enumerate(prompts):
            tokens = prompt_tokens(model.text_encoder, prompt)
            path = out_path.with_name(f"{out_path.stem}_attention_{i}.png")
            written.append(save_attention_overlays(result["images"][i:i + 1], maps[i:i + 1, :, :, :len(tokens)],
                                                   tokens, path))
    return written
