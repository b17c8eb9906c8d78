"""Per-token cross-attention maps: which pixels does the word "seven" look at (Hertz et al. 2022, Fig. 4).

Stable Diffusion's U-Net reads the prompt through cross-attention, softmax(Q Kᵀ/√d) with queries from the
image positions and keys from the text tokens (LDM Eq. 3). Averaging those probabilities over heads, layers
and sampling steps gives, for each token, a map of where it was attended; overlaid on the image it shows
what the text conditions. Used by ``ddpm-jax txt2img --attention-maps`` for text-conditional workdirs and
for Stable Diffusion (``pipelines/stable_diffusion.py``).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import plotting
from ddpm_jax.diffusion_model import DiffusionModel, TextEncoder
from ddpm_jax.models.unet import apply_with_attention_maps
from ddpm_jax.pipelines.generate import generate



def token_attention_maps(model: DiffusionModel, trajectory: np.ndarray, prompts: Sequence[str],
                         timesteps: np.ndarray, condition: dict[str, jax.Array] | None = None) -> np.ndarray:
    """Per-token cross-attention maps averaged over heads, layers and sampling steps.

    ``trajectory`` [S, B, h, w, c] are the x_t the sampler visited at ``timesteps`` [S]; the U-Net is
    re-run on each with the prompts' context (conditional branch) to read its attention probabilities.
    Each layer's [B, heads, h_l·w_l, L] is averaged over heads, resized to h × w and averaged over layers
    and steps. Returns [B, h, w, L]: for each image and token, where that token was looked at.
    ``condition``: the U-Net's condition arguments for the prompts (default {"context": text_encoder(prompts)};
    SDXL's pipeline passes its context, text_embeds and time_ids).
    """
    if model.text_encoder is None:
        raise ValueError("attention maps need a text-conditional model (condition.kind='text')")
    if condition is None:
        condition = {"context": jnp.asarray(model.text_encoder(list(prompts)))}          # [B, L, D]
    h, w = trajectory.shape[2:4]

    @jax.jit
    def maps_at(x_t: jax.Array, t: jax.Array) -> jax.Array:
        _, maps = apply_with_attention_maps(model.unet, model.params, x_t, jnp.full((x_t.shape[0],), t), **condition)
        per_layer = []
        for probs in maps.values():                                                      # [B, heads, hw_l, L]
            side = int(round(np.sqrt(probs.shape[2] * w / h)))
            m = probs.mean(axis=1).reshape(probs.shape[0], probs.shape[2] // side, side, probs.shape[3])
            per_layer.append(jax.image.resize(m, (m.shape[0], h, w, m.shape[3]), "bilinear"))
        return jnp.mean(jnp.stack(per_layer), axis=0)                                    # [B, h, w, L]

    total = sum(maps_at(jnp.asarray(x), jnp.asarray(t)) for x, t in zip(trajectory, timesteps))
    return np.asarray(total / len(timesteps))


def save_attention_overlays(images: np.ndarray, maps: np.ndarray, tokens: Sequence[str],
                            path: str | os.PathLike) -> pathlib.Path:
    """One row per image: the image, then its map for each token overlaid (hot = attended). PNG."""
    rows, cols = len(images), len(tokens) + 1
    fig = plotting.new_figure(figsize=(1.6 * cols, 1.7 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
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


def txt2img_to_files(model: DiffusionModel, prompts: Sequence[str], out: str | os.PathLike, *,
                     guidance_scale: float | None = None, steps: int | None = None, seed: int = 0,
                     attention_maps: bool = False, eta: float | None = None, sampler: str | None = None
                     ) -> list[pathlib.Path]:
    """`ddpm-jax txt2img --workdir`: one image per prompt from a text-conditional model, as a PNG grid.

    With ``attention_maps`` also ``<out stem>_attention_<i>.png``: per prompt, the image and the
    cross-attention map of each of its tokens (averaged over heads, layers and sampling steps).
    Returns the written paths.
    """
    if model.kind != "text":
        raise ValueError(f"{model.description} is not a text-conditional model (condition.kind={model.kind!r}); "
                         "use `ddpm-jax sample` for it")
    prompts = list(prompts)
    result = generate(model, prompts=prompts, guidance_scale=guidance_scale, steps=steps, eta=eta, seed=seed,
                      return_latents=attention_maps, sampler=sampler)
    out_path = pathlib.Path(out)
    written = [plotting.save_image_grid(result["images"], out_path)]
    if attention_maps:
        # the U-Net's input at step k is model_inputs[k], at timesteps[k] (the runner's Trajectory)
        maps = token_attention_maps(model, result["model_inputs"], prompts, result["timesteps"])  # [B, h, w, L]
        for i, prompt in enumerate(prompts):
            tokens = prompt_tokens(model.text_encoder, prompt)
            path = out_path.with_name(f"{out_path.stem}_attention_{i}.png")
            written.append(save_attention_overlays(result["images"][i:i + 1], maps[i:i + 1, :, :, :len(tokens)],
                                                   tokens, path))
    return written
