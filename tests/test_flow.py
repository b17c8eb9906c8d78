"""The normalizing flow (models/flow.py), its equations (objectives.py) and its trainer (training/flow.py).

* Every layer and the whole multi-scale flow: inverse(forward(x)) = x to ≤ 1e-5, and each forward's
  log |det J| equals ``slogdet`` of the brute-force Jacobian (``jax.jacfwd``) to ≤ 1e-4, on 4×4×2 inputs with
  random (non-identity) parameters (4×4×1 for the flow); one small compiled program per layer.
* actnorm's data-dependent init; the LU conv's fixed P and sign(s) get zero gradients.
* A flow fitted to Gaussian data: its held-out NLL per dimension approaches the data's entropy.
* bits/dim of the dequantised, [−1, 1]-scaled 8-bit data against a hand computation.
* Bad input (squeezes that do not divide the image, a channel mask on an odd channel count): one error each.
* One tiny ``ddpm-jax train-flow`` run (exact resume is the shared loop's, tested in test_train_loop.py and
  test_checkpoints_resume.py, not repeated here).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _cli import run_cli
from _training_fixtures import in_process_compilation_cache
from ddpm_jax import objectives
from ddpm_jax.models import flow as F
from ddpm_jax.workdir import load_flow

ROOT = pathlib.Path(__file__).resolve().parents[1]
O0 = {"xla_backend_optimization_level": 0}  # tiny programs run once: compile them fast
FIXED = ("P", "sign_s")  # the LU conv's constants (Glow: P stays fixed); never perturbed


def perturb(params, scale=0.3):
    """Non-identity parameters: every trainable leaf + scale · sin(1 + 0.7·k + i) (k: the element, i: the leaf).

    Deterministic and cheap to compile (random draws per leaf make the test programs several times bigger)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    wave = lambda p, i: scale * jnp.sin(1.0 + 0.7 * jnp.arange(p.size) + i).reshape(p.shape)
    new = [p if path[-1].key in FIXED else p + wave(p, i) for i, (path, p) in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)


def jacobian_logdet(fn, x):
    """slogdet of the brute-force Jacobian of fn: one example [H, W, C] → a flat vector."""
    J = jax.jacfwd(lambda v: fn(v.reshape(1, *x.shape)).reshape(-1))(x.reshape(-1))  # [D, D]
    return jnp.linalg.slogdet(J)[1]


LAYERS = {
    "actnorm": F.ActNorm(),
    "invertible_conv_1x1": F.InvertibleConv1x1(),
    "coupling_checkerboard_0": F.AffineCoupling("checkerboard", 0, 8),
    "coupling_channel_1": F.AffineCoupling("channel", 1, 8),
    "squeeze": F.Squeeze(),
}
# Two scales on 4×4×1 (a squeeze, a Glow step, a factor-out, a squeeze, a Glow step): the checkerboard couplings
# (parity 0) and the parity-1 channel coupling are checked on their own above, parity 0 inside the flow.
FLOW = F.Flow(F.FlowConfig(image_shape=(4, 4, 1), num_levels=2, num_checkerboard=0, num_steps=1, hidden_channels=4))


@functools.lru_cache(maxsize=None)
def check(name):
    """(max |inverse(forward(x)) − x|, logdet, slogdet of jacfwd, params) for the layer ``name`` or the flow.

    Init, perturbation and checks are one jit per layer, compiled without XLA's backend optimisations: eager
    op-by-op dispatch, an optimised compile or one program for all layers each take minutes on 2 busy cores."""
    module = FLOW if name == "flow" else LAYERS[name]

    def program(x):
        kw = {"method": F.Flow.log_likelihood} if module is FLOW else {}
        params = perturb(module.init(jax.random.key(1), x, **kw), 0.1 if module is FLOW else 0.3)
        if module is FLOW:
            zs, logdet = FLOW.apply(params, x, method=F.Flow.forward)
            x_back = FLOW.apply(params, zs, method=F.Flow.inverse)
            flat = lambda v: jnp.concatenate([z.reshape(-1) for z in FLOW.apply(params, v, method=F.Flow.forward)[0]])
            return jnp.max(jnp.abs(x_back - x)), logdet[0], jacobian_logdet(flat, x[0]), params
        h, logdet = module.apply(params, x, method=module.forward)
        x_back = module.apply(params, h, method=module.inverse)
        brute = jacobian_logdet(lambda v: module.apply(params, v)[0], x[0])
        return jnp.max(jnp.abs(x_back - x)), logdet[0], brute, params

    x = np.random.default_rng(0).normal(size=(3, 4, 4, 1 if module is FLOW else 2)).astype(np.float32)  # [B, 4, 4, C]
    return jax.jit(program, compiler_options=O0)(x)


