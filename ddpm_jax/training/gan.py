"""The GAN trainer: DCGAN (Radford et al. 2016) on the digits, Goodfellow et al. 2014's alternating updates.

The game (``objectives.py``): D maximises V(D, G) = E_x[log D(x)] + E_z[log(1 − D(G(z)))] (Eq. 1); G
minimises it, or in practice (``loss.kind = "non_saturating"``, Goodfellow §3, DCGAN's choice) maximises
log D(G(z)). Algorithm 1 of Goodfellow et al. with k = 1 discriminator step per generator step::

    for each training iteration s:
        x_1..x_B ~ p_data,  z_1..z_B ~ N(0, I)                    (the batch of step s; z from (seed, s, i))
        D step:  ψ ← Adam_ψ( ∇_ψ L_D(D_ψ(x), D_ψ(G_θ(z))) )        L_D = −V (or the hinge loss)
        z'_1..z'_B ~ N(0, I)
        G step:  θ ← Adam_θ( ∇_θ L_G(D_ψ(G_θ(z'))) ),  θ_ema ← β θ_ema + (1 − β) θ     (with the updated D)

Each player has its own compiled step (``loop.compile_step``: one ``jax.jit`` over the device mesh,
batch sharded on "data", state replicated and donated) and its own Adam state in :class:`GANState`; the
step ``loop.run`` sees is the two called in turn. Randomness: example i of step s draws its z (D step)
and z' (G step) from ``fold_in(fold_in(fold_in(key, s), i), 0 | 1)``, so a resumed run repeats the same
numbers and the result does not depend on the number of devices. Everything else is the shared loop:
exact resume from the latest checkpoint (both players and both Adam states are in it), the non-finite
stop (on ``loss`` = L_D + L_G, so either player's blow-up stops the run), metrics.jsonl and the bar.

``loss.kind``: "non_saturating" (L_D = −V, L_G = −E log D(G(z))), "minimax" (L_D = −V,
L_G = E log(1 − D(G(z))), Eq. 1 as written; it saturates) or "hinge" (the autoencoder's PatchGAN loss).

Outputs in ``workdir``: config.json, metrics.jsonl (d_loss, g_loss, loss, value = the batch estimate of
V, d_real = mean D(x), d_fake = mean D(G(z)), grad norms, steps_per_sec), loss.png (L_D),
checkpoints/ (``params`` / ``ema_params`` are the generator's, so ``checkpoints.load_params`` reads G),
samples/step_N.png (the same fixed z at every step, EMA generator), interpolation.png (each row slerps
between two fixed latents), and eval.json: ``eval.num_samples`` samples judged by the offline MNIST judge
(``evaluation/judge.py``: confidence, class histogram, classifier FID with its real-digit floor; digits
only) and the measured times (training steps/s, seconds for 64 samples), plus eval_samples.png.

Config (``experiments/gan_mnist.py``)::

    data.name, image_size, channels, num_examples          as for diffusion (data.load_dataset)
    model.latent_dim        int    dimension of z ~ N(0, I)
    model.generator         features (coarsest first), start_size, norm_groups: models/gan.DCGANGenerator
    model.discriminator     features (finest first): models/gan.DCGANDiscriminator
    loss.kind               str    "non_saturating" | "minimax" | "hinge"
    train.batch_size, num_steps, lr (G), disc_lr (D), adam_b1, adam_b2, warmup_steps, grad_clip,
          ema_decay (0 = no EMA: ema_params = params), ema_warmup, seed, log_every, ckpt_every,
          keep_checkpoints, sample_every (0 = only at the end), num_samples, parallel ("jit")
    eval.num_samples        int    samples judged at the end (0 = no eval.json)
    eval.judge              bool   run the MNIST judge (default: digits data, 1 channel)
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import config as config_lib
from ddpm_jax import data as data_lib
from ddpm_jax import parallel, plotting
from ddpm_jax.evaluation import judge as judge_lib
from ddpm_jax.evaluation.report import is_digits
from ddpm_jax.models.gan import DCGANDiscriminator, DCGANGenerator
from ddpm_jax.objectives import GAN_LOSSES, gan_value
from ddpm_jax.training import loop
from ddpm_jax.training.loop import ema_decay_at, ema_update, make_optimizer
from ddpm_jax.workdir import EVAL_FILENAME

PyTree = Any
Metrics = dict[str, jax.Array]
SAMPLING_BENCHMARK = 64  # the sampling time in eval.json is for this many images


# ================================================================================================
# Config → networks, with the checks that give one-line errors
# ================================================================================================

def make_generator(config: ml_collections.ConfigDict) -> DCGANGenerator:
    g = config.model.generator
    return DCGANGenerator(channels=int(config.data.channels), features=tuple(g.features),
                          start_size=int(g.start_size), norm_groups=int(g.get("norm_groups", 8)))


def make_discriminator(config: ml_collections.ConfigDict) -> DCGANDiscriminator:
    return DCGANDiscriminator(features=tuple(config.model.discriminator.features))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Every check that needs no data, so a bad config fails in a second with one line."""
    kind = config.loss.get("kind", "non_saturating")
    if kind not in GAN_LOSSES:
        raise ValueError(f"loss.kind must be one of {tuple(GAN_LOSSES)}, got {kind!r}")
    if config.train.get("parallel", "jit") != "jit":
        raise ValueError(f"train.parallel={config.train.parallel!r}: the GAN trainer runs as sharded jit; use 'jit'")
    g, size, channels = config.model.generator, int(config.data.image_size), int(config.data.channels)
    bad_groups = [c for c in g.features if c % int(g.get("norm_groups", 8))]
    if bad_groups:
        raise ValueError(f"model.generator.norm_groups={g.get('norm_groups', 8)} does not divide the generator's "
                         f"features {bad_groups}; pick groups that divide every entry of model.generator.features")
    z = jax.ShapeDtypeStruct((1, int(config.model.latent_dim)), jnp.float32)
    made = jax.eval_shape(lambda z: make_generator(config).init_with_output(jax.random.key(0), z)[0], z).shape[1:]
    if made != (size, size, channels):
        fix = (f"set model.generator.start_size={size // 2 ** len(g.features)}"
               if size % 2 ** len(g.features) == 0 else "change model.generator.features")
        raise ValueError(
            f"the generator makes {made[0]}×{made[1]}×{made[2]} images (model.generator.start_size={g.start_size} "
            f"doubled by {len(g.features)} transposed convs) but the data are "
            f"{size}×{size}×{channels}: {fix}")
    d_layers = len(config.model.discriminator.features)
    if size % 2 ** d_layers:
        raise ValueError(f"data.image_size={size} is not divisible by 2^{d_layers} (model.discriminator.features "
                         f"has {d_layers} stride-2 convs); use fewer discriminator layers")


