"""The autoencoder trainers (training/autoencoder.py) and the PatchGAN discriminator (models/discriminator.py).

* Loss pieces against hand computations: the adaptive weight λ (Esser et al. Eq. 7) on a tiny linear
  decoder, the hinge losses on known logits, the LPIPS-style distance.
* The discriminator against taming-transformers' NLayerDiscriminator, rebuilt in torch (same outputs),
  and its receptive field.
* The AutoencoderKL step on a tiny linear autoencoder (cheap to compile): λ inside the step equals the
  hand-computed one, the GAN terms are absent before ``loss.disc_start`` and present after, and the
  discriminator is only updated from then on.
* Both trainers end to end on tiny configs: the loss falls, the figures and eval.json are written, the
  checkpoint holds every field of the state (both optimisers), a Gaussian VAE run stopped at a checkpoint
  and re-run ends exactly where an uninterrupted one ends, a NaN stops training, and bad configs give
  one-line CLI errors.

The AutoencoderKL train step takes ~10–30 s to compile on 2 CPU cores, so it is trained end to end once
(the exact-resume test runs on the Gaussian VAE, whose state is checkpointed by the same code).
"""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from _training_fixtures import tiny_images
from _cli import run_cli
from ddpm_jax import checkpoints
from ddpm_jax import objectives
from ddpm_jax.training import autoencoder as vt
from ddpm_jax.training import loop
from ddpm_jax.models.discriminator import NLayerDiscriminator, output_size, receptive_field
from ddpm_jax.models.vae import AutoencoderKL, DiagonalGaussian
from ddpm_jax.training.loop import make_optimizer
from ddpm_jax.workdir import autoencoder_kl_config, gaussian_vae_config, load_autoencoder, load_gaussian_vae

ROOT = pathlib.Path(__file__).resolve().parents[1]
O0 = {"xla_backend_optimization_level": 0}  # the tests' programs run a few times: compile them fast


# ================================================================================================
# Loss pieces
# ================================================================================================


def test_adaptive_weight_matches_hand_computation_on_a_linear_decoder():
    # Decoder x̂ = W z (W is the last layer G_L), L_rec = ‖x̂ − x‖², L_GAN = −v·x̂ (a linear discriminator).
    # By hand: ∇_W L_rec = 2 (Wz − x) zᵀ and ∇_W L_GAN = −v zᵀ, and ‖a bᵀ‖_F = ‖a‖ ‖b‖, so
    #   λ = 2 ‖Wz − x‖ ‖z‖ / (‖v‖ ‖z‖ + δ).
    z = jnp.array([1.0, 2.0])
    W = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = jnp.array([0.5, 0.0, -1.0])
    v = jnp.array([1.0, -2.0, 2.0])
    grad_rec = jax.grad(lambda W: jnp.sum((W @ z - x) ** 2))(W)
    grad_gan = jax.grad(lambda W: -v @ (W @ z))(W)
    residual = np.array([1.0 - 0.5, 2.0, 3.0 + 1.0])  # Wz − x
    expected = 2 * np.linalg.norm(residual) * np.sqrt(5) / (3 * np.sqrt(5) + 1e-4)
    np.testing.assert_allclose(objectives.adaptive_weight(grad_rec, grad_gan), expected, rtol=1e-6)
    # Clipped to [0, 1e4] (a vanishing GAN gradient), and constant for autodiff.
    assert float(objectives.adaptive_weight(grad_rec, 1e-12 * grad_gan)) == 1e4
    assert float(jax.grad(lambda s: objectives.adaptive_weight(s * grad_rec, grad_gan))(1.0)) == 0.0
    # Pytrees: the norm is the global one.
    tree = objectives.adaptive_weight({"a": grad_rec, "b": grad_rec}, {"a": grad_gan})
    np.testing.assert_allclose(tree, np.sqrt(2) * 2 * np.linalg.norm(residual) * np.sqrt(5) / (3 * np.sqrt(5) + 1e-4),
                               rtol=1e-6)