@pytest.mark.parametrize("name", [*LAYERS, "flow"])
def test_inverse_of_forward_is_x_and_logdet_is_slogdet_of_the_jacobian(name):
    err, logdet, brute, _ = check(name)
    assert float(err) <= 1e-5, f"{name}: inverse(forward(x)) is {float(err):.2e} away from x"
    np.testing.assert_allclose(float(logdet), float(brute), atol=1e-4, err_msg=name)
    if name != "squeeze":
        assert abs(float(logdet)) > 0.1, f"{name}: a trivial Jacobian proves nothing"


def test_lu_conv_keeps_p_and_sign_fixed_and_its_logdet_is_hw_log_abs_s():
    _, logdet, _, params = check("invertible_conv_1x1")
    layer, x = LAYERS["invertible_conv_1x1"], np.ones((1, 4, 4, 2), np.float32)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x)[0] ** 2)), compiler_options=O0)(params)["params"]
    assert float(jnp.abs(grads["P"]).max()) == 0.0 and float(jnp.abs(grads["sign_s"]).max()) == 0.0
    assert float(jnp.abs(grads["L"]).max()) > 0.0
    conv = params["params"]
    assert np.allclose(np.sort(np.asarray(conv["P"]).sum(0)), 1.0)  # a permutation matrix
    # log |det J| = H·W·Σ log|s| (Glow Eq. 10): 4·4 pixels.
    np.testing.assert_allclose(float(logdet), 16 * float(jnp.sum(conv["log_s"])), rtol=1e-6)


def test_actnorm_data_dependent_init_gives_zero_mean_unit_variance_per_channel():
    x = 3.0 + 2.0 * np.random.default_rng(5).normal(size=(16, 4, 4, 2)).astype(np.float32) * np.array([1.0, 0.1])
    layer = F.ActNorm()
    h, _ = jax.jit(lambda x: layer.apply(layer.init(jax.random.key(0), x), x), compiler_options=O0)(x)
    np.testing.assert_allclose(np.asarray(h.mean(axis=(0, 1, 2))), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h.std(axis=(0, 1, 2))), 1.0, atol=1e-4)


def test_flow_fitted_to_gaussian_data_reaches_its_entropy():
    # y = μ + A ε on 2×2×1 "images" (D = 4): the entropy is ½ log(2πe) + log|det A| / D nats per dimension.
    # Actnorm, the 1×1 conv and the prior scales can represent this exactly, so the held-out NLL/dim of the
    # fitted flow (a cross-entropy, ≥ the entropy) must come within 0.05 nats of it (measured: 0.02 after 300 steps).
    D = 4
    rng = np.random.default_rng(0)
    A = rng.normal(size=(D, D)).astype(np.float32) + 2 * np.eye(D, dtype=np.float32)
    mu = np.array([0.5, -1.0, 0.0, 2.0], np.float32)
    entropy = 0.5 * math.log(2 * math.pi * math.e) + np.linalg.slogdet(A)[1] / D
    draw = lambda key, n: (mu + jax.random.normal(key, (n, D)) @ A.T).reshape(n, 2, 2, 1)
    # One Glow step after the squeeze (actnorm, the LU conv, a coupling) can whiten any Gaussian: W decorrelates.
    flow = F.Flow(F.FlowConfig(image_shape=(2, 2, 1), num_levels=1, num_checkerboard=0, num_steps=1, hidden_channels=8))
    tx = optax.adam(1e-2)
    nll = lambda p, y: -jnp.mean(flow.apply(p, y, method=F.Flow.log_likelihood)) / D

    def fit(key):
        params = flow.init(key, draw(jax.random.key(1), 512), method=F.Flow.log_likelihood)

        def step(carry, key):
            params, opt_state = carry
            grads = jax.grad(nll)(params, draw(key, 128))
            updates, opt_state = tx.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), None
        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(jax.random.key(2), 300))
        return nll(params, draw(jax.random.key(3), 8192))

    held_out = float(jax.jit(fit, compiler_options=O0)(jax.random.key(0)))
    assert entropy - 0.02 <= held_out <= entropy + 0.05, (held_out, entropy)


