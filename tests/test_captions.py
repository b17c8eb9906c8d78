"""Captioned digits (data.py): attributes measured on synthetic strokes, and captions that say what they measure."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ddpm_jax import data

SIZE = 28


def bar(width: int, length: int = 16, vertical: bool = False) -> np.ndarray:
    """A white width × length bar centred on a black 28×28 image, in [-1, 1]."""
    image = -np.ones((SIZE, SIZE), np.float32)
    r0, c0 = (SIZE - width) // 2, (SIZE - length) // 2
    image[r0 : r0 + width, c0 : c0 + length] = 1.0
    return image.T.copy() if vertical else image


def sheared_bar(shear: float, width: int = 3, top: int = 4, bottom: int = 24, centre: int = 13) -> np.ndarray:
    """A vertical stroke whose column moves by ``shear`` pixels per row upwards (> 0 leans right)."""
    image = -np.ones((SIZE, SIZE), np.float32)
    middle = (top + bottom - 1) / 2
    for row in range(top, bottom):
        col = int(round(centre + shear * (middle - row)))
        image[row, col - 1 : col - 1 + width] = 1.0
    return image


def brute_force_width(mask: np.ndarray) -> np.ndarray:
    """The local stroke width by walking from every ink pixel in the four directions (the reference)."""
    h, w = mask.shape
    out = np.zeros((h, w))
    for r in range(h):
        for c in range(w):
            if not mask[r, c]:
                continue
            runs = []
            for dr, dc, unit in ((0, 1, 1.0), (1, 0, 1.0), (1, 1, np.sqrt(2)), (1, -1, np.sqrt(2))):
                n = 1
                for sign in (1, -1):
                    rr, cc = r + sign * dr, c + sign * dc
                    while 0 <= rr < h and 0 <= cc < w and mask[rr, cc]:
                        n += 1
                        rr, cc = rr + sign * dr, cc + sign * dc
                runs.append(n * unit)
            out[r, c] = min(runs)
    return out


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 2, 3, 5])
def test_bar_width_is_exact_across_the_bar(width):
    images = np.stack([bar(width), bar(width, vertical=True)])
    widths = data.stroke_width_map(images)
    middle = widths[0, :, 10:18]                             # away from the bar's ends
    np.testing.assert_allclose(middle[middle > 0], width)
    np.testing.assert_allclose(widths[1], widths[0].T)       # orientation does not matter
    # Near the ends a diagonal run is cut short, so the mean is a little below the width.
    thickness = data.stroke_thickness(images)
    assert thickness[0] == pytest.approx(thickness[1], abs=1e-6)
    assert width - 0.55 <= thickness[0] <= width


def test_thick_bar_is_thick_and_thin_bar_thin():
    thin, thick = data.stroke_thickness(np.stack([bar(2), bar(5)]))
    assert 1.8 < thin < 2.0 and 4.4 < thick < 5.0
    words = [data.attribute_words(data.measure_digits(np.stack([bar(w, length=20, vertical=True)])), 0)
             for w in (2, 5)]
    assert words[0]["thickness"] == "thin" and words[1]["thickness"] == "thick"


def test_width_map_matches_a_brute_force_walk():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 12, 12)) < 0.55
    widths = data.stroke_width_map(np.where(masks, 1.0, -1.0))
    for mask, got in zip(masks, widths, strict=True):
        np.testing.assert_allclose(got, brute_force_width(mask), rtol=1e-6)


@pytest.mark.parametrize("shear", [-0.4, 0.0, 0.3, 0.5])
def test_slant_is_the_shear_of_a_sheared_bar(shear):
    attributes = data.measure_digits(sheared_bar(shear)[None])
    assert abs(attributes.slant[0] - shear) < 0.02            # rounding columns to pixels
    assert attributes.height[0] == 20                          # rows 4..23
    expected = {-0.4: "slanted left", 0.0: "upright", 0.3: "slanted right", 0.5: "slanted right"}[shear]
    assert data.attribute_words(attributes, 0)["slant"] == expected


def test_size_and_position_of_a_block():
    image = -np.ones((SIZE, SIZE), np.float32)
    image[2:12, 3:9] = 1.0                                       # 10 rows high, top left
    a = data.measure_digits(image[None, :, :, None])           # [N, H, W, 1] works too
    assert a.height[0] == 10 and a.side == SIZE
    np.testing.assert_allclose([a.offset_x[0], a.offset_y[0]], [5.5 - 13.5, 13.5 - 6.5])
    words = data.attribute_words(a, 0)
    assert words["size"] == "small" and words["position"] == "top left"
    centred = data.measure_digits(bar(3, length=20, vertical=True)[None])
    assert data.attribute_words(centred, 0)["position"] == "centre"
    assert data.attribute_words(centred, 0)["size"] == "large"


def test_measurements_scale_with_the_image():
    """Words are judged in 28-pixel units: the same digit at 56×56 earns the same words."""
    image = sheared_bar(0.3)
    big = np.kron(image, np.ones((2, 2), np.float32))          # 56×56
    small, large = data.measure_digits(image[None]), data.measure_digits(big[None])
    assert large.height[0] == 2 * small.height[0]
    assert data.attribute_words(small, 0) == data.attribute_words(large, 0)


def test_empty_image_and_bad_shapes():
    a = data.measure_digits(-np.ones((1, 8, 8), np.float32))
    assert a.height[0] == 0 and a.thickness[0] == 0 and np.isfinite(a.slant[0])
    with pytest.raises(ValueError, match=r"grayscale images \[N, H, W, 1\]"):
        data.measure_digits(np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="expected images"):
        data.measure_digits(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="layout must be 'random' or 'original'"):
        data.load_captioned_digits(layout="shuffled")


# ------------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------------

NUMBER_WORDS = set(data.DIGIT_NAMES) | {str(d) for d in range(10)}


@pytest.fixture(scope="module")
def digits():
    return data.load_captioned_digits(image_size=16, seed=0)


def test_captioned_digits_shapes_and_determinism(digits):
    assert digits.images.shape == (5000, 16, 16, 1) and digits.images.dtype == np.float32
    assert digits.images.min() >= -1 and digits.images.max() <= 1
    assert len(digits.captions) == len(digits.labels) == 5000
    assert len(set(digits.captions)) > 500                     # varied templates and attributes
    idx = np.arange(0, 5000, 50)
    first, _ = data.caption_digits(digits.images[idx], digits.labels[idx], seed=3)
    again, _ = data.caption_digits(digits.images[idx], digits.labels[idx], seed=3)
    assert first == again
    small = data.load_captioned_digits(image_size=16, seed=0, num_examples=40)
    assert small.captions == digits.captions[:40]               # caption i is seeded by (seed, i)
    np.testing.assert_array_equal(small.images, digits.images[:40])
    other = data.load_captioned_digits(image_size=16, seed=1, num_examples=40)
    assert other.captions != small.captions


def test_each_caption_names_its_digit_once(digits):
    for label, caption in zip(digits.labels, digits.captions, strict=True):
        named = [w for w in re.findall(r"[a-z0-9]+", caption) if w in NUMBER_WORDS]
        assert named in ([data.DIGIT_NAMES[label]], [str(label)]), caption


def test_captions_only_say_what_was_measured(digits):
    a = digits.attributes
    said = {"thin": 0, "thick": 0, "small": 0, "large": 0, "upright": 0, "left": 0}
    for i, caption in enumerate(digits.captions):
        words = data.attribute_words(a, i)
        for word in ("thin", "thick"):
            if re.search(rf"\b{word}\b", caption):
                assert words.get("thickness") == word, caption
                said[word] += 1
        for word in ("small", "large"):
            if re.search(rf"\b{word}\b", caption):
                assert words.get("size") == word, caption
                said[word] += 1
        if "upright" in caption:
            assert words.get("slant") == "upright", caption
            said["upright"] += 1
        if "slanted" in caption:
            assert words.get("slant", "").startswith("slanted"), caption
        if "slanted to the left" in caption:
            assert words["slant"] == "slanted left", caption
        for where in ("left", "right"):
            if re.search(rf"(in|on) the (top |bottom )?{where}\b", caption):
                assert words["position"].endswith(where), caption
                said["left"] += where == "left"
    assert min(said.values()) > 100, said                      # every word is used, and often
    assert sum("handwritten digit" in c for c in digits.captions) > 500  # the zero-shot prompt's form


def test_original_layout_keeps_mnist_framing():
    original = data.load_captioned_digits(image_size=28, seed=0, layout="original", num_examples=50)
    digits, labels = data._mnist_digits()                      # what load_dataset reads, parsed once
    np.testing.assert_array_equal(original.images, digits[:50, :, :, None] / np.float32(127.5) - 1)
    np.testing.assert_array_equal(original.labels, labels[:50])
    assert np.median(original.attributes.height) == 20          # MNIST fits digits in a 20×20 box