def test_hinge_losses_on_known_logits():
    real = jnp.array([2.0, 0.5, -1.0])  # relu(1 − real) = [0, 0.5, 2]
    fake = jnp.array([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2]
    np.testing.assert_allclose(objectives.hinge_d_loss(real, fake), 0.5 * (2.5 / 3 + 1.0), rtol=1e-6)
    np.testing.assert_allclose(objectives.hinge_g_loss(fake), 1.0 / 3, rtol=1e-6)
    assert float(objectives.hinge_d_loss(jnp.full(4, 1.5), jnp.full(4, -3.0))) == 0.0  # confident: no push


def test_perceptual_distance_hand_computation_and_random_features():
    # One layer, two positions: (3, 4) vs (0, 2) normalise to (0.6, 0.8) vs (0, 1): channel mean of
    # squares (0.36 + 0.04)/2 = 0.2; the second position is identical; spatial mean 0.1.
    fx = jnp.array([[[[3.0, 4.0], [1.0, 1.0]]]])  # [1, 1, 2, 2]
    fy = jnp.array([[[[0.0, 2.0], [5.0, 5.0]]]])
    np.testing.assert_allclose(objectives.perceptual_distance([fx], [fy]), [0.1], rtol=1e-6)
    np.testing.assert_allclose(objectives.perceptual_distance([fx, fx], [fy, 7.0 * fy]), [0.2], rtol=1e-6)  # scale-free
    with pytest.raises(ValueError, match="same, non-empty list"):
        objectives.perceptual_distance([fx], [])

    feature_fn = jax.jit(vt.random_feature_fn(channels=1, seed=0), compiler_options=O0)
    x = jnp.asarray(tiny_images(n=2, size=16))
    maps = feature_fn(x)
    assert [m.shape for m in maps] == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64)]
    same = objectives.perceptual_distance(maps, maps)
    other = objectives.perceptual_distance(maps, feature_fn(x[::-1]))
    np.testing.assert_allclose(same, 0.0, atol=1e-7)
    assert np.all(np.asarray(other) > 1e-3)


def test_psnr_and_pixel_losses():
    x = jnp.zeros((2, 4, 4, 1))
    y = x.at[0].set(0.2).at[1].set(2.0)  # MSE 0.04 and 4 (the whole [-1, 1] range)
    np.testing.assert_allclose(objectives.psnr(x, y), [10 * np.log10(4 / 0.04), 0.0], rtol=1e-6)
    np.testing.assert_allclose(objectives.pixel_loss(x, y - 0.4, "l1")[1], jnp.full((4, 4, 1), 1.6), rtol=1e-6)
    np.testing.assert_allclose(objectives.pixel_loss(x, y, "l2")[0], jnp.full((4, 4, 1), 0.04), rtol=1e-6)
    with pytest.raises(ValueError, match="loss.reconstruction must be one of"):
        objectives.pixel_loss(x, y, "huber")


# ================================================================================================
# The discriminator
# ================================================================================================


def _taming_nlayer_discriminator(torch, input_nc, ndf, n_layers):
    """taming/modules/discriminator/model.py NLayerDiscriminator (BatchNorm, as used by LDM), verbatim layout."""
    nn_ = torch.nn
    kw, padw = 4, 1
    sequence = [nn_.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), nn_.LeakyReLU(0.2, True)]
    nf_mult = 1
    for n in range(1, n_layers):
        nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
        sequence += [nn_.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw, bias=False),
                     nn_.BatchNorm2d(ndf * nf_mult), nn_.LeakyReLU(0.2, True)]
    nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
    sequence += [nn_.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=False),
                 nn_.BatchNorm2d(ndf * nf_mult), nn_.LeakyReLU(0.2, True)]
    sequence += [nn_.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]
    return nn_.Sequential(*sequence)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_discriminator_matches_taming(n_layers):
    torch = pytest.importorskip("torch")
    torch.manual_seed(n_layers)
    ref = _taming_nlayer_discriminator(torch, 3, 8, n_layers).train()  # training mode: batch statistics
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial norm parameters
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    params, conv_i, norm_i = {}, 0, 1
    for module in ref:
        if isinstance(module, torch.nn.Conv2d):
            entry = {"kernel": module.weight.detach().numpy().transpose(2, 3, 1, 0)}  # OIHW → HWIO
            if module.bias is not None:
                entry["bias"] = module.bias.detach().numpy()
            params[f"conv_{conv_i}"] = entry
            conv_i += 1
        elif isinstance(module, torch.nn.BatchNorm2d):
            params[f"norm_{norm_i}"] = {"scale": module.weight.detach().numpy(), "bias": module.bias.detach().numpy()}
            norm_i += 1
    disc = NLayerDiscriminator(ndf=8, n_layers=n_layers)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    shapes = jax.eval_shape(disc.init, jax.random.key(0), x)["params"]
    assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, params)
    ours = np.asarray(jax.jit(disc.apply)({"params": params}, x))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    size = output_size(32, n_layers)
    assert ours.shape == theirs.shape == (4, size, size, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_discriminator_receptive_field_and_bad_input():
    assert [receptive_field(n) for n in (1, 2, 3)] == [16, 34, 70]  # 70: Isola et al.'s "70×70 PatchGAN"
    disc = NLayerDiscriminator(ndf=4, n_layers=2, use_norm=False)  # batch norm would couple all pixels
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 64, 64, 1)), jnp.float32)
    params = jax.jit(disc.init, compiler_options=O0)(jax.random.key(0), x)["params"]
    grad = jax.grad(lambda x: disc.apply({"params": params}, x)[0, 5, 5, 0])(x)[0, :, :, 0]
    rows, cols = np.nonzero(np.asarray(grad))
    assert rows.max() - rows.min() + 1 == cols.max() - cols.min() + 1 == receptive_field(2)
    with pytest.raises(ValueError, match=r"12×12 are too small for a discriminator with n_layers=3"):
        jax.eval_shape(NLayerDiscriminator(n_layers=3).init, jax.random.key(0), jnp.zeros((1, 12, 12, 1)))


