"""Classifier-free guidance (Ho & Salimans 2021): one network, conditional and unconditional.

Training (Algorithm 1): the condition c of each example is replaced by a null condition ∅ with
probability p_uncond (``drop_condition``), so the same network learns ε_θ(x_t, c) and ε_θ(x_t, ∅).

Sampling (Algorithm 2, Eq. 6): the two predictions are extrapolated,

    ε̂(x_t, c) = ε_θ(x_t, ∅) + w · (ε_θ(x_t, c) − ε_θ(x_t, ∅))

w = 1 is the plain conditional model, w = 0 the unconditional one, w > 1 trades diversity for
fidelity to c (Stable Diffusion's default is 7.5). Ho & Salimans write the same thing as
(1 + w') ε(c) − w' ε(∅) with w' = w − 1; we use diffusers' w ("guidance_scale").
A *negative prompt* is this formula with an arbitrary condition in place of ∅: the sample is
pushed away from it.

``guided_eps_fn`` returns an ``eps_fn(x_t, t)`` for every sampler in ``samplers.py``: ONE batched
model call on [x_t; x_t] with [c; ∅] (twice the batch, not two calls), then the split and Eq. 6.
The guidance scale is an ordinary traced value, so a jitted sampler taking w as an argument
compiles once for all w. The same formula is linear, so it applies unchanged to a model that
predicts v or x₀ instead of ε.

Null conditions (document them with the model they were trained with):

* class labels: an extra "no class" index, ``null_class_label(num_classes) == num_classes``; the
  U-Net then needs ``num_class_embeds = num_classes + 1``.
* context sequences [B, L, D]: Stable Diffusion uses the text encoder's output for the empty
  prompt "" (NOT zeros: the CLIP states of "" are start/end/padding tokens with positions); a model
  trained from scratch may use zeros ([L, D] or a scalar 0). Either way, sample with the same ∅ it
  was trained with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import EpsFn
from ddpm_jax.models.unet import UNet, check_condition

Array = jax.Array
ModelFn = Callable[[Array, Array, Any], Array]  # (x_t, t, cond) -> model output; cond: a pytree with leading dim B
UNET_CONDITION_KEYS = ("context", "class_labels", "text_embeds", "time_ids")  # the U-Net's condition arguments


def _concrete_float(value: Any) -> float | None:
    """``float(value)``, or None when it is a tracer (inside jit: cannot be checked in Python)."""
    if isinstance(value, jax.core.Tracer):
        return None
    return float(np.asarray(value))


def check_guidance_scale(guidance_scale: float | Array) -> None:
    """ValueError when the guidance scale is not a finite number (checked only outside jit)."""
    if jnp.ndim(guidance_scale) != 0:
        raise ValueError(f"guidance_scale must be a scalar, got shape {jnp.shape(guidance_scale)}")
    value = _concrete_float(guidance_scale)
    if value is not None and not math.isfinite(value):
        raise ValueError(f"guidance_scale must be a finite number (e.g. 7.5; 1 = no guidance), got {value}")


def guide(eps_cond: Array, eps_uncond: Array, guidance_scale: float | Array) -> Array:
    """Eq. 6 of Ho & Salimans 2021 (diffusers' convention): ε̂ = ε(∅) + w · (ε(c) − ε(∅))."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def rescale_guidance(guided: Array, cond: Array, guidance_rescale: float | Array) -> Array:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps Are Flawed"), Eqs. 15–16 (diffusers'
    ``rescale_noise_cfg``): x_rescaled = x_cfg · σ(x_pos) / σ(x_cfg) (Eq. 15), x_final = φ x_rescaled + (1 − φ) x_cfg
    (Eq. 16), σ the standard deviation of each example over all its entries; guided = x_cfg [B, …] (Eq. 6),
    cond = x_pos [B, …]; φ = ``guidance_rescale`` (0 = plain guidance, exactly). Against over-exposure of
    v-prediction models at large w."""
    axes = tuple(range(1, guided.ndim))
    phi = jnp.asarray(guidance_rescale, jnp.float32).astype(guided.dtype)
    rescaled = guided * (jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True))  # Eq. 15
    return jnp.where(phi > 0, phi * rescaled + (1 - phi) * guided, guided)                               # Eq. 16


def _batched(cond: Any, batch: int, what: str) -> Any:
    """Every leaf with leading dim ``batch``; a leading 1 (one condition for all) is broadcast."""

    def leaf(a):
        a = jnp.asarray(a)
        if a.ndim == 0 or a.shape[0] not in (1, batch):
            raise ValueError(f"each {what} entry needs a leading batch dimension 1 or {batch} (the batch of x_t), got shape {a.shape}")
        return jnp.broadcast_to(a, (batch,) + a.shape[1:])

    return jax.tree.map(leaf, cond)


def guided_eps_fn(model_fn: ModelFn, cond: Any, uncond: Any, guidance_scale: float | Array,
                  guidance_rescale: float | Array = 0.0) -> EpsFn:
    """Classifier-free guidance as an ``eps_fn(x_t, t)`` for the samplers (Ho & Salimans 2021, Eq. 6).

    Args:
      model_fn: ``model_fn(x_t, t, cond) -> ε̂`` with x_t [N, …], t [N] and cond a pytree of arrays
        with leading dim N (e.g. ``unet_model_fn(unet, params)``, whose cond is a dict of U-Net inputs).
      cond: the condition c, leaves with leading dim B (the batch of x_t) or 1 (shared by the batch).
      uncond: the same structure: the null condition ∅ (unconditional), or a negative prompt.
      guidance_scale: w, a Python float or a (traced) scalar array; 1 = no guidance.
      guidance_rescale: φ of Lin et al. 2024 Eq. 16 (``rescale_guidance``), traced too; 0 = none.
    Returns:
      ``eps_fn(x_t, t) = ε(x_t, ∅) + w (ε(x_t, c) − ε(x_t, ∅))`` computed with ONE call of model_fn on
      the doubled batch [x_t; x_t], [t; t], [c; ∅].
    """
    check_guidance_scale(guidance_scale)
    if jax.tree.structure(cond) != jax.tree.structure(uncond):
        raise ValueError(
            f"cond and uncond must have the same structure, got {jax.tree.structure(cond)} and {jax.tree.structure(uncond)}"
        )
    w = jnp.asarray(guidance_scale, jnp.float32)

    def eps_fn(x_t: Array, t: Array) -> Array:
        batch = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))  # [B]
        both = jax.tree.map(
            lambda c, u: jnp.concatenate([c, u.astype(c.dtype)]), _batched(cond, batch, "cond"), _batched(uncond, batch, "uncond")
        )  # leaves [2B, …]: c first, ∅ second
        out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), both)  # [2B, H, W, C]
        eps_cond, eps_uncond = jnp.split(out, 2)  # [B, H, W, C] each
        return rescale_guidance(guide(eps_cond, eps_uncond, w.astype(out.dtype)), eps_cond, guidance_rescale)

    return eps_fn


def unet_model_fn(unet: UNet, params: Any) -> ModelFn:
    """``(x_t, t, cond) -> unet.apply({"params": params}, x_t, t, **cond)``, cond a dict with "context"
    ([N, L, D]) and/or "class_labels" ([N] or [N, D_proj]), and for SDXL "text_embeds" [N, D_pooled] and
    "time_ids" [N, 6]: the U-Net's keyword arguments (``UNET_CONDITION_KEYS``)."""

    def model_fn(x_t: Array, t: Array, cond: Mapping[str, Array]) -> Array:
        return unet.apply({"params": params}, x_t, t, **cond)

    return model_fn