# ================================================================================================
# State and the two steps
# ================================================================================================

@flax.struct.dataclass
class GANState:
    """What changes while a GAN trains: the generator and the discriminator, each with its own Adam."""

    step: jax.Array  # int32 [], iterations done (one D step + one G step each)
    params: PyTree  # θ, the generator
    ema_params: PyTree  # EMA of θ, what is sampled from (= params when train.ema_decay = 0)
    opt_state: optax.OptState  # the generator's Adam
    disc_params: PyTree  # ψ, the discriminator
    disc_opt_state: optax.OptState  # the discriminator's Adam
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    disc_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def create_gan_state(generator: DCGANGenerator, disc: DCGANDiscriminator, tx: optax.GradientTransformation,
                     disc_tx: optax.GradientTransformation, key: jax.Array, latent_dim: int,
                     image_shape: tuple[int, int, int]) -> GANState:
    g_key, d_key = jax.random.split(key)
    params = generator.init(g_key, jnp.zeros((1, latent_dim), jnp.float32))["params"]
    disc_params = disc.init(d_key, jnp.zeros((1, *image_shape), jnp.float32))["params"]
    return GANState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params),
                    tx=tx, disc_tx=disc_tx)


def example_latents(key: jax.Array, step: jax.Array, batch_size: int, latent_dim: int, player: int) -> jax.Array:
    """z [B, latent_dim] of step ``step``: example i from fold_in(fold_in(fold_in(key, step), i), player).

    ``player`` 0 is the D step's z, 1 the G step's z'. A function of (seed, step, example index) only.
    """
    step_key = jax.random.fold_in(key, step)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(step_key, i), player))(jnp.arange(batch_size))
    return jax.vmap(lambda k: jax.random.normal(k, (latent_dim,)))(keys)  # [B, latent_dim]


