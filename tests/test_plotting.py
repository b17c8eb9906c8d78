"""Tests for ddpm_jax.plotting: each figure is written, with the expected size and pixels."""

import json

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import plotting


def test_save_image_grid_grayscale_and_rgb(tmp_path):
    gray = np.linspace(-1, 1, 6 * 8 * 8).reshape(6, 8, 8, 1)
    path = plotting.save_image_grid(gray, tmp_path / "g.png", nrow=3, min_tile=16)
    with Image.open(path) as im:
        assert im.mode == "L"
        # 3 x 2 tiles of 8 px with 2 px padding, enlarged 2x
        assert im.size == (2 * (3 * 10 + 2), 2 * (2 * 10 + 2))
    rgb = np.full((4, 5, 5, 3), -1.0)
    rgb[..., 0] = 1.0  # pure red
    path = plotting.save_image_grid(rgb, tmp_path / "sub" / "c.png", min_tile=1)
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (2 * 7 + 2, 2 * 7 + 2)
        assert im.getpixel((3, 3)) == (255, 0, 0)


def test_to_uint8_maps_range_and_clips():
    np.testing.assert_array_equal(plotting.to_uint8([-2.0, -1.0, 0.0, 1.0, 3.0]), [0, 0, 128, 255, 255])


def test_save_trajectory_strip_picks_first_and_last_frames(tmp_path):
    traj = np.zeros((21, 3, 4, 4, 1))
    traj[0], traj[-1] = -1.0, 1.0  # x_T black, x_0 white
    path = plotting.save_trajectory_strip(traj, tmp_path / "t.png", num_frames=5, min_tile=1)
    with Image.open(path) as im:
        px = np.asarray(im)
    assert px.shape == (3 * 6 + 2, 5 * 6 + 2)  # 3 rows (samples) x 5 frames
    assert (px[2:6, 2:6] == 0).all() and (px[2:6, -6:-2] == 255).all()


def test_plot_loss_curve(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in range(30)))
    path = plotting.plot_loss_curve(metrics, tmp_path / "loss.png")
    assert path.stat().st_size > 1000
    np.testing.assert_allclose(plotting.smooth([2.0, 2.0, 2.0]), 2.0)  # bias-corrected EMA
    metrics.write_text(json.dumps({"step": 0, "lr": 1.0}) + "\n")
    with pytest.raises(ValueError, match="'loss'"):
        plotting.plot_loss_curve(metrics, tmp_path / "loss.png")


def test_forward_timesteps_are_the_papers_round_t():
    """The default columns of plot_forward_process: paper's t = 1, 50, 100, ... (indices t − 1), as notebook 01's section 2."""
    assert plotting.forward_timesteps(1000) == [0, 49, 99, 199, 299, 499, 699, 999]
    assert plotting.forward_timesteps(100) == [0, 4, 9, 19, 29, 49, 69, 99]


def test_plot_forward_process(tmp_path):
    from ddpm_jax import schedules

    x0 = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    schedule = schedules.get_schedule("linear", 100)
    path = plotting.plot_forward_process(x0, schedule, tmp_path / "fwd.png", timesteps=(0, 50, 99))
    with Image.open(path) as im:
        assert im.size[0] > 300


LIBRARY_FIGURES = """
import json, pathlib, sys
import numpy as np
from ddpm_jax import plotting, schedules
from ddpm_jax.evaluation import conditional, judge, likelihood
from ddpm_jax.pipelines import cross_attention
from ddpm_jax.training import autoencoder, clip
out = pathlib.Path(sys.argv[1])
(out / "m.jsonl").write_text("".join(json.dumps(dict(step=i, loss=1.0 / (i + 1))) + "\\n" for i in range(5)))
images = np.zeros((2, 8, 8, 1))
paths = [
    plotting.plot_loss_curve(out / "m.jsonl", out / "loss.png"),
    plotting.plot_forward_process(images, schedules.get_schedule("linear", 100), out / "forward.png"),
    likelihood.plot_vlb_terms(np.ones(10), out / "vlb.png"),
    judge.save_labelled_grid(images, np.array([3, 4]), out / "judged.png"),
    conditional.plot_guidance_sweep(dict(kind="class", per_class=1, rows=[dict(guidance=0.0, accuracy=0.5,
                                    classifier_fid=9.0)]), out / "sweep.png"),
    autoencoder.save_latent_scatter(np.zeros((4, 2)), np.arange(4), out / "scatter.png"),
    clip.plot_similarity_matrix(images, ["a", "b"], np.eye(2), out / "similarity.png"),
    cross_attention.save_attention_overlays(images, np.ones((2, 2, 2, 1)), ["a"], out / "attention.png"),
]
assert all(p.is_file() for p in paths), paths
print("pyplot" if "matplotlib.pyplot" in sys.modules else "no pyplot", __import__("matplotlib").get_backend())
"""


def test_library_figures_never_touch_pyplot_or_the_backend(tmp_path):
    """Every library figure is a ``matplotlib.figure.Figure`` outside pyplot (issue 14, item 1): drawing and
    saving one neither imports pyplot nor switches the backend, so a notebook's inline backend keeps showing
    its own figures."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    out = subprocess.run([sys.executable, "-c", LIBRARY_FIGURES, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["no", "pyplot", "module://matplotlib_inline.backend_inline"], out.stdout