def _check_unet_condition(unet: UNet, cond: Any, name: str) -> None:
    if not isinstance(cond, Mapping) or set(cond) - set(UNET_CONDITION_KEYS):
        keys = sorted(cond) if isinstance(cond, Mapping) else type(cond).__name__
        raise ValueError(f"{name} must be a dict with keys among {UNET_CONDITION_KEYS} (the U-Net's inputs), got {keys}")
    check_condition(unet.config, *(cond.get(key) for key in UNET_CONDITION_KEYS))


def unet_guided_eps_fn(
    unet: UNet, params: Any, cond: Mapping[str, Array], uncond: Mapping[str, Array], guidance_scale: float | Array
) -> EpsFn:
    """``guided_eps_fn`` for our U-Net, after checking both conditions against its config.

    Call it OUTSIDE jit with concrete conditions to have class labels range-checked (inside jit only
    shapes can be checked; see ``models.unet.check_condition``); e.g. for a class-conditional model
    ``cond={"class_labels": labels}``, ``uncond={"class_labels": jnp.full_like(labels, num_classes)}``,
    for a text-conditional one ``cond={"context": text_states}``, ``uncond={"context": empty_prompt_states}``.
    """
    _check_unet_condition(unet, cond, "cond")
    _check_unet_condition(unet, uncond, "uncond")
    return guided_eps_fn(unet_model_fn(unet, params), dict(cond), dict(uncond), guidance_scale)