def make_train_steps(generator: DCGANGenerator, disc: DCGANDiscriminator,
                     config: ml_collections.ConfigDict) -> tuple[Callable, Callable]:
    """The two pure steps ``d_step`` and ``g_step``, each ``(state, batch [B, H, W, C], key) -> (state, metrics)``.

    d_step: one Adam step of ψ on L_D(D(x), D(G(z))) with θ fixed; metrics d_loss, value (the batch's V),
    d_real, d_fake (mean D on real and fake), disc_grad_norm. g_step: one Adam step of θ on L_G(D(G(z')))
    with ψ fixed (the D just updated), then the EMA and step + 1; metrics g_loss, grad_norm.
    """
    d_loss_fn, g_loss_fn = GAN_LOSSES[config.loss.get("kind", "non_saturating")]
    latent_dim = int(config.model.latent_dim)
    decay, warmup = float(config.train.get("ema_decay", 0.0)), bool(config.train.get("ema_warmup", False))

    def fake(params: PyTree, state: GANState, batch: jax.Array, key: jax.Array, player: int) -> jax.Array:
        z = example_latents(key, state.step, batch.shape[0], latent_dim, player)  # [B, latent_dim]
        return generator.apply({"params": params}, z)  # [B, H, W, C]

    def d_step(state: GANState, batch: jax.Array, key: jax.Array) -> tuple[GANState, Metrics]:
        x_fake = jax.lax.stop_gradient(fake(state.params, state, batch, key, 0))

        def loss_fn(disc_params: PyTree):
            logits_real = disc.apply({"params": disc_params}, batch)  # [B]
            logits_fake = disc.apply({"params": disc_params}, x_fake)  # [B]
            return d_loss_fn(logits_real, logits_fake), (logits_real, logits_fake)

        (d_loss, (real, fake_logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.disc_params)
        updates, disc_opt_state = state.disc_tx.update(grads, state.disc_opt_state, state.disc_params)
        metrics = {"d_loss": d_loss, "value": gan_value(real, fake_logits), "d_real": jnp.mean(jax.nn.sigmoid(real)),
                   "d_fake": jnp.mean(jax.nn.sigmoid(fake_logits)), "disc_grad_norm": optax.tree.norm(grads)}
        return state.replace(disc_params=optax.apply_updates(state.disc_params, updates),
                             disc_opt_state=disc_opt_state), metrics

    def g_step(state: GANState, batch: jax.Array, key: jax.Array) -> tuple[GANState, Metrics]:
        def loss_fn(params: PyTree) -> jax.Array:
            return g_loss_fn(disc.apply({"params": state.disc_params}, fake(params, state, batch, key, 1)))

        g_loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, decay, warmup))
        new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new, {"g_loss": g_loss, "grad_norm": optax.tree.norm(grads)}

    return d_step, g_step


def compile_train_step(generator: DCGANGenerator, disc: DCGANDiscriminator, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh) -> Callable:
    """The iteration ``loop.run`` calls: the compiled D step, then the compiled G step; metrics of both + loss."""
    d_step, g_step = (loop.compile_step(step, mesh) for step in make_train_steps(generator, disc, config))

    def train_step(state: GANState, batch: jax.Array, key: jax.Array) -> tuple[GANState, Metrics]:
        state, d_metrics = d_step(state, batch, key)
        state, g_metrics = g_step(state, batch, key)
        return state, {**d_metrics, **g_metrics, "loss": d_metrics["d_loss"] + g_metrics["g_loss"]}

    return train_step


# ================================================================================================
# Sampling, interpolation, evaluation
# ================================================================================================

def slerp(z_a: np.ndarray, z_b: np.ndarray, num: int) -> np.ndarray:
    """``num`` latents from z_a to z_b along the great circle (White 2016, "Sampling Generative Networks").

        slerp(z_a, z_b; t) = sin((1 − t)Ω)/sin Ω · z_a + sin(tΩ)/sin Ω · z_b,   cos Ω = ẑ_a · ẑ_b

    A straight line between two draws of N(0, I) in high dimension passes through norms the prior
    almost never produces (the midpoint has ~1/√2 of the typical norm); the arc keeps it typical.
    Args: z_a, z_b [D]. Returns [num, D], t = 0 … 1.
    """
    t = np.linspace(0.0, 1.0, num)[:, None]  # [num, 1]
    cos = np.dot(z_a, z_b) / (np.linalg.norm(z_a) * np.linalg.norm(z_b))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if omega < 1e-6:  # (almost) the same direction: the line
        return (1.0 - t) * z_a + t * z_b
    return (np.sin((1.0 - t) * omega) * z_a + np.sin(t * omega) * z_b) / np.sin(omega)


