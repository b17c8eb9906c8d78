"""png_metadata: a generated image's parameters in its PNG text chunks, read back exactly; A1111's format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import png_metadata
from ddpm_jax.png_metadata import Generation


def _generation(**fields):
    return Generation(**{**dict(prompt="a café, 猫", seed=7, steps=30, guidance_scale=7.5, scheduler="dpmsolver++",
                                height=64, width=48, negative_prompt="blurry", model="/m/sd-v1-5",
                                loras=[("/l/style.safetensors", 0.8)]), **fields})


def test_round_trip_every_field_and_the_pixels(tmp_path):
    g = _generation(mode="img2img", image="in.png", strength=0.6, guidance_rescale=0.7)
    image = np.linspace(-1, 1, 64 * 48 * 3, dtype=np.float32).reshape(64, 48, 3)
    path = png_metadata.save_png(image, tmp_path / "sub" / "x.png", g)
    assert png_metadata.read_generation(path) == g
    with Image.open(path) as im:
        text, pixels = im.text, np.asarray(im)
    assert pixels.shape == (64, 48, 3) and pixels[0, 0, 0] == 0 and pixels[-1, -1, -1] == 255
    assert text["prompt"] == "a café, 猫" and text["seed"] == "7" and text["strength"] == "0.6"
    assert json.loads(text["loras"]) == [["/l/style.safetensors", 0.8]]
    assert "refiner" not in text  # unset fields are left out


def test_a1111_parameters_text():
    assert _generation().a1111_parameters() == (
        "a café, 猫 <lora:style:0.8>\nNegative prompt: blurry\n"
        "Steps: 30, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 7, Size: 48x64, Model: sd-v1-5")


def test_bad_records_are_one_line_errors(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="holds no ddpm_jax generation record"):
        png_metadata.read_generation(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="not an image"):
        png_metadata.read_generation(tmp_path / "text.png")
    with pytest.raises(FileNotFoundError, match="no such file"):
        png_metadata.read_generation(tmp_path / "missing.png")
    record = json.loads(_generation().text_chunks()["ddpm_jax"])
    with pytest.raises(ValueError, match="unknown fields colour"):
        Generation.from_json(json.dumps({**record, "colour": 1}))
    with pytest.raises(ValueError, match="not a ddpm_jax.generation/1 record"):
        Generation.from_json(json.dumps({**record, "format": "other/9"}))
    with pytest.raises(ValueError, match="positive integer"):
        png_metadata.per_image(["a"], 0)
    assert png_metadata.per_image(["a", "b"], 2) == ["a", "a", "b", "b"]