def test_bits_per_dim_accounts_for_dequantisation_and_the_scaling_by_hand():
    x = np.array([[0, 17, 128, 255]], np.uint8).reshape(1, 2, 2, 1)
    u = np.array([0.0, 0.25, 0.5, 0.999], np.float32).reshape(1, 2, 2, 1)
    y = objectives.dequantize(jnp.asarray(x), jnp.asarray(u))
    np.testing.assert_allclose(np.asarray(y).ravel(), 2 * (x.ravel() + u.ravel()) / 256 - 1, rtol=1e-6)
    assert float(y.min()) == -1.0 and float(y.max()) < 1.0
    # A uniform density on [−1, 1]^D is 8 bits per 8-bit pixel.
    np.testing.assert_allclose(float(objectives.dequantized_bits_per_dim(jnp.array([-4 * math.log(2)]), 4)[0]), 8.0,
                               rtol=1e-6)
    # p_Y = N(0, 0.5²) per dimension. By hand: w = x + u ∈ [0, 256) has p_W(w) = p_Y(2w/256 − 1) · (2/256)^D,
    # and bits/dim = −log₂ p_W(w) / D.
    yv = 2 * (x.ravel() + u.ravel()) / 256 - 1
    log_pw = np.sum(-0.5 * np.log(2 * np.pi * 0.25) - yv**2 / (2 * 0.25)) + 4 * np.log(2 / 256)
    log_py = objectives.gaussian_log_density(y, 0.0, math.log(0.5))
    np.testing.assert_allclose(float(objectives.dequantized_bits_per_dim(log_py, 4)[0]), -log_pw / (4 * np.log(2)),
                               rtol=1e-5)
    # The change of variables adds the log-determinant.
    np.testing.assert_allclose(np.asarray(objectives.flow_log_likelihood(jnp.array([-3.0]), jnp.array([1.5]))), -1.5)


def test_bad_input_gives_one_clear_error_each(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"12×12 cannot be squeezed 3 times.*divisible by 8"):
        F.check_flow_config(F.FlowConfig(image_shape=(12, 12, 1), num_levels=3))
    with pytest.raises(ValueError, match=r"channel-mask coupling .* C=1 \(odd\); squeeze first"):
        F.AffineCoupling("channel", 0, 4).init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="squeeze halves H and W, but the input is 5×4"):
        F.squeeze(jnp.zeros((1, 5, 4, 1)))
    status, _, err = run_cli(["train-flow", "--config", str(ROOT / "experiments" / "flow_mnist.py"), "--workdir",
                              str(tmp_path / "bad"), "data.image_size=20"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("ddpm-jax: error: an image of 20×20 cannot be squeezed 3 times")


def test_train_flow_cli_tiny_run_writes_eval_samples_and_metrics(tmp_path, capsys):
    workdir = tmp_path / "flow"
    with in_process_compilation_cache():
        status, out, err = run_cli([
            "train-flow", "--config", str(ROOT / "experiments" / "flow_mnist.py"), "--workdir", str(workdir),
            "data.image_size=4", "data.num_examples=60", "data.num_held_out=20", "model.num_levels=1",
            "model.num_checkerboard=1", "model.num_steps=1", "model.hidden_channels=4", "train.batch_size=8",
            "train.num_steps=4", "train.log_every=2", "train.ckpt_every=4", "train.num_samples=4",
            "train.init_batch=16"], capsys)
    assert status in (0, None), err
    record = json.loads((workdir / "eval.json").read_text())
    assert record["step"] == 4 and record["num_held_out"] == 20 and record["num_samples"] == 4
    assert 4.0 < record["bits_per_dim"] < 12.0 and np.isfinite(record["train_bits_per_dim"])
    assert sorted(p.name for p in (workdir / "samples").iterdir()) == [
        "step_0000004_T0.5.png", "step_0000004_T0.7.png", "step_0000004_T1.png"]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4] and all(np.isfinite(r["loss"]) for r in lines)
    flow, params = load_flow(workdir)  # the reader builds the same module from config.json
    assert flow.config == F.FlowConfig(image_shape=(4, 4, 1), num_levels=1, num_checkerboard=1, num_steps=1,
                                       hidden_channels=4)
    assert set(params) >= {"prior_mean_0", "prior_logs_0", "layers_0", "layers_4"}
