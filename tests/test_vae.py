"""The VAE: ELBO pieces against closed forms and Monte-Carlo estimates, shapes and bad input.

Monte-Carlo checks use a tolerance of 5 standard errors of the estimate (the standard error is
measured from the same samples), so they fail by chance with probability < 1e-6 per assertion.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.scipy.stats import norm

from ddpm_jax.models.vae import (
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussian,
    GaussianVAE,
    GaussianVAEConfig,
    decoder_mean_image,
)
from ddpm_jax.objectives import bernoulli_log_likelihood, elbo, gaussian_kl, gaussian_log_likelihood, reparameterize
from ddpm_jax.training.autoencoder import vae_loss

N_MC = 200_000
Z_SCORE = 5.0


def _mc_check(samples, expected):
    """|mean(samples) − expected| ≤ 5 standard errors, for every component."""
    samples = np.asarray(samples, np.float64)
    mean = samples.mean(axis=0)
    se = samples.std(axis=0) / np.sqrt(samples.shape[0])
    assert np.all(np.abs(mean - np.asarray(expected)) <= Z_SCORE * se + 1e-6), (mean, expected, se)


MU = jnp.array([[0.3, -1.2, 2.0], [0.0, 0.5, -0.7]])
LOGVAR = jnp.array([[0.0, -1.0, 0.8], [-2.0, 0.4, 0.1]])


# ---------------------------------------------------------------------------------------------
# ELBO pieces
# ---------------------------------------------------------------------------------------------


def test_gaussian_kl_closed_form_matches_monte_carlo():
    # KL(q‖p) = E_q[log q(z) − log p(z)], estimated with samples z ~ q drawn by reparameterize.
    keys = jax.random.split(jax.random.key(0), N_MC)
    z = jax.vmap(lambda k: reparameterize(MU, LOGVAR, k))(keys)  # [N, B, D]
    log_q = norm.logpdf(z, MU, jnp.exp(0.5 * LOGVAR)).sum(-1)  # [N, B]
    log_p = norm.logpdf(z).sum(-1)
    _mc_check(log_q - log_p, gaussian_kl(MU, LOGVAR))
    assert gaussian_kl(MU, LOGVAR).shape == (2,)
    np.testing.assert_allclose(gaussian_kl(jnp.zeros((1, 5)), jnp.zeros((1, 5))), [0.0], atol=1e-7)


def test_reparameterised_gradient_matches_analytic_gradient():
    # f(z) = Σ_j a_j z_j² + b_j z_j with z ~ N(μ, σ²): E[f] = Σ a_j (μ_j² + σ_j²) + b_j μ_j, so
    #   ∂E[f]/∂μ = 2aμ + b,   ∂E[f]/∂log σ² = a σ².
    a, b = jnp.array([1.0, -0.5, 2.0]), jnp.array([0.3, 1.0, -1.0])
    mu, logvar = MU[0], LOGVAR[0]
    f = lambda z: jnp.sum(a * z**2 + b * z)
    one_sample = lambda mu, logvar, key: f(reparameterize(mu, logvar, key))
    keys = jax.random.split(jax.random.key(1), N_MC)
    grad_mu, grad_logvar = jax.vmap(jax.grad(one_sample, argnums=(0, 1)), in_axes=(None, None, 0))(mu, logvar, keys)
    _mc_check(grad_mu, 2 * a * mu + b)
    _mc_check(grad_logvar, a * jnp.exp(logvar))
    # The exact expectation of the single-sample gradient is the analytic one: the averages agree closely.
    np.testing.assert_allclose(grad_mu.mean(0), 2 * a * mu + b, atol=0.03)


def test_reparameterised_elbo_gradient_matches_analytic_gradient_on_a_linear_gaussian_model():
    # Linear-Gaussian model: p(z) = N(0, I₂), p(x|z) = N(x; zW + b, s² I₃), q(z|x) = N(μ, diag σ²). Its ELBO
    # has a closed form, E_q‖x − zW − b‖² = ‖x − μW − b‖² + Σ_j σ_j² ‖W_j‖², so its gradient with respect to
    # (μ, log σ², W) is analytic; the one-sample reparameterised gradient of the library's `elbo` is an
    # unbiased estimate of it.
    x = jnp.array([[[[0.5, -1.0, 2.0]]]])  # [B=1, 1, 1, 3]
    b, s = jnp.array([0.1, 0.0, -0.2]), 0.7
    mu, logvar = jnp.array([[0.3, -0.8]]), jnp.array([[-0.5, 0.4]])
    W = jnp.array([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0]])

    def one_sample(mu, logvar, W, key):
        z = reparameterize(mu, logvar, key)  # [1, 2]
        return elbo(x, (z @ W + b).reshape(x.shape), mu, logvar, likelihood="gaussian", sigma=s).elbo[0]

    def analytic(mu, logvar, W):
        residual = x.reshape(1, 3) - mu @ W - b
        expected_sq = jnp.sum(residual**2) + jnp.sum(jnp.exp(logvar)[0] * jnp.sum(W**2, axis=1))
        return -0.5 * expected_sq / s**2 - 1.5 * jnp.log(2 * jnp.pi * s**2) - gaussian_kl(mu, logvar)[0]

    keys = jax.random.split(jax.random.key(7), N_MC)
    grads = jax.vmap(jax.grad(one_sample, argnums=(0, 1, 2)), in_axes=(None, None, None, 0))(mu, logvar, W, keys)
    expected = jax.grad(analytic, argnums=(0, 1, 2))(mu, logvar, W)
    for g, e in zip(grads, expected):
        _mc_check(g.reshape(N_MC, -1), e.reshape(-1))
    # And the expected ELBO itself: the mean of one-sample ELBOs.
    values = jax.vmap(one_sample, in_axes=(None, None, None, 0))(mu, logvar, W, keys)
    _mc_check(values[:, None], [analytic(mu, logvar, W)])


def test_bernoulli_and_gaussian_log_likelihoods_match_hand_computation():
    x = jnp.array([[0.0, 1.0, 0.25]])
    logits = jnp.array([[-1.0, 2.0, 0.5]])
    p = jax.nn.sigmoid(logits)
    np.testing.assert_allclose(
        bernoulli_log_likelihood(x, logits), jnp.sum(x * jnp.log(p) + (1 - x) * jnp.log1p(-p), -1), rtol=1e-6
    )
    mean = jnp.array([[0.1, 0.7, -0.2]])
    np.testing.assert_allclose(
        gaussian_log_likelihood(x, mean, 0.3), norm.logpdf(x, mean, 0.3).sum(-1), rtol=1e-6
    )


def test_elbo_is_reconstruction_minus_kl():
    x = jnp.linspace(-1, 1, 2 * 4 * 4).reshape(2, 4, 4, 1)
    out = jnp.cos(jnp.arange(32.0)).reshape(2, 4, 4, 1)
    for likelihood, rec in (
        ("bernoulli", bernoulli_log_likelihood((x + 1) / 2, out)),
        ("gaussian", gaussian_log_likelihood(x, out, 0.2)),
    ):
        terms = elbo(x, out, MU, LOGVAR, likelihood=likelihood, sigma=0.2)
        np.testing.assert_allclose(terms.reconstruction, rec, rtol=1e-6)
        np.testing.assert_allclose(terms.kl, gaussian_kl(MU, LOGVAR), rtol=1e-6)
        np.testing.assert_allclose(terms.elbo, rec - terms.kl, rtol=1e-6)
    with pytest.raises(ValueError, match="likelihood"):
        elbo(x, out, MU, LOGVAR, likelihood="poisson")
    with pytest.raises(ValueError, match="likelihood"):
        GaussianVAEConfig(likelihood="poisson")


# ---------------------------------------------------------------------------------------------
# The Gaussian VAE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_gaussian_vae_shapes_and_training_raises_the_elbo(likelihood):
    config = GaussianVAEConfig(image_shape=(8, 8, 1), hidden_dims=(32,), latent_dim=2, likelihood=likelihood, sigma=0.5)
    module = GaussianVAE(config)
    x = jnp.where(jax.random.uniform(jax.random.key(0), (16, 8, 8, 1)) > 0.5, 1.0, -1.0)
    params = module.init(jax.random.key(1), x, jax.random.key(2))["params"]
    out, mu, logvar = module.apply({"params": params}, x, jax.random.key(3))
    assert out.shape == x.shape and mu.shape == logvar.shape == (16, 2)
    assert module.apply({"params": params}, jnp.zeros((5, 2)), method=GaussianVAE.decode).shape == (5, 8, 8, 1)
    image = decoder_mean_image(config, out)
    assert image.shape == x.shape and float(jnp.abs(image).max()) <= 1.0 + (likelihood == "gaussian") * 1e3

    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, key):
        (loss, metrics), grads = jax.value_and_grad(vae_loss, argnums=1, has_aux=True)(module, params, x, key)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    losses = []
    for i in range(150):
        params, opt_state, loss, metrics = step(params, opt_state, jax.random.fold_in(jax.random.key(4), i))
        losses.append(float(loss))
    np.testing.assert_allclose(metrics["elbo"], metrics["reconstruction"] - metrics["kl"], rtol=1e-5)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_gaussian_vae_bad_input():
    module = GaussianVAE(GaussianVAEConfig(image_shape=(8, 8, 1), hidden_dims=(8,)))
    with pytest.raises(ValueError, match=r"expects images \[B, 8, 8, 1\]"):
        module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jax.random.key(1))


# ---------------------------------------------------------------------------------------------
# DiagonalGaussian
# ---------------------------------------------------------------------------------------------


def test_diagonal_gaussian_sample_moments_mode_kl_and_clipping():
    mean, logvar = MU.reshape(1, 1, 2, 3), LOGVAR.reshape(1, 1, 2, 3)
    dist = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], axis=-1))
    np.testing.assert_array_equal(dist.mean, mean)
    np.testing.assert_array_equal(dist.logvar, logvar)
    np.testing.assert_array_equal(dist.mode(), mean)
    samples = jax.vmap(dist.sample)(jax.random.split(jax.random.key(5), N_MC))  # [N, 1, 1, 2, 3]
    _mc_check(samples, mean)
    _mc_check((samples - mean) ** 2, jnp.exp(logvar))  # variance, with known mean
    np.testing.assert_allclose(dist.kl(), gaussian_kl(mean, logvar), rtol=1e-6)
    np.testing.assert_allclose(dist.nll(mean + 0.1), -norm.logpdf(mean + 0.1, mean, dist.std).sum(), rtol=1e-5)
    clipped = DiagonalGaussian.from_moments(jnp.array([[[[0.0, 1.0, -100.0, 100.0]]]]))
    np.testing.assert_array_equal(clipped.logvar, [[[[-30.0, 20.0]]]])
    assert jnp.all(jnp.isfinite(clipped.kl()))


# ---------------------------------------------------------------------------------------------
# AutoencoderKL
# ---------------------------------------------------------------------------------------------

TINY_F4 = AutoencoderKLConfig(block_out_channels=(8, 16, 16), latent_channels=4, norm_num_groups=8, sample_size=16)
TINY_F8 = dataclasses.replace(TINY_F4, block_out_channels=(8, 16, 16, 16), in_channels=1, out_channels=1)


@pytest.mark.parametrize("config, factor", [(TINY_F4, 4), (TINY_F8, 8)])
def test_autoencoder_kl_shapes(config, factor):
    assert config.downsampling_factor == factor
    module = AutoencoderKL(config)
    x = jax.ShapeDtypeStruct((2, 16, 32, config.in_channels), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    params = variables["params"]
    assert set(params) == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    assert set(params["decoder"]["up_blocks_0"]) == {"resnets_0", "resnets_1", "upsamplers_0"}  # layers_per_block + 1
    assert set(params["encoder"]["down_blocks_0"]) == {"resnets_0", "downsamplers_0"}
    encoded = jax.eval_shape(lambda v, x: module.apply(v, x, method=AutoencoderKL.encode), variables, x)
    assert encoded.mean.shape == encoded.logvar.shape == (2, 16 // factor, 32 // factor, 4)
    latents = jax.eval_shape(
        lambda v, x, k: module.apply(v, x, k, method=AutoencoderKL.encode_latents), variables, x, jax.random.key(0)
    )
    assert latents.shape == (2, 16 // factor, 32 // factor, 4)
    decoded = jax.eval_shape(lambda v, z: module.apply(v, z, method=AutoencoderKL.decode), variables, latents)
    assert decoded.shape == (2, 16, 32, config.out_channels)


def _random_params(module, x):
    """Params with the model's shapes filled with NumPy noise: Flax's own init compiles slowly on CPU (~30 s)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), jnp.float32), shapes)


