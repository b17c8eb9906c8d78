"""The GAN: Goodfellow et al.'s equations on analytic 1-D cases, the bad-config error, a tiny `train-gan`
run, and SIGKILL-then-rerun resuming bit for bit with both players and both Adam states."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from scipy import stats

from _cli import run_cli
from _training_fixtures import in_process_compilation_cache, sigkill_when
from ddpm_jax import checkpoints, cli, objectives
from ddpm_jax.evaluation import judge as judge_lib
from ddpm_jax.models.gan import generator_output_shape

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_training_worker.py")
LOG4 = math.log(4.0)


# ------------------------------------------------------------------------------------------------
# Eq. 1, Proposition 1, Theorem 1 on 1-D Gaussians
# ------------------------------------------------------------------------------------------------

def quantile_samples(dist, n: int = 20_000) -> np.ndarray:
    """n deterministic, stratified 'samples' of a 1-D distribution: its quantiles at (k + ½)/n."""
    return dist.ppf((np.arange(n) + 0.5) / n).astype(np.float32)


P_DATA, P_G = stats.norm(0.0, 1.0), stats.norm(1.5, 0.8)
EDGES = np.linspace(-3.0, 4.0, 71)  # 70 bins of width 0.1


def bins_of(x: np.ndarray) -> jax.Array:
    return jnp.asarray(np.clip(np.digitize(x, EDGES) - 1, 0, len(EDGES) - 2))  # [N] bin index


@functools.partial(jax.jit, static_argnums=2)
def ascend_value(bins_real: jax.Array, bins_fake: jax.Array, steps: int = 600) -> jax.Array:
    """A fully flexible D (one free logit per bin) trained by gradient ascent on V (objectives.gan_value)."""
    tx = optax.adam(0.1)

    def body(_, carry):
        logits, opt = carry
        grads = jax.grad(lambda l: -objectives.gan_value(l[bins_real], l[bins_fake]))(logits)  # ascent on V
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(logits, updates), opt

    logits = jnp.zeros(len(EDGES) - 1)
    logits, _ = jax.lax.fori_loop(0, steps, body, (logits, tx.init(logits)))
    return jax.nn.sigmoid(logits)  # D on each bin


def learn_discriminator(x_real: np.ndarray, x_fake: np.ndarray) -> np.ndarray:
    return np.asarray(ascend_value(bins_of(x_real), bins_of(x_fake)))


def test_the_discriminator_that_maximises_eq1_is_p_data_over_p_data_plus_p_g():
    x_real, x_fake = quantile_samples(P_DATA), quantile_samples(P_G)
    learned = learn_discriminator(x_real, x_fake)
    centers = (EDGES[:-1] + EDGES[1:]) / 2
    closed_form = np.asarray(objectives.optimal_discriminator(P_DATA.pdf(centers), P_G.pdf(centers)))
    # Both distributions are present in these bins (each holds ≥ 100 of the 20,000 samples of each).
    count = lambda x: np.histogram(x, EDGES)[0]
    both = (count(x_real) >= 100) & (count(x_fake) >= 100)
    assert both.sum() >= 20
    np.testing.assert_allclose(learned[both], closed_form[both], atol=0.01)  # binning error ~ width² · curvature
    # Pointwise: a·log D + b·log(1 − D) over a fine grid of D peaks at a / (a + b).
    d = np.linspace(1e-4, 1 - 1e-4, 100_001)
    for a, b in [(0.3, 0.1), (0.05, 0.4), (1.0, 1.0)]:
        best = d[np.argmax(a * np.log(d) + b * np.log(1 - d))]
        assert abs(best - float(objectives.optimal_discriminator(a, b))) < 1e-4


def test_the_value_at_the_optimal_discriminator_is_minus_log4_plus_twice_the_jsd():
    x = np.linspace(-10.0, 12.0, 400_001)
    p, q = P_DATA.pdf(x), P_G.pdf(x)
    m = (p + q) / 2
    jsd = 0.5 * np.trapezoid(p * np.log(p / m), x) + 0.5 * np.trapezoid(q * np.log(q / m), x)
    x_real, x_fake = quantile_samples(P_DATA, 100_000), quantile_samples(P_G, 100_000)
    log_ratio = lambda x: P_DATA.logpdf(x) - P_G.logpdf(x)  # the logit of D*(x)
    value = float(objectives.gan_value(jnp.asarray(log_ratio(x_real)), jnp.asarray(log_ratio(x_fake))))
    assert value == pytest.approx(-LOG4 + 2 * jsd, abs=2e-3)  # Theorem 1: C(G) = −log 4 + 2·JSD
    assert value > -LOG4 + 0.1


def test_the_value_at_p_g_equal_to_p_data_is_minus_log4():
    x = quantile_samples(P_DATA)
    assert float(objectives.gan_value(np.zeros(5), np.zeros(7))) == pytest.approx(-LOG4, abs=1e-6)  # D = ½
    np.testing.assert_allclose(objectives.optimal_discriminator(P_DATA.pdf(x), P_DATA.pdf(x)), 0.5)
    learned = learn_discriminator(x, x)
    np.testing.assert_allclose(learned, 0.5, atol=1e-6)  # gradient ascent stays at ½ ...
    bins = np.asarray(bins_of(x))
    value = jax.jit(lambda l: objectives.gan_value(l, l))
    for seed in range(3):  # ... the maximum: any other D gives less than −log 4
        logits = np.random.default_rng(seed).normal(size=len(EDGES) - 1).astype(np.float32)
        assert float(value(logits[bins])) < -LOG4


@jax.jit
def generator_gradients(logits: jax.Array) -> dict[str, jax.Array]:
    """Autodiff gradients of both generator losses and the library's closed forms, in one compiled call."""
    return {"ns": jax.grad(objectives.non_saturating_g_loss)(logits), "mm": jax.grad(objectives.minimax_g_loss)(logits),
            "ns_closed": objectives.non_saturating_g_logit_grad(logits), "mm_closed": objectives.minimax_g_logit_grad(logits),
            "ns_up": objectives.non_saturating_g_loss(logits + 1.0) - objectives.non_saturating_g_loss(logits),
            "mm_up": objectives.minimax_g_loss(logits + 1.0) - objectives.minimax_g_loss(logits),
            "d_loss": objectives.gan_d_loss(logits, logits), "value": objectives.gan_value(logits, logits)}


