"""What is diffused (pixels or an autoencoder's latents) and what conditions it, for training.

The diffusion equations and the training step do not change between a DDPM on pixels, a
class-conditional model and Stable Diffusion's latent text-to-image model; what changes is the data
they see. This module builds that data from a config:

    images ──(AutoencoderKL.encode_latents, if config.latent.autoencoder)──► x0 [N, h, w, c]
    labels ──────────────────────────────────────────────────────────────► "label" [N]
    captions ──(tokenizer → CLIP text transformer, frozen)─────────────────► "context" [N, L, D]

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

import jax
import ml_collections
import numpy as np

from ddpm_jax import data as data_lib
from ddpm_jax import guidance
from ddpm_jax.data import DIGIT_NAMES
from ddpm_jax.diffusion_model import LatentCodec, condition_kind
from ddpm_jax.models.unet import check_condition
from ddpm_jax.workdir import load_latent_codec, load_text_encoder, unet_config


# ================================================================================================
# Training data
# ================================================================================================

@dataclasses.dataclass
class DiffusionData:
    """What the diffusion training step sees, and what its sample grids are conditioned on.

    arrays:          "x0" [N, h, w, c] (images or scaled latents; pixel images stay a lazy
                     ``data.ImageSource``, decoded per batch), plus "label" [N] int or
                     "context" [N, L, D] for a conditional model (``guidance.CONDITION_KEYS``).
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


def load_training_data(config: ml_collections.ConfigDict, num_grid: int = 16) -> DiffusionData:
    """The arrays for ``training.diffusion.train`` from ``config.data``, ``config.condition`` and ``config.latent``.

    Raises ValueError for a condition the U-Net config cannot take (see :func:`check_model_fits`).
    """
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
        dataset = data_lib.open_dataset(config.data)   # lazy: decoded per batch (256² datasets fit)
        images = dataset
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
    arrays["x0"] = images if codec is None else codec.encode(images)   # encoded 250 images at a time
    result = DiffusionData(arrays, null, grid, titles, codec)
    check_model_fits(config, result)
    return result


def check_model_fits(config: ml_collections.ConfigDict, data: DiffusionData) -> None:
    """One-line ValueErrors when the U-Net config does not fit the data: x0's size/channels (e.g. a VAE
    whose latent channels differ from the U-Net's in_channels), the context's width, the label range."""
    unet = unet_config(config)
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
    check_condition(unet, **guidance.model_condition({k: v[:8] for k, v in data.arrays.items() if k != "x0"}))