def test_autoencoder_kl_forward_pass_and_sampled_latents():
    module = AutoencoderKL(TINY_F4)
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    params = _random_params(module, x)

    @jax.jit  # one compiled program: op-by-op dispatch of the conv stack is slow on CPU
    def run(params, x):
        recon, posterior = module.apply({"params": params}, x)
        sampled = module.apply({"params": params}, x, jax.random.key(2), method=AutoencoderKL.encode_latents)
        mode = module.apply({"params": params}, x, method=AutoencoderKL.encode_latents)
        return recon, posterior, sampled, mode

    recon, posterior, sampled, mode = run(params, x)
    assert recon.shape == x.shape and posterior.mean.shape == (2, 4, 4, 4)
    assert jnp.all(jnp.isfinite(recon))
    np.testing.assert_allclose(mode, TINY_F4.scaling_factor * posterior.mode(), rtol=1e-6)
    assert not np.allclose(sampled, mode)


def test_sd_v1_config_has_the_sd_vae_parameter_count():
    module = AutoencoderKL(AutoencoderKLConfig.sd_v1())
    params = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
    assert AutoencoderKLConfig.sd_v1().downsampling_factor == 8
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == 83_653_863  # diffusers' SD v1 AutoencoderKL
    assert AutoencoderKLConfig.mnist_f4().downsampling_factor == 4
    sdxl = AutoencoderKLConfig.sdxl()  # SDXL's VAE: the same layout, other weights, latents scaled by 0.13025
    assert sdxl.block_out_channels == AutoencoderKLConfig.sd_v1().block_out_channels and sdxl.scaling_factor == 0.13025


def test_autoencoder_kl_bad_input():
    module = AutoencoderKL(TINY_F4)
    init = lambda shape: jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    with pytest.raises(ValueError, match=r"18×16 is not divisible by the downsampling factor f=4"):
        init((1, 18, 16, 3))
    with pytest.raises(ValueError, match="expects 3 image channels"):
        init((1, 16, 16, 1))
    with pytest.raises(ValueError, match="expects 3 image channels"):
        init((1, 3, 16, 16))  # NCHW by mistake
    variables = init((1, 16, 16, 3))
    with pytest.raises(ValueError, match=r"latents \[B, h, w, 4\]"):
        jax.eval_shape(
            lambda v, z: module.apply(v, z, method=AutoencoderKL.decode), variables, jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32)
        )
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        AutoencoderKLConfig(block_out_channels=(8, 12), norm_num_groups=8)
