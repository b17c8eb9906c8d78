"""Figures: image grids, loss curves, the forward process, and sampling trajectories.

Image grids are written straight with PIL (pixels in, pixels out: no axes, no resampling blur);
plots with axes use whatever matplotlib backend is active and are saved, never shown: on a headless
machine that is "Agg" (matplotlib's own choice without a display); in a notebook the inline backend stays on,
because the library never switches backends. Every function takes images as NHWC float arrays in [-1, 1] (NumPy or JAX), writes one PNG,
and returns its path.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ddpm_jax import diffusion, schedules

__all__ = [
    "to_uint8",
    "make_grid",
    "save_image_grid",
    "read_metrics",
    "smooth",
    "plot_loss_curve",
    "forward_timesteps",
    "plot_forward_process",
    "save_trajectory_strip",
    "new_figure",
    "save_figure",
]

PathLike = str | pathlib.Path


# ---------------------------------------------------------------------------------------------
# Image grids
# ---------------------------------------------------------------------------------------------


def to_uint8(images: Any) -> np.ndarray:
    """[-1, 1] floats -> 0..255 uint8 (values outside [-1, 1] are clipped)."""
    x = np.asarray(images, dtype=np.float32)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def make_grid(images: Any, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tiles [N, H, W, C] images in [-1, 1] into one uint8 [rows*(H+p)+p, nrow*(W+p)+p, C] array.

    ``nrow`` is the number of images per row (default: about √N, so the grid is roughly square).
    """
    x = to_uint8(images)
    if x.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C], got shape {x.shape}")
    n, h, w, c = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = x[i]
    return grid