def interpolation_latents(ends: np.ndarray, num: int = 10) -> np.ndarray:
    """ends [rows, 2, D] → [rows·num, D]: row r slerps from ends[r, 0] to ends[r, 1]."""
    return np.concatenate([slerp(a, b, num) for a, b in ends]).astype(np.float32)


def make_sampler(generator: DCGANGenerator, chunk: int = SAMPLING_BENCHMARK) -> Callable[[PyTree, np.ndarray], np.ndarray]:
    """``sample(params, z [N, latent_dim]) -> images [N, H, W, C]`` (NumPy), G compiled once for ``chunk`` latents.

    Every call runs the same compiled program on chunks of ``chunk`` latents (the last one zero-padded), so
    the grid, the interpolation strip and the evaluation samples share one compilation.
    """
    apply = jax.jit(lambda params, z: generator.apply({"params": params}, z))

    def sample(params: PyTree, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, np.float32)
        padded = np.concatenate([z, np.zeros((-len(z) % chunk, z.shape[1]), np.float32)])  # [⌈N/chunk⌉·chunk, D]
        return np.concatenate([np.asarray(apply(params, padded[i:i + chunk]))
                               for i in range(0, len(padded), chunk)])[:len(z)]

    return sample


def time_sampling(sample: Callable, params: PyTree, z: np.ndarray) -> dict[str, Any]:
    """Seconds to generate ``len(z)`` images with the compiled generator: the median of three runs."""
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        sample(params, z)  # returns NumPy: the device work is done
        runs.append(time.perf_counter() - start)
    return {"num": len(z), "seconds": float(np.median(runs)),
            "protocol": "median of 3 calls of the compiled generator (EMA params), compilation excluded"}


def evaluate(config: ml_collections.ConfigDict, workdir: str, sample: Callable, params: PyTree, z_eval: np.ndarray,
             z_time: np.ndarray, train_record: dict[str, Any]) -> dict[str, Any]:
    """eval.json: the samples G(z_eval) of the EMA generator, judged; the sampling time; the training speed."""
    samples = sample(params, z_eval)  # [N, H, W, C]
    record: dict[str, Any] = {"num_samples": len(z_eval), "train": train_record,
                              "sampling": time_sampling(sample, params, z_time)}
    judge = config.get("eval", {}).get("judge", None)
    if judge is None:
        judge = is_digits(config.data.get("name")) and int(config.data.channels) == 1
    if judge:
        start = time.perf_counter()
        report = judge_lib.judge_report(samples, judge_lib.get_judge(int(config.data.image_size)))
        predicted = np.asarray(report.pop("predicted"))
        record["judge"] = {**report, "seconds": round(time.perf_counter() - start, 2)}
        logging.info("%s", judge_lib.format_report(report))
        judge_lib.save_labelled_grid(samples, predicted, os.path.join(workdir, "eval_samples.png"))
    else:
        plotting.save_image_grid(samples[:64], os.path.join(workdir, "eval_samples.png"))
    pathlib.Path(workdir, EVAL_FILENAME).write_text(json.dumps(record, indent=2) + "\n")
    return record


def train_speed(metrics_path: str, seconds: float, steps: int) -> dict[str, Any]:
    """This invocation's wall time and steps, and the median steps/s of the logged windows (after the first)."""
    rates = [r["steps_per_sec"] for r in plotting.read_metrics(metrics_path)][1:] if os.path.exists(metrics_path) else []
    return {"steps_this_run": steps, "seconds_this_run": round(seconds, 2),
            "steps_per_sec": float(np.median(rates)) if rates else None,
            "protocol": "steps_per_sec: median over metrics.jsonl windows but the first (compilation); "
                        "one step = one D update + one G update"}


# ================================================================================================
# The trainer
# ================================================================================================