def test_the_non_saturating_gradient_is_strong_where_the_minimax_one_vanishes():
    logits = np.array([-6.0, -3.0, 0.0, 3.0], np.float32)  # D(G(z)) = 0.0025, 0.047, 0.5, 0.95
    d, n = 1 / (1 + np.exp(-logits)), len(logits)
    out = jax.tree.map(np.asarray, generator_gradients(jnp.asarray(logits)))
    np.testing.assert_allclose(out["ns"], out["ns_closed"] / n, rtol=1e-6)
    np.testing.assert_allclose(out["ns"], -(1 - d) / n, rtol=1e-5)
    np.testing.assert_allclose(out["mm"], out["mm_closed"] / n, rtol=1e-6)
    np.testing.assert_allclose(out["mm"], -d / n, rtol=1e-5)
    assert np.all(out["ns"] < 0) and np.all(out["mm"] < 0)  # both push the logit up: D(G(z)) rises
    assert out["ns"][0] * n == pytest.approx(-0.9975, abs=1e-3)  # ≈ −1 where G is poor ...
    assert out["mm"][0] * n == pytest.approx(-0.00247, abs=1e-4)  # ... where the minimax one has vanished
    assert out["ns"][0] / out["mm"][0] > 400
    assert out["ns"][2] == pytest.approx(out["mm"][2])  # equal at D = ½
    assert out["ns_up"] < 0 and out["mm_up"] < 0  # same direction: both fall as D(G(z)) rises
    assert out["d_loss"] == pytest.approx(-out["value"])  # L_D = −V
    assert objectives.GAN_LOSSES["hinge"] == (objectives.hinge_d_loss, objectives.hinge_g_loss)  # shared, not copied


# ------------------------------------------------------------------------------------------------
# The trainer: a tiny config on 8×8 digits
# ------------------------------------------------------------------------------------------------

