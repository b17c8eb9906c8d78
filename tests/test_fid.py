"""Tests for evaluation/fid.py: Inception Score (closed forms, a hand computation), Fréchet distance vs
pytorch-fid, statistics files, and the FID/IS drivers (wiring, protocol, every input error) on a random-weight
Inception."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.evaluation.fid import (
    FIDProtocol,
    compute_fid,
    compute_inception_score,
    inception_score,
    load_statistics,
    save_statistics,
)
from ddpm_jax.evaluation.frechet import feature_statistics, frechet_distance
from ddpm_jax.evaluation.inception import Inception, InceptionV3, quantize_8bit

BATCH = 4  # one batch size everywhere: the network compiles once


@pytest.fixture(scope="module")
def inception():
    """The FID network with random He-scaled weights and random BatchNorm statistics (no torch, no file)."""
    shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.standard_normal(shape) * (2.0 / np.prod(shape[:-1])) ** 0.5
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.standard_normal(shape) * 0.1
        return jnp.asarray(value, jnp.float32)

    return Inception(jax.tree_util.tree_map_with_path(fill, shapes), weights="random (test)")


def images(n, shape=(12, 12, 3), seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Fréchet distance vs pytorch-fid (tests/test_frechet.py checks closed forms, not pytorch-fid itself)
# --------------------------------------------------------------------------------------------


def test_frechet_distance_matches_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(0)
    for d in (8, 64):
        a, b = rng.standard_normal((3 * d, d)), rng.standard_normal((3 * d, d)) * 1.3 + 0.2
        (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pytorch-fid's sqrtm(disp=False)
            ref = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
        np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def test_inception_score_identical_rows_is_one():
    logits = np.tile(np.random.default_rng(0).standard_normal(1008), (40, 1))
    for splits in (1, 10):
        mean, std = inception_score(logits, splits=splits)
        assert abs(mean - 1.0) < 1e-12 and std < 1e-12


@pytest.mark.parametrize("k", [1, 2, 7, 1008])
def test_inception_score_even_one_hot_is_k(k):
    """Confident predictions spread evenly over K classes: KL = log K for every image, IS = K."""
    labels = np.tile(np.arange(k), 4)  # each half (split) holds every class twice
    logits = np.zeros((labels.size, 1008))
    logits[np.arange(labels.size), labels] = 1000.0  # exp(-1000) = 0 in float64: exactly one-hot
    mean, std = inception_score(logits, splits=2)
    assert abs(mean - k) < 1e-9 * k and std < 1e-9 * k


def test_inception_score_matches_hand_computation():
    """Uneven splits (23 images, 4 splits) against the textbook formula in plain NumPy."""
    logits = np.random.default_rng(1).standard_normal((23, 10)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(4):
        part = p[i * 23 // 4 : (i + 1) * 23 // 4]
        py = part.mean(0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
    mean, std = inception_score(logits, splits=4)
    np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-12)


def test_inception_score_bad_input():
    with pytest.raises(ValueError, match=r"\[N, num_classes\], got shape \(10,\)"):
        inception_score(np.zeros(10))
    with pytest.raises(ValueError, match="5 samples cannot be cut into 10 splits"):
        inception_score(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="positive integer"):
        inception_score(np.zeros((5, 3)), splits=0)
    with pytest.raises(ValueError, match="NaN"):
        inception_score(np.full((5, 3), np.nan), splits=1)


# --------------------------------------------------------------------------------------------
# Statistics files
# --------------------------------------------------------------------------------------------


def test_statistics_round_trip_and_pytorch_fid_files(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(2048), np.eye(2048) * 0.5
    save_statistics(tmp_path / "ours.npz", mu, sigma)
    got_mu, got_sigma = load_statistics(tmp_path / "ours.npz")
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    np.savez_compressed(tmp_path / "theirs.npz", mu=mu[:16], sigma=sigma[:16, :16])  # pytorch-fid's save_fid_stats
    assert load_statistics(tmp_path / "theirs.npz", dim=None)[0].shape == (16,)


def test_bad_statistics_files(tmp_path):
    np.savez(tmp_path / "keys.npz", mean=np.zeros(4), cov=np.eye(4))
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['mu', 'sigma'\].*'mean'"):
        load_statistics(tmp_path / "keys.npz")
    np.savez(tmp_path / "dim.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="holds 64-d statistics, expected 2048-d"):
        load_statistics(tmp_path / "dim.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(4), sigma=np.eye(5))
    with pytest.raises(ValueError, match=r"mu must be \[D\] and sigma \[D, D\], got \(4,\) and \(5, 5\)"):
        load_statistics(tmp_path / "shape.npz", dim=None)
    with pytest.raises(ValueError, match="mu must be"):
        save_statistics(tmp_path / "x.npz", np.zeros((2, 2)), np.eye(2))
    with pytest.raises(FileNotFoundError, match="no statistics file"):
        load_statistics(tmp_path / "absent.npz")


# --------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------


def test_quantize_8bit():
    x = np.linspace(-1.02, 1.02, 1001, dtype=np.float32)
    q = np.asarray(quantize_8bit(x))
    levels = (q + 1) * 127.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert q.min() == -1 and q.max() == 1 and np.abs(q - np.clip(x, -1, 1)).max() <= 0.5 / 127.5 + 1e-6
    np.testing.assert_array_equal(np.asarray(quantize_8bit(q)), q)  # real 8-bit data is unchanged


def test_compute_fid_wiring_and_protocol(inception, tmp_path):
    """Against the same steps done by hand, from images and from a saved statistics file.

    The distance itself is replaced by a recorder: a 2048-d sqrtm takes ~30 s on a small CPU, and
    frechet_distance is tested against pytorch-fid above and in test_frechet.py.
    """
    calls = []

    def recorder(*stats):
        calls.append(stats)
        return 1.25

    samples, reference = images(6, seed=1), images(8, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # N < D: singular covariances, expected here
        result = compute_fid(samples, reference, inception, reference_name="toy train", batch_size=BATCH,
                             min_samples=4, is_splits=2, progress=False, frechet_fn=recorder)
        feats = [inception.features(np.asarray(quantize_8bit(x)), batch_size=BATCH, progress=False)
                 for x in (samples, reference)]
        expected = [*feature_statistics(feats[0]), *feature_statistics(feats[1])]
        assert result["fid"] == 1.25 and len(calls) == 1
        for got, want in zip(calls[0], expected):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # float32 rounding of the 8-bit levels
        np.testing.assert_allclose(result["mu"], expected[0], rtol=1e-4, atol=1e-5)
        assert np.abs(expected[0] - expected[2]).max() > 1e-3  # the two sets really differ

        stats = tmp_path / "ref.npz"
        save_statistics(stats, expected[2], expected[3])
        from_file = compute_fid(samples, stats, inception, batch_size=BATCH, min_samples=4, is_splits=None,
                                progress=False, frechet_fn=recorder)
    for got, want in zip(calls[1], (*calls[0][:2], *expected[2:])):  # same samples; reference from the file
        np.testing.assert_array_equal(got, want)

    logits = inception.logits(np.asarray(quantize_8bit(samples)), batch_size=BATCH, progress=False)
    np.testing.assert_allclose([result["is"], result["is_std"]], inception_score(logits, splits=2),
                               rtol=1e-5, atol=1e-7)
    assert "is" not in from_file and from_file["protocol"].splits is None

    protocol = result["protocol"]
    assert isinstance(protocol, FIDProtocol)
    assert (protocol.num_samples, protocol.sample_shape, protocol.reference, protocol.num_reference) == (
        6, (12, 12, 3), "toy train", 8)
    assert protocol.quantize and not protocol.grayscale_to_rgb and protocol.weights == "random (test)"
    line = str(protocol)
    assert "FID: 6 samples 12x12x3" in line and "reference toy train (8 images)" in line and "8-bit quantized" in line
    assert "bilinear to 299x299" in line and "pool3 (2048); IS: softmax of pool3 · W" in line and "2 splits" in line
    assert from_file["protocol"].num_reference is None and "precomputed statistics" in str(from_file["protocol"])
    assert protocol.to_dict()["sample_shape"] == (12, 12, 3)


def test_compute_inception_score_grayscale(inception):
    x = images(4, shape=(12, 12, 1), seed=3)
    result = compute_inception_score(x, inception, splits=2, batch_size=BATCH, progress=False)
    logits = inception.logits(np.repeat(np.asarray(quantize_8bit(x)), 3, -1), batch_size=BATCH, progress=False)
    np.testing.assert_allclose([result["is"], result["is_std"]], inception_score(logits, splits=2),
                               rtol=1e-5, atol=1e-7)
    assert 1.0 <= result["is"] <= 4.0  # IS lies in [1, min(N per split, classes)]
    protocol = result["protocol"]
    assert protocol.grayscale_to_rgb and protocol.splits == 2 and "grayscale repeated to RGB" in str(protocol)
    assert "without bias" in protocol.features and "2 splits" in str(protocol)


def test_driver_input_errors(inception, tmp_path):
    """Every error is raised before any network work."""
    ok = images(6)
    with pytest.raises(ValueError, match=r"sample images are 12x12x3 \(HxWxC\) but reference images are 12x12x1"):
        compute_fid(ok, images(6, shape=(12, 12, 1)), inception, min_samples=2, is_splits=None)
    with pytest.raises(ValueError, match="sample images are 12x12x3.*reference images are 16x16x3"):
        compute_fid(ok, images(6, shape=(16, 16, 3)), inception, min_samples=2, is_splits=None)
    with pytest.raises(ValueError, match=r"too few sample images.*N=6 < min_samples=2048.*50,000.*min_samples=6"):
        compute_fid(ok, ok, inception)
    with pytest.raises(ValueError, match=r"6 samples cannot be cut into is_splits=10.*is_splits=None"):
        compute_fid(ok, ok, inception, min_samples=2)
    with pytest.raises(ValueError, match=r"too few reference images.*N=3"):
        compute_fid(ok, ok[:3], inception, min_samples=4, is_splits=None)
    with pytest.raises(ValueError, match=r"sample images have values in \[0.*255\].*\[0, 255\]\? use x / 127.5 - 1"):
        compute_fid((ok + 1) * 127.5, ok, inception, min_samples=2)
    with pytest.raises(ValueError, match="reference images have dtype uint8"):
        compute_fid(ok, ((ok + 1) * 127.5).astype(np.uint8), inception, min_samples=2, is_splits=None)
    np.savez(tmp_path / "stats64.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="holds 64-d statistics"):
        compute_fid(ok, tmp_path / "stats64.npz", inception, min_samples=2, is_splits=None)
    with pytest.raises(ValueError, match=r"NHWC"):
        compute_inception_score(ok[:, :, :, :2], inception)