# --------------------------------------------------------------------------------------------
# Training: conditioning dropout
# --------------------------------------------------------------------------------------------


def null_class_label(num_classes: int) -> int:
    """The "no class" label ∅ for ``num_classes`` real classes: the extra index ``num_classes``
    (so the class-conditional U-Net has ``num_class_embeds = num_classes + 1``)."""
    return num_classes


def _per_example(null: Any, example_shape: tuple[int, ...], dtype: Any) -> Array:
    null = jnp.asarray(null)
    if null.shape == (1,) + example_shape:
        null = null[0]
    if null.shape not in ((), example_shape):
        raise ValueError(
            f"null_cond of shape {null.shape} does not fit one example of cond, shape {example_shape} "
            f"(give {example_shape}, (1, *{example_shape}) or a scalar)"
        )
    return jnp.broadcast_to(null, example_shape).astype(dtype)


def drop_condition(key: Array, cond: Any, null_cond: Any, p: float | Array = 0.1) -> Any:
    """Conditioning dropout (Ho & Salimans 2021, Algorithm 1): each example's condition becomes ∅ w.p. p.

    Args:
      key: a PRNG key; one Bernoulli(p) draw per example.
      cond: the batch's condition, an array with leading dim B (class labels [B], contexts [B, L, D])
        or a pytree of such arrays (e.g. {"class_labels": …, "context": …}: an example drops all of them
        together).
      null_cond: ∅, same structure; each leaf one example's value (e.g. ``null_class_label(C)``; the
        empty-prompt states [L, D] or [1, L, D]; 0.0 for a zero context), broadcast to the batch.
      p: the drop probability p_uncond (0.1 in Ho & Salimans; 0.1 also in SD fine-tuning).
    Returns:
      cond with the dropped examples replaced by null_cond, same shapes and dtypes.
    """
    value = _concrete_float(p)
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"the drop probability p must be in [0, 1] (0.1 is usual), got {value}")
    if jax.tree.structure(cond) != jax.tree.structure(null_cond):
        raise ValueError(
            f"cond and null_cond must have the same structure, got {jax.tree.structure(cond)} and {jax.tree.structure(null_cond)}"
        )
    leaves = [jnp.asarray(a) for a in jax.tree.leaves(cond)]
    if not leaves or any(a.ndim == 0 for a in leaves) or len({a.shape[0] for a in leaves}) != 1:
        raise ValueError(f"cond needs arrays with one leading batch dimension B, got shapes {[a.shape for a in leaves]}")
    batch = leaves[0].shape[0]
    drop = jax.random.bernoulli(key, p, (batch,))  # [B], True = use ∅

    def replace(c, null):
        c = jnp.asarray(c)
        null = _per_example(null, c.shape[1:], c.dtype)
        return jnp.where(drop.reshape((batch,) + (1,) * (c.ndim - 1)), null[None], c)

    return jax.tree.map(replace, cond, null_cond)


# --------------------------------------------------------------------------------------------
# How a batch's condition reaches the U-Net
# --------------------------------------------------------------------------------------------

CONDITION_KEYS = ("label", "context")  # the data entries besides "x0" that condition the model


def model_condition(cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The U-Net keyword arguments for a batch's condition: label → class_labels, context → context."""
    names = {"label": "class_labels", "context": "context"}
    return {names[k]: v for k, v in cond.items()}