def load_images(config: ml_collections.ConfigDict, images: np.ndarray | None) -> np.ndarray:
    """The training images [N, H, W, C] in [−1, 1], checked against config.data."""
    return data_lib.check_images(data_lib.load_dataset(config.data) if images is None else images, config.data)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, images: np.ndarray | None = None) -> GANState:
    """Trains (or resumes) the GAN of ``config`` in ``workdir`` (module docstring); returns the final state.

    Re-running the same call after a crash resumes from the latest checkpoint, both players and both
    Adam states, with the same data order and latents.
    """
    validate_config(config)
    cfg, workdir = config.train, os.fspath(workdir)
    mesh = parallel.make_mesh()
    loop.check_batch_split(cfg.batch_size, mesh, "jit")
    images = load_images(config, images)
    if jax.process_index() == 0:
        config_lib.save_config(config, os.path.join(workdir, config_lib.CONFIG_FILENAME))
    generator, disc, latent_dim = make_generator(config), make_discriminator(config), int(config.model.latent_dim)
    betas = dict(b1=cfg.get("adam_b1", 0.5), b2=cfg.get("adam_b2", 0.999))  # DCGAN: Adam(2e-4, β1 = 0.5)
    tx = make_optimizer(cfg.lr, cfg.get("warmup_steps", 0), cfg.get("grad_clip", None), **betas)
    disc_tx = make_optimizer(cfg.get("disc_lr", cfg.lr), cfg.get("warmup_steps", 0), cfg.get("grad_clip", None),
                             **betas)
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    state = jax.jit(lambda k: create_gan_state(generator, disc, tx, disc_tx, k, latent_dim, images.shape[1:]),
                    out_shardings=parallel.replicated_sharding(mesh), compiler_options=loop.INIT_COMPILER_OPTIONS)(init_key)

    sample = make_sampler(generator)
    # The latents that are not trained on, each set from its own NumPy stream of (seed, k) so that changing
    # one count changes no other set: the grid's (the same z at every step), the interpolation's 8 pairs of
    # ends, the evaluation's and the timing's.
    n_grid, n_eval = int(cfg.get("num_samples", 64)), int(config.get("eval", {}).get("num_samples", 1000))
    z_grid, z_ends, z_eval, z_time = (np.random.default_rng([cfg.seed, k]).standard_normal((n, latent_dim))
                                      .astype(np.float32)
                                      for k, n in enumerate([n_grid, 16, n_eval, SAMPLING_BENCHMARK]))
    z_path = interpolation_latents(z_ends.reshape(8, 2, latent_dim))
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    def figures(state: GANState, step: int) -> None:
        params = jax.tree.map(loop.first_local, state.ema_params)
        if jax.process_index() != 0:
            return
        plotting.save_image_grid(sample(params, z_grid), os.path.join(workdir, "samples", f"step_{step:07d}.png"))
        plotting.save_image_grid(sample(params, z_path), os.path.join(workdir, "interpolation.png"), nrow=10)
        if os.path.exists(metrics_path):  # L_D: 2 log 2 ≈ 1.39 at the game's equilibrium D = ½ (non-saturating/minimax)
            plotting.plot_loss_curve(metrics_path, os.path.join(workdir, "loss.png"), key="d_loss")

    def batch_fn(step: int) -> np.ndarray:  # [B/P, H, W, C]
        return data_lib.get_batch(images, step, cfg.batch_size, cfg.seed, jax.process_index(), jax.process_count())

    started: list[int] = []

    def log_start(start_step: int) -> None:
        started.append(start_step)
        count = lambda tree: sum(int(np.size(x)) for x in jax.tree.leaves(tree))
        logging.info("generator %s params, discriminator %s; %s at step %d", f"{count(state.params):,}",
                     f"{count(state.disc_params):,}", "resuming" if start_step else "starting", start_step)

    start = time.perf_counter()
    state = loop.run(state, compile_train_step(generator, disc, config, mesh), batch_fn, workdir=workdir,
                     num_steps=cfg.num_steps, key=train_key, mesh=mesh, log_every=cfg.log_every,
                     ckpt_every=cfg.ckpt_every, keep_checkpoints=cfg.get("keep_checkpoints", 3),
                     hooks=[loop.Hook(int(cfg.get("sample_every", 0)) or int(cfg.num_steps), figures)],
                     on_start=log_start)
    if jax.process_index() == 0 and n_eval:
        done = int(loop.first_local(state.step))
        speed = train_speed(metrics_path, time.perf_counter() - start, done - started[0])
        evaluate(config, workdir, sample, jax.tree.map(loop.first_local, state.ema_params), z_eval, z_time, speed)
    return state