# ================================================================================================
# The AutoencoderKL step on a tiny linear autoencoder
# ================================================================================================


class _LinearDecoder(nn.Module):
    features: int

    @nn.compact
    def __call__(self, z):
        return nn.Dense(self.features, name="conv_out")(z)  # x̂ = z W + b; W is G_L


class _LinearAutoencoder(nn.Module):
    """encoder: x → Dense → (μ, log σ²) ∈ R^2 each; decoder: z → decoder/conv_out (a Dense, the last layer) → x̂."""

    @nn.compact
    def __call__(self, x, key=None):
        moments = nn.Dense(4, name="encoder")(x.reshape(x.shape[0], -1))  # [B, 4]
        posterior = DiagonalGaussian.from_moments(moments)
        z = posterior.mode() if key is None else posterior.sample(key)  # [B, 2]
        return _LinearDecoder(int(np.prod(x.shape[1:])), name="decoder")(z).reshape(x.shape), posterior


class _LinearDiscriminator(nn.Module):
    """logits = x · v (one logit per image), so ∇_x̂ L_G = −v / B."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, use_bias=False, name="v")(x.reshape(x.shape[0], -1))  # [B, 1]


def _step_config(disc_start):
    config = ml_collections.ConfigDict()
    config.loss = dict(reconstruction="l1", kl_weight=1e-2, perceptual_weight=0.0, disc_weight=0.5,
                       disc_start=disc_start)
    config.train = dict(ema_decay=0.0, ema_warmup=False)
    return config


def test_autoencoder_step_adaptive_weight_and_discriminator_start():
    model, disc = _LinearAutoencoder(), _LinearDiscriminator()
    # The model's params live at decoder/conv_out/kernel like AutoencoderKL's last layer.
    x = jnp.asarray(tiny_images(n=4, size=4))  # [4, 4, 4, 1]
    tx = make_optimizer(1e-2, 0, None)
    state = jax.jit(lambda k: vt.create_autoencoder_state(model, disc, tx, tx, k, (4, 4, 1)),
                    compiler_options=O0)(jax.random.key(0))
    assert vt._get(state.params, vt.LAST_LAYER).shape == (2, 16)
    step = jax.jit(vt.make_autoencoder_kl_train_step(model, disc, _step_config(disc_start=2)), compiler_options=O0)
    key = jax.random.key(3)
    history = []
    for s in range(4):
        before = jax.device_get(state)
        state, metrics = step(state, x, key)
        history.append((before, jax.device_get(metrics)))

    for s, (before, m) in enumerate(history):
        # The hand computation, in NumPy, at the parameters before step s with the step's ε.
        recon, posterior = model.apply({"params": before.params}, x, jax.random.fold_in(key, s))
        z = np.asarray(posterior.sample(jax.random.fold_in(key, s)))  # [B, 2]: the same draw as inside the step
        recon, xs = np.asarray(recon).reshape(4, -1), np.asarray(x).reshape(4, -1)
        rec = np.abs(xs - recon).sum(-1).mean()
        kl = float(np.mean(posterior.kl()))
        v = np.asarray(before.disc_params["v"]["kernel"])[:, 0]  # [16]
        np.testing.assert_allclose(m["rec_loss"], rec, rtol=1e-5)
        if s < 2:  # before disc_start: no GAN term, no discriminator update
            np.testing.assert_allclose(m["loss"], rec + 1e-2 * kl, rtol=1e-5)
            assert m["g_loss"] == m["adaptive_weight"] == m["d_loss"] == 0.0
        else:
            # ∇_W L_rec = zᵀ sign(x̂ − x) / B,  ∇_W L_G = −zᵀ 1 vᵀ / B   (W: [2, 16], x̂ = z W + b)
            grad_rec = z.T @ np.sign(recon - xs) / 4
            grad_gan = -z.T @ np.tile(v, (4, 1)) / 4
            lam = np.linalg.norm(grad_rec) / (np.linalg.norm(grad_gan) + 1e-4)
            g_loss = -np.mean(recon @ v)
            np.testing.assert_allclose(m["adaptive_weight"], 0.5 * lam, rtol=1e-4)
            np.testing.assert_allclose(m["g_loss"], g_loss, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(m["loss"], rec + 1e-2 * kl + 0.5 * lam * g_loss, rtol=1e-4)
            real, fake = xs @ v, recon @ v
            np.testing.assert_allclose(m["d_loss"], 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean()),
                                       rtol=1e-4)
    # The discriminator stays put before the start and moves after it.
    v_at = [np.asarray(b.disc_params["v"]["kernel"]) for b, _ in history] + [np.asarray(state.disc_params["v"]["kernel"])]
    np.testing.assert_array_equal(v_at[0], v_at[1])
    np.testing.assert_array_equal(v_at[1], v_at[2])
    assert not np.allclose(v_at[2], v_at[3]) and not np.allclose(v_at[3], v_at[4])


# ================================================================================================
# End to end: the Gaussian VAE
# ================================================================================================


def _vae_config(**train):
    config = ml_collections.ConfigDict()
    config.data = dict(name="test_array", image_size=8, channels=1, num_held_out=8)
    config.model = dict(kind="gaussian_vae", hidden_dims=(32,), latent_dim=2, likelihood="bernoulli", sigma=0.1)
    config.train = dict(batch_size=8, num_steps=30, lr=1e-2, warmup_steps=0, grad_clip=0.0, ema_decay=0.0,
                        ema_warmup=False, seed=0, log_every=5, ckpt_every=10, keep_checkpoints=5, sample_every=15,
                        num_samples=8, parallel="jit")
    config.train.update(train)
    return config


def _vae_data():
    images = tiny_images(n=40, size=8, seed=1)
    return images, np.arange(40) % 10


def _metrics(workdir):
    return [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]


def test_gaussian_vae_trains_writes_figures_and_resumes_exactly(tmp_path):
    images, labels = _vae_data()
    full = vt.train(_vae_config(), tmp_path / "full", images, labels)
    lines = _metrics(tmp_path / "full")
    assert [l["step"] for l in lines] == [5, 10, 15, 20, 25, 30]
    assert {"loss", "elbo", "reconstruction", "kl", "grad_norm"} <= set(lines[0])
    assert lines[-1]["loss"] < 0.85 * lines[0]["loss"]
    np.testing.assert_allclose(lines[-1]["elbo"], lines[-1]["reconstruction"] - lines[-1]["kl"], rtol=1e-5)
    for name in ("reconstructions/step_0000015.png", "reconstructions/step_0000030.png", "samples/step_0000030.png",
                 "latent_map.png", "latent_scatter.png", "loss.png", "config.json"):
        assert (tmp_path / "full" / name).is_file(), name
    record = json.loads((tmp_path / "full" / "eval.json").read_text())
    np.testing.assert_allclose(record["elbo"], record["reconstruction"] - record["kl"], rtol=1e-5)
    assert record["num_held_out"] == 8 and record["step"] == 30

    vt.train(_vae_config(num_steps=20, sample_every=0), tmp_path / "split", images, labels)  # stops at a checkpoint
    resumed = vt.train(_vae_config(sample_every=0), tmp_path / "split", images, labels)  # the same run, longer
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(full.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.opt_state), jax.device_get(full.opt_state))
    assert [l["step"] for l in _metrics(tmp_path / "split")] == [5, 10, 15, 20, 25, 30]

    module, params = load_gaussian_vae(tmp_path / "full")
    assert module.config.image_shape == (8, 8, 1) and module.config.latent_dim == 2
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(full.params))
    with pytest.raises(ValueError, match="not an autoencoder_kl one"):
        load_autoencoder(tmp_path / "full")


def test_non_finite_loss_stops_training(tmp_path):
    images, labels = _vae_data()
    images[::2] = np.nan  # in every batch
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0 .*last good checkpoint is step None"):
        vt.train(_vae_config(num_steps=10), tmp_path, images, labels)
    assert checkpoints.latest_step(tmp_path) is None


# ================================================================================================
# End to end: AutoencoderKL with the discriminator
# ================================================================================================


def _kl_config(**train):
    config = ml_collections.ConfigDict()
    config.data = dict(name="test_array", image_size=16, channels=1, num_held_out=8)
    config.model = dict(kind="autoencoder_kl", in_channels=1, out_channels=1, block_out_channels=(8, 8),
                        layers_per_block=1, latent_channels=2, norm_num_groups=4, sample_size=16, scaling_factor=1.0,
                        shift_factor=None, mid_block_add_attention=False, use_quant_conv=True, use_post_quant_conv=True)
    config.loss = dict(reconstruction="l1", kl_weight=1e-6, perceptual_weight=1.0, perceptual_network="random",
                       disc_weight=0.5, disc_start=6)
    config.discriminator = dict(ndf=4, n_layers=1, use_norm=True)
    config.train = dict(batch_size=8, num_steps=12, lr=3e-3, disc_lr=3e-3, warmup_steps=0, grad_clip=1.0,
                        adam_b1=0.5, adam_b2=0.9, ema_decay=0.5, ema_warmup=True, seed=0, log_every=1, ckpt_every=3,
                        keep_checkpoints=5, sample_every=6, num_samples=8, parallel="jit")
    config.train.update(train)
    return config


@pytest.mark.fast_compile  # 12 steps of a tiny model: compile-bound (measured 48 → 38 s on 2 busy cores)
def test_autoencoder_kl_trains_and_measures_its_latents(tmp_path):
    images = tiny_images(n=40, size=16, seed=2)
    full = vt.train(_kl_config(), tmp_path / "full", images)

    lines = _metrics(tmp_path / "full")
    assert [l["step"] for l in lines] == list(range(1, 13))
    npix = 16 * 16
    for line in lines:  # L_AE = L_rec + w_KL KL (+ w_d λ L_G from disc_start = 6 on)
        gan = line["adaptive_weight"] * line["g_loss"]
        expected = line["rec_loss"] + npix * line["perceptual"] + 1e-6 * line["kl"] + gan
        np.testing.assert_allclose(line["loss"], expected, rtol=1e-5)
        started = line["step"] > 6
        assert (line["adaptive_weight"] > 0) == started and (line["d_loss"] > 0) == started, line
    assert np.mean([l["rec_loss"] for l in lines[-3:]]) < 0.9 * np.mean([l["rec_loss"] for l in lines[:3]])

    for name in ("reconstructions/step_0000006.png", "reconstructions/step_0000012.png", "loss.png", "eval.json"):
        assert (tmp_path / "full" / name).is_file(), name
    record = json.loads((tmp_path / "full" / "eval.json").read_text())
    assert record["latent_shape"] == [8, 8, 2] and record["step"] == 12

    # The checkpoint holds both optimisers' states: restoring it into a zeroed state gives the final one back.
    # (Resuming from such a restore is the shared loop's, tested exactly with the Gaussian VAE above and in
    # test_train_loop.py / test_checkpoints_resume.py.)
    zeroed = jax.tree.map(jnp.zeros_like, full)
    ckpt = checkpoints.Checkpointer(tmp_path / "full", save_every=3)
    restored = ckpt.restore_latest(zeroed)
    ckpt.close()
    for field in ("step", "params", "ema_params", "opt_state", "disc_params", "disc_opt_state"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(getattr(restored, field)),
                     jax.device_get(getattr(full, field)))

    # load_autoencoder: the EMA params and the measured scaling factor; eval.json's PSNR is the held-out one.
    model, params, scaling_factor = load_autoencoder(tmp_path / "full")
    assert scaling_factor == record["scaling_factor"] == model.config.scaling_factor
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(full.ema_params))
    _, held = loop.split_held_out(40, 8, 0)
    np.testing.assert_allclose(record["psnr"], vt.reconstruction_psnr(model, params, images[held]), rtol=1e-5)
    factor, latents = vt.measure_scaling_factor(model, params, images, jax.random.key(5))
    np.testing.assert_allclose(np.std(factor * latents), 1.0, rtol=1e-5)
    x = jnp.asarray(images[:2])
    scaled = model.apply({"params": params}, x, method=AutoencoderKL.encode_latents)
    mode = model.apply({"params": params}, x, method=AutoencoderKL.encode).mode()
    np.testing.assert_allclose(scaled, scaling_factor * mode, rtol=1e-6)

    (tmp_path / "full" / "eval.json").unlink()
    with pytest.raises(FileNotFoundError, match="eval.json does not exist"):
        load_autoencoder(tmp_path / "full")
    with pytest.raises(ValueError, match="not a gaussian_vae one"):
        load_gaussian_vae(tmp_path / "full")


# ================================================================================================
# Configs and the command line
# ================================================================================================


def test_experiment_configs_validate():
    from ddpm_jax import config as config_lib

    vae = config_lib.load_config(ROOT / "experiments" / "vae_mnist.py")
    assert vt.validate_config(vae) == "gaussian_vae"
    assert gaussian_vae_config(config_lib.apply_overrides(vae, ["model.latent_dim=2"])).latent_dim == 2
    kl = config_lib.load_config(ROOT / "experiments" / "autoencoder_kl_mnist.py")
    assert vt.validate_config(kl) == "autoencoder_kl"
    assert autoencoder_kl_config(kl).downsampling_factor == 4 and kl.data.image_size == 32  # 8×8 latents


def _run_cli(argv, capsys):
    status, _, err = run_cli(argv, capsys)
    return status, err


@pytest.mark.parametrize("experiment, override, message", [
    ("vae_mnist.py", "model.kind=gan", "config.model.kind must be one of ('gaussian_vae', 'autoencoder_kl'), got 'gan'"),
    ("vae_mnist.py", "model.likelihood=poisson", "likelihood must be one of"),
    ("vae_mnist.py", "data.num_held_out=0", "data.num_held_out must be at least 1"),
    ("vae_mnist.py", "train.parallel=pmap", "the autoencoder trainers run as one sharded jit"),
    ("autoencoder_kl_mnist.py", "data.image_size=30", "data.image_size=30 is not divisible by the downsampling factor f=4"),
    ("autoencoder_kl_mnist.py", "data.channels=3", "must equal data.channels=3"),
    ("autoencoder_kl_mnist.py", "loss.reconstruction=huber", "loss.reconstruction must be one of"),
    ("autoencoder_kl_mnist.py", "loss.perceptual_network=vgg", "loss.perceptual_network must be one of"),
    ("autoencoder_kl_mnist.py", "discriminator.n_layers=4", "discriminator.n_layers=4 is too deep for data.image_size=32"),
])
def test_train_vae_cli_bad_configs_give_one_line_errors(tmp_path, capsys, experiment, override, message):
    status, err = _run_cli(["train-vae", "--config", str(ROOT / "experiments" / experiment), "--workdir",
                            str(tmp_path), override], capsys)
    assert status == 2
    assert err.startswith("ddpm-jax: error: ") and message in err and err.count("\n") == 1, err


def test_train_vae_cli_dispatches_on_the_model_kind(tmp_path, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(vt, "train_gaussian_vae", lambda config, workdir, *a, **k: seen.append(("vae", workdir)))
    monkeypatch.setattr(vt, "train_autoencoder_kl", lambda config, workdir, *a, **k: seen.append(("kl", workdir)))
    for experiment in ("vae_mnist.py", "autoencoder_kl_mnist.py"):
        status, _ = _run_cli(["train-vae", "--config", str(ROOT / "experiments" / experiment), "--workdir",
                              str(tmp_path)], capsys)
        assert status in (0, None)
    assert seen == [("vae", str(tmp_path)), ("kl", str(tmp_path))]
