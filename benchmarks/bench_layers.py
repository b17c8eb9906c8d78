"""Layer-level profile: where does the U-Net's CPU time go, JAX (XLA:CPU) vs PyTorch (oneDNN)?

Times the two operations that make up almost all of a small U-Net — the 3×3 convolution (forward, and
forward + backward) and GroupNorm — at the MNIST demo's shapes, in JAX and, when installed, in torch
with the same number of threads. This is the profile behind the "why is diffusers faster on this
CPU" paragraph of benchmarks/README.md.

    python benchmarks/bench_layers.py                       # the demo's shapes, batch 64
    python benchmarks/bench_layers.py --shapes 8x32x32x128  # B x H x W x C, several allowed

torch is used only here, as a reference; the library never imports it.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.layers import GroupNorm

DEFAULT_SHAPES = ("64x16x16x32", "64x8x8x64", "64x16x16x64")  # [B, H, W, C] of the MNIST demo's U-Net


def _time_ms(fn: Callable[[], object], sync: Callable[[object], object], iters: int) -> float:
    sync(fn())  # warm-up (and compile)
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    sync(out)
    return (time.perf_counter() - start) / iters * 1e3


def jax_times(shape: tuple[int, int, int, int], groups: int, iters: int) -> dict[str, float]:
    """conv 3×3 forward, conv forward+backward, GroupNorm (ours and Flax's) forward and forward+backward,
    in ms (NHWC, float32)."""
    b, h, w, c = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, h, w, c)), jnp.float32)       # [B, H, W, C]
    k = jnp.asarray(rng.standard_normal((3, 3, c, c)) * 0.05, jnp.float32)  # [3, 3, C, C] HWIO

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    gamma, beta = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
    ours = GroupNorm(groups, epsilon=1e-6)                               # ddpm_jax.models.layers (the U-Net's)
    flax_gn = nn.GroupNorm(groups, epsilon=1e-6)                         # Flax's, what it replaced
    gn_params = {"params": {"scale": gamma, "bias": beta}}
    fwd = jax.jit(conv)
    fwd_bwd = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=(0, 1)))
    sync = jax.block_until_ready
    times = {"conv_fwd": _time_ms(lambda: fwd(x, k), sync, iters),
             "conv_fwd_bwd": _time_ms(lambda: fwd_bwd(x, k), sync, iters)}
    for name, module in (("group_norm", ours), ("group_norm_flax", flax_gn)):
        norm = jax.jit(lambda p, x, m=module: m.apply(p, x))
        norm_grad = jax.jit(jax.grad(lambda p, x, m=module: jnp.sum(m.apply(p, x) ** 2), argnums=(0, 1)))
        times[name] = _time_ms(lambda: norm(gn_params, x), sync, iters)
        times[name + "_fwd_bwd"] = _time_ms(lambda: norm_grad(gn_params, x), sync, iters)
    return times


def torch_times(shape: tuple[int, int, int, int], groups: int, iters: int) -> dict[str, float] | None:
    """The same three measurements in torch (NCHW, its native layout), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    b, h, w, c = shape
    x = torch.randn(b, c, h, w)
    k = torch.randn(c, c, 3, 3) * 0.05
    xg, kg = x.clone().requires_grad_(), k.clone().requires_grad_()

    gamma, beta = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)

    def fwd_bwd():
        (torch.nn.functional.conv2d(xg, kg, padding=1) ** 2).sum().backward()

    def norm_fwd_bwd():
        (torch.nn.functional.group_norm(xg, groups, gamma, beta, 1e-6) ** 2).sum().backward()

    with torch.no_grad():
        conv_fwd = _time_ms(lambda: torch.nn.functional.conv2d(x, k, padding=1), lambda o: o, iters)
        group_norm = _time_ms(lambda: torch.nn.functional.group_norm(x, groups, gamma, beta, 1e-6), lambda o: o, iters)
    norm_bwd = _time_ms(norm_fwd_bwd, lambda o: o, iters)
    return {"conv_fwd": conv_fwd, "conv_fwd_bwd": _time_ms(fwd_bwd, lambda o: o, iters), "group_norm": group_norm,
            "group_norm_fwd_bwd": norm_bwd, "group_norm_flax": group_norm, "group_norm_flax_fwd_bwd": norm_bwd}


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 4:
        raise ValueError(f"--shapes takes BxHxWxC, e.g. 64x16x16x32; got {text!r}")
    return parts  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="BxHxWxC")
    parser.add_argument("--groups", type=int, default=8, help="GroupNorm groups (the demo's 8)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"JAX {jax.__version__} on {jax.devices()[0]}, {os.cpu_count()} cores; times in ms (mean over --iters calls after a warm-up)")
    print(f"{'B x H x W x C':>16}  {'op':>23}  {'jax':>8}  {'torch':>8}  {'jax/torch':>9}")
    rows = []
    for text in args.shapes:
        shape = parse_shape(text)
        ours = jax_times(shape, args.groups, args.iters)
        ref = torch_times(shape, args.groups, args.iters)
        for op, ms in ours.items():
            ref_ms = None if ref is None else ref[op]
            ratio = "" if ref_ms is None else f"{ms / ref_ms:9.2f}"
            print(f"{text:>16}  {op:>23}  {ms:8.2f}  {'' if ref_ms is None else f'{ref_ms:8.2f}':>8}  {ratio}")
            rows.append({"shape": text, "op": op, "jax_ms": ms, "torch_ms": ref_ms})
    return rows


if __name__ == "__main__":
    main()