TINY_CONFIG = textwrap.dedent("""
    import ml_collections

    def get_config():
        c = ml_collections.ConfigDict()
        c.data = ml_collections.ConfigDict(dict(name="folder:{folder}", image_size=8, channels=1))
        c.model = ml_collections.ConfigDict(dict(
            latent_dim=8, generator=dict(features=[8], start_size=4, norm_groups=4),
            discriminator=dict(features=[8])))
        c.loss = ml_collections.ConfigDict(dict(kind="non_saturating"))
        c.train = ml_collections.ConfigDict(dict(
            batch_size=4, num_steps=6, lr=2e-3, disc_lr=2e-3, adam_b1=0.5, adam_b2=0.999, warmup_steps=0,
            grad_clip=None, ema_decay=0.9, ema_warmup=True, seed=0, log_every=3, ckpt_every=3,
            keep_checkpoints=5, sample_every=0, num_samples=4, parallel="jit"))
        c.eval = ml_collections.ConfigDict(dict(num_samples=16, judge=True))
        return c
    """)
NUM_STEPS = 6


def fake_digits(image_size: int, seed: int = 0):
    """Stands in for judge.split_digits (40 train / 20 test blobs): the real one reads 5,000 digits (~10 s)."""
    rng = np.random.default_rng(seed)
    x = np.tanh(rng.normal(size=(60, image_size, image_size, 1))).astype(np.float32)
    y = np.arange(60) % 10
    return (x[:40], y[:40]), (x[40:], y[40:])


