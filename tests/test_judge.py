"""The offline MNIST judge (ddpm_jax/evaluation/judge.py): accuracy, classifier FID, cache, bad input.

One judge is trained for the whole module at 16×16 with 300 steps (~10 s on 2 cores; measured test
accuracy 0.96 there, 0.98 with the default 1,000 steps), so the bounds below leave a margin of a few
points for other platforms' float differences.
"""

import numpy as np
import pytest

from ddpm_jax.evaluation import judge as J

SIZE = 16


@pytest.fixture(scope="module")
def judge():
    return J.train_judge(SIZE, seed=0, num_steps=300, progress=False)


@pytest.fixture(scope="module")
def digits():
    return J.split_digits(SIZE, seed=0)


def _shuffled(images, n, seed=0):
    return images[np.random.default_rng(seed).permutation(images.shape[0])[:n]]


def test_split_is_stratified_disjoint_and_deterministic(digits):
    (train_x, train_y), (test_x, test_y) = digits
    assert train_x.shape == (4000, SIZE, SIZE, 1) and test_x.shape == (1000, SIZE, SIZE, 1)
    assert np.bincount(test_y).tolist() == [100] * 10 and np.bincount(train_y).tolist() == [400] * 10
    assert -1.0 <= train_x.min() and train_x.max() <= 1.0
    # No test digit is in the training split (compared pixel for pixel).
    train_rows = {row.tobytes() for row in train_x.reshape(4000, -1)}
    assert not any(row.tobytes() in train_rows for row in test_x.reshape(1000, -1))
    (_, _), (test_x_again, _) = J.split_digits(SIZE, seed=0)
    np.testing.assert_array_equal(test_x, test_x_again)
    (_, _), (test_x_seed1, _) = J.split_digits(SIZE, seed=1)
    assert not np.array_equal(test_x, test_x_seed1)


def test_judge_classifies_held_out_real_digits(judge, digits):
    _, (test_x, test_y) = digits
    assert judge.test_accuracy >= 0.93
    assert np.mean(judge.predict(test_x) == test_y) == pytest.approx(judge.test_accuracy)
    assert 40_000 < judge.num_params < 60_000


def test_classifier_fid_small_for_real_digits_large_for_noise(judge, digits):
    (train_x, _), _ = digits
    real = J.judge_report(_shuffled(train_x, 1000), judge)
    # Measured 2.6 (real train vs real test, N = 1000) against 770 for noise, 600 for only 1s.
    assert real["classifier_fid"] < 6.0
    assert real["classifier_fid_real_baseline"] < 6.0
    assert max(real["class_share"]) < 0.15 and sum(real["class_histogram"]) == 1000
    assert real["confidence"] > 0.9
    assert "a proxy, NOT FID" in real["protocol"] and "\n" not in real["protocol"]

    noise = np.clip(np.random.default_rng(0).standard_normal((500, SIZE, SIZE, 1)), -1, 1)
    bad = J.judge_report(noise, judge, baseline=False)
    assert bad["classifier_fid"] > 50 * real["classifier_fid"]
    assert "classifier_fid_real_baseline" not in bad


def test_mode_collapse_shows_in_histogram_and_fid(judge, digits):
    (train_x, train_y), _ = digits
    ones = train_x[train_y == 1][:300]
    report = J.judge_report(ones, judge, baseline=False)
    assert report["class_share"][1] > 0.9
    assert report["classifier_fid"] > 100


def test_per_class_accuracy_of_samples_of_known_classes(judge, digits):
    _, (test_x, test_y) = digits
    threes = test_x[test_y == 3]
    right = J.judge_report(threes, judge, labels=np.full(len(threes), 3), baseline=False)
    assert right["accuracy"] >= 0.85
    assert right["per_class_accuracy"][3] == right["accuracy"]
    assert right["per_class_accuracy"][0] is None  # no sample was meant to be a 0
    wrong = J.judge_report(threes, judge, labels=np.full(len(threes), 4), baseline=False)
    assert wrong["accuracy"] <= 0.1

    both = np.concatenate([test_x[test_y == 0][:50], test_x[test_y == 7][:50]])
    report = J.judge_report(both, judge, labels=np.repeat([0, 7], 50), baseline=False)
    assert report["per_class_accuracy"][0] >= 0.85 and report["per_class_accuracy"][7] >= 0.85
    with pytest.raises(ValueError, match="labels has 3 entries for 100 samples"):
        J.judge_report(both, judge, labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"labels must be classes 0..9"):
        J.judge_report(both, judge, labels=np.full(100, 10))