def _save_png(pixels: np.ndarray, path: PathLike, min_tile: int, tile: int) -> pathlib.Path:
    """Writes a uint8 [H, W, 1|3] array, upscaled (nearest) so each ``tile``-px image is ≥ ``min_tile`` px."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    scale = max(1, math.ceil(min_tile / tile))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    image.save(path)
    return path


def save_image_grid(
    images: Any, path: PathLike, nrow: int | None = None, min_tile: int = 64
) -> pathlib.Path:
    """Saves [N, H, W, C] images in [-1, 1] (C = 1 grayscale or 3 RGB) as one PNG grid.

    Small images are enlarged by an integer factor (nearest neighbour, so pixels stay sharp) until
    each is at least ``min_tile`` pixels wide: a 16×16 digit is shown 64×64.
    """
    images = np.asarray(images)
    return _save_png(make_grid(images, nrow), path, min_tile, images.shape[2])


def save_trajectory_strip(
    trajectory: Any, path: PathLike, num_frames: int = 10, max_rows: int = 8, min_tile: int = 64
) -> pathlib.Path:
    """Saves a sampling chain [S, B, H, W, C] as a strip: one row per sample, x_T on the left.

    ``num_frames`` frames are taken evenly along the chain, always including its first (pure noise)
    and last (the sample) frame; at most ``max_rows`` samples are shown.
    """
    traj = np.asarray(trajectory)
    if traj.ndim != 5:
        raise ValueError(f"expected a trajectory [S, B, H, W, C], got shape {traj.shape}")
    steps = traj.shape[0]
    frames = np.unique(np.linspace(0, steps - 1, min(num_frames, steps)).round().astype(int))
    strip = traj[frames, :max_rows]                    # [F, R, H, W, C]
    strip = np.swapaxes(strip, 0, 1)                   # [R, F, H, W, C]: a row per sample
    rows, cols = strip.shape[:2]
    return save_image_grid(strip.reshape(rows * cols, *strip.shape[2:]), path, nrow=cols, min_tile=min_tile)


# ---------------------------------------------------------------------------------------------
# Loss curve
# ---------------------------------------------------------------------------------------------


def read_metrics(metrics_jsonl_path: PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line; blank lines skipped)."""
    lines = pathlib.Path(metrics_jsonl_path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def smooth(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
    """TensorBoard-style exponential moving average, bias-corrected so the first points are not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1.0 - weight) * float(v)
        out.append(avg / (1.0 - weight ** (i + 1)))
    return np.asarray(out)


def plot_loss_curve(
    metrics_jsonl_path: PathLike, png_path: PathLike, key: str = "loss", weight: float = 0.9
) -> pathlib.Path:
    """Plots ``key`` against ``step`` from a metrics.jsonl file: raw (faint) and smoothed, log scale."""
    records = [r for r in read_metrics(metrics_jsonl_path) if key in r]
    if not records:
        raise ValueError(f"{metrics_jsonl_path} has no records with a {key!r} field")
    steps = [r.get("step", i) for i, r in enumerate(records)]
    values = [r[key] for r in records]
    fig = new_figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(steps, values, alpha=0.3, lw=1, label=key)
    ax.plot(steps, smooth(values, weight), lw=2, label=f"{key} (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, png_path)


def new_figure(**kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure`` outside pyplot: drawing and saving it needs no backend switch (a notebook's
    inline backend stays on) and it never shows up by itself; ``kwargs`` go to ``Figure`` (figsize, dpi, …)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(fig: Any, path: PathLike, dpi: int = 120) -> pathlib.Path:
    """Write a matplotlib figure to ``path`` (PNG at ``dpi``, parent folders created), return the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------------------------------------
# Forward process
# ---------------------------------------------------------------------------------------------


def forward_timesteps(num_timesteps: int) -> list[int]:
    """The indices ``plot_forward_process`` shows by default: the paper's t = 1 and t = f·T for
    f = .05, .1, .2, .3, .5, .7, 1 (index = t − 1; T = 1000: t = 1, 50, 100, 200, 300, 500, 700, 1000)."""
    fractions = np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    return sorted(set((np.maximum(1, (fractions * int(num_timesteps)).round()) - 1).astype(int).tolist()))


def plot_forward_process(
    x0: Any,
    schedule: Any,
    path: PathLike,
    timesteps: Sequence[int] | None = None,
    compare: Sequence[str] = ("linear", "cosine"),
    seed: int = 0,
) -> pathlib.Path:
    """Draws q(x_t | x_0) for K images at several t, beside ᾱ_t and SNR_t = ᾱ_t / (1 − ᾱ_t).

    Left: one row per image, one column per timestep, x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (Eq. 4, via
    ``diffusion.q_sample``, the same ε for every column so only t changes). Right: ᾱ_t and the SNR
    (log scale) of ``schedule`` and of the named schedules in ``compare`` at the same T.

    Args:
      x0: [K, H, W, C] clean images in [-1, 1].
      schedule: a ``schedules.Schedule``.
      timesteps: indices 0..T-1 to show (labelled with the paper's t = index + 1); default
        ``forward_timesteps(T)``, denser early on, where the digits fade.
    """
    import jax
    import jax.numpy as jnp

    x0 = jnp.asarray(x0, jnp.float32)
    num_t = int(schedule.num_timesteps)
    if timesteps is None:
        timesteps = forward_timesteps(num_t)
    eps = jax.random.normal(jax.random.key(seed), x0.shape)
    columns = [
        diffusion.q_sample(schedule, x0, jnp.full((x0.shape[0],), t, jnp.int32), eps) for t in timesteps
    ]  # each [K, H, W, C]
    k, cols = x0.shape[0], len(timesteps)
    grid_images = np.stack([np.asarray(c) for c in columns], axis=1).reshape(k * cols, *x0.shape[1:])
    grid = make_grid(grid_images, nrow=cols)

    fig = new_figure(figsize=(4 + 1.1 * cols, max(3.0, 1.1 * k + 1)))
    ax_img = fig.add_axes([0.02, 0.1, 0.55, 0.8])
    ax_img.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    cell = grid.shape[1] / cols
    ax_img.set_xticks([cell * (i + 0.5) for i in range(cols)], [f"t={t + 1}" for t in timesteps], fontsize=9)
    ax_img.set_yticks([])
    ax_img.set_title("x_t ~ q(x_t | x_0)  (paper's t = index + 1)", fontsize=9)

    ax_abar = fig.add_axes([0.64, 0.55, 0.34, 0.35])
    ax_snr = fig.add_axes([0.64, 0.1, 0.34, 0.35])
    curves = [("this run", schedule)] + [
        (name, schedules.get_schedule(name, num_t)) for name in compare
    ]
    steps = np.arange(1, num_t + 1)
    for label, s in curves:
        abar = np.asarray(s.alphas_cumprod, np.float64)
        ax_abar.plot(steps, abar, lw=2 if label == "this run" else 1, label=label)
        ax_snr.plot(steps, abar / np.maximum(1.0 - abar, 1e-12), lw=2 if label == "this run" else 1)
    ax_abar.set_ylabel("ᾱ_t")
    ax_abar.legend(fontsize=7)
    ax_snr.set_yscale("log")
    ax_snr.set_ylabel("SNR = ᾱ/(1−ᾱ)")
    ax_snr.set_xlabel("t")
    for ax in (ax_abar, ax_snr):
        ax.grid(alpha=0.3)
        for t in timesteps:
            ax.axvline(t + 1, color="gray", lw=0.5, alpha=0.5)
    return save_figure(fig, path)