def use_fake_judge(mp: pytest.MonkeyPatch, cache) -> None:
    mp.setenv(judge_lib.CACHE_ENV, str(cache))
    mp.setattr(judge_lib, "split_digits", fake_digits)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config path, judge cache with an untrained 8×8 judge): the trainer's wiring, not the judge, is tested here.

    The data are 16 random 8×8 PNGs in a folder (the bundled digits take ~10 s to read).
    """
    root = tmp_path_factory.mktemp("gan")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    config = root / "tiny_gan.py"
    config.write_text(TINY_CONFIG.replace("{folder}", str(folder)))
    cache = root / "judge_cache"
    init = jax.jit(judge_lib.JudgeCNN().init, compiler_options={"xla_backend_optimization_level": 0})  # one compile
    params = init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    judge_lib.save_judge(judge_lib.Judge(params=params, image_size=8, seed=0, test_accuracy=0.1),
                         judge_lib.cache_path(8, 0, cache))
    return config, cache


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """An uninterrupted `ddpm-jax train-gan` of the tiny config: (workdir, exit status)."""
    config, cache = tiny
    workdir = tmp_path_factory.mktemp("straight") / "run"
    mp = pytest.MonkeyPatch()
    use_fake_judge(mp, cache)
    try:  # module scope has no capsys: call the CLI's main directly
        with in_process_compilation_cache():
            status = cli.main(["train-gan", "--config", str(config), "--workdir", str(workdir)])
    finally:
        mp.undo()
    return workdir, status


def test_a_tiny_train_gan_run_writes_samples_interpolation_and_the_judge(straight):
    workdir, status = straight
    assert status == 0
    assert checkpoints.latest_step(workdir) == NUM_STEPS
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert np.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["d_loss"] + r["g_loss"], rel=1e-5)
        assert r["value"] == pytest.approx(-r["d_loss"], rel=1e-5)  # L_D = −V for the non-saturating game
        assert 0 < r["d_fake"] < 1 and 0 < r["d_real"] < 1
    grid = np.asarray(Image.open(workdir / "samples" / f"step_{NUM_STEPS:07d}.png"))
    assert grid.ndim == 2 and grid.std() > 0  # four 8×8 samples, not a blank image
    strip = Image.open(workdir / "interpolation.png")
    assert strip.width > strip.height  # 8 rows of 10 interpolants
    result = json.loads((workdir / "eval.json").read_text())
    assert result["num_samples"] == 16 and sum(result["judge"]["class_histogram"]) == 16
    assert {"confidence", "classifier_fid", "classifier_fid_real_baseline"} <= set(result["judge"])
    assert result["sampling"]["num"] == 64 and result["sampling"]["seconds"] > 0
    assert result["train"]["steps_this_run"] == NUM_STEPS
    g = checkpoints.load_state_tree(workdir)
    assert {"params", "ema_params", "opt_state", "disc_params", "disc_opt_state"} <= set(g)
    # params / ema_params are the generator: Dense z (8) → 4×4×8, one transposed conv to 8×8×1.
    assert g["params"]["project"]["kernel"].shape == (8, 4 * 4 * 8)
    assert generator_output_shape(4, [8], 1) == (8, 8, 1)


def test_a_generator_that_does_not_make_the_data_shape_is_one_clear_error(tiny, tmp_path, capsys):
    config, _ = tiny
    status, _, err = run_cli(["train-gan", "--config", str(config), "--workdir", str(tmp_path / "w"),
                              "model.generator.start_size=8"], capsys)
    assert status == 2
    assert err.strip() == ("ddpm-jax: error: the generator makes 16×16×1 images (model.generator.start_size=8 "
                           "doubled by 1 transposed convs) but the data are 8×8×1: set model.generator.start_size=4")
    assert not (tmp_path / "w").exists()  # failed before anything was written


def _checkpoint_steps(workdir) -> list[int]:
    path = checkpoints.checkpoint_dir(workdir)
    return [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []


def test_sigkill_then_rerun_resumes_bit_identically_with_both_optimisers(tiny, straight, tmp_path, capsys):
    config, _ = tiny
    straight_dir, _ = straight
    resumed = tmp_path / "resumed"
    sigkill_when([sys.executable, WORKER, "gan", str(config), str(resumed), "0.25"],
                 lambda: _checkpoint_steps(resumed), timeout=120)
    killed_at = checkpoints.latest_step(resumed)
    assert killed_at is not None and killed_at < NUM_STEPS, killed_at  # it really stopped mid-run

    with in_process_compilation_cache():  # the same command again (without the judged samples: not training)
        status, _, _ = run_cli(["train-gan", "--config", str(config), "--workdir", str(resumed),
                                "eval.num_samples=0"], capsys)
    assert status == 0 and checkpoints.latest_step(resumed) == NUM_STEPS
    a, b = checkpoints.load_state_tree(straight_dir), checkpoints.load_state_tree(resumed)
    assert set(a) == set(b) and {"disc_params", "disc_opt_state", "opt_state", "ema_params"} <= set(a)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # G, EMA, D and both Adam states, bit for bit
    grid = f"samples/step_{NUM_STEPS:07d}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(straight_dir / grid)), np.asarray(Image.open(resumed / grid)))
    steps = [json.loads(line)["step"] for line in open(resumed / "metrics.jsonl")]
    assert steps == [3, 6]  # each logged step once, despite the crash


def test_slerp_stays_on_the_arc():
    from ddpm_jax.training.gan import slerp

    a, b = np.array([3.0, 0.0, 0.0]), np.array([0.0, 3.0, 0.0])
    path = slerp(a, b, 5)
    np.testing.assert_allclose(path[0], a, atol=1e-12)
    np.testing.assert_allclose(path[-1], b, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), 3.0)  # the line's midpoint would have norm 3/√2
    np.testing.assert_allclose(path[2], 3.0 * np.array([1, 1, 0]) / np.sqrt(2))
    np.testing.assert_allclose(slerp(a, 2 * a, 3)[1], 1.5 * a)  # parallel ends: the straight line


def test_the_experiment_file_is_a_valid_16x16_dcgan():
    from ddpm_jax import config as config_lib
    from ddpm_jax.training import gan

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "gan_mnist.py")
    config = config_lib.load_config(path)
    gan.validate_config(config)  # the generator makes the data's 16×16×1
    assert (config.data.name, config.data.image_size, config.loss.kind) == ("mnist_bundled", 16, "non_saturating")
    assert (config.train.lr, config.train.adam_b1) == (config.train.disc_lr, 0.5)
    text = open(path).read()
    assert all(part in text for part in ("Command::", "Hardware:", "Expected result")) and "MEASURED" not in text


def test_a_non_finite_loss_stops_the_run_before_anything_is_saved(tiny, tmp_path):
    from ddpm_jax import config as config_lib
    from ddpm_jax.training import gan

    config, _ = tiny
    images = np.full((16, 8, 8, 1), np.nan, np.float32)  # D(x) is NaN: L_D, hence loss = L_D + L_G, is not finite
    with in_process_compilation_cache(), pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        gan.train(config_lib.load_config(config), tmp_path / "run", images=images)
    assert checkpoints.latest_step(tmp_path / "run") is None