def test_save_load_round_trip_and_cache_reuse(judge, digits, tmp_path, monkeypatch):
    _, (test_x, _) = digits
    path = J.save_judge(judge, tmp_path / "j.safetensors")
    back = J.load_judge(path)
    assert (back.image_size, back.seed, back.test_accuracy) == (SIZE, 0, judge.test_accuracy)
    np.testing.assert_array_equal(back.apply(test_x[:20])[0], judge.apply(test_x[:20])[0])

    calls = []

    def fake_train(image_size, seed=0, **kwargs):
        calls.append((image_size, seed))
        return judge

    monkeypatch.setattr(J, "train_judge", fake_train)
    monkeypatch.setenv(J.CACHE_ENV, str(tmp_path / "cache"))
    assert J.cache_path(SIZE, 0) == tmp_path / "cache" / f"{J.ARCH_VERSION}_16px_seed0.safetensors"
    first = J.get_judge(SIZE, seed=0)
    assert calls == [(SIZE, 0)] and J.cache_path(SIZE, 0).is_file()
    second = J.get_judge(SIZE, seed=0)
    assert calls == [(SIZE, 0)]  # loaded from the cache, not retrained
    np.testing.assert_array_equal(second.apply(test_x[:5])[1], first.apply(test_x[:5])[1])
    J.get_judge(SIZE, seed=1)  # another seed is another cache entry
    assert calls == [(SIZE, 0), (SIZE, 1)]

    J.cache_path(SIZE, 0).write_bytes(b"truncated")  # an unreadable entry is retrained, not fatal
    J.get_judge(SIZE, seed=0)
    assert calls[-1] == (SIZE, 0) and len(calls) == 3
    assert J.load_judge(J.cache_path(SIZE, 0)).image_size == SIZE


def test_load_rejects_a_file_that_is_not_a_judge(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, tmp_path / "other.safetensors", metadata={"arch": "unet"})
    with pytest.raises(ValueError, match="is not a judge-cnn-v2 judge"):
        J.load_judge(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="no judge weights"):
        J.load_judge(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("shape, scale, message", [
    ((4, 28, 28, 1), 1.0, "images are 28x28 but this judge was trained on 16x16; use get_judge(image_size=28)"),
    ((4, 16, 16, 3), 1.0, "grayscale images [N, H, W, 1] (NHWC), got shape (4, 16, 16, 3)"),
    ((4, 1, 16, 16), 1.0, "grayscale images [N, H, W, 1]"),
    ((4, 16, 16, 1), 255.0, "images must be in [-1, 1], got values in [0, 255] (they look like 0..255 pixels"),
    ((4, 16, 16, 1), 2.0, "images must be in [-1, 1], got values in [0, 2]"),
    ((1, 16, 16, 1), 1.0, "need at least 2 samples"),
])
def test_bad_input_gets_a_one_line_error(judge, shape, scale, message):
    images = np.linspace(0, scale, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    with pytest.raises(ValueError) as info:
        J.judge_report(images, judge)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_nan_images_are_rejected(judge):
    images = np.zeros((4, SIZE, SIZE, 1), np.float32)
    images[2, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        judge.apply(images)


def test_labelled_grid_and_text_summary(judge, digits, tmp_path):
    _, (test_x, _) = digits
    report = J.judge_report(test_x[:300:3], judge)
    path = J.save_labelled_grid(test_x[:300:3], np.asarray(report["predicted"]), tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = J.format_report(report)
    assert "classifier FID" in text and "real digits, same N" in text and "7:" in text


def test_unwritable_cache_warns_and_still_judges(judge, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setattr(J, "train_judge", lambda image_size, seed=0, **kw: judge)
    with pytest.warns(RuntimeWarning, match="could not cache the judge"):
        got = J.get_judge(SIZE, cache_dir=blocker)
    assert got is judge
