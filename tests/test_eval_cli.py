"""``ddpm-jax eval`` and ``ddpm-jax sample --pretrained`` (ddpm_jax/cli.py → evaluation/report.py, pipelines/generate.py).

Workdir runs use the tiny 8×8 MNIST config of tests/test_cli.py with a fake model (ε̂ = 0x) behind
the checkpoint, and an (untrained) judge in a temporary cache, so the whole evaluation
(samples, full-bound bits/dim, judge report, files) runs in seconds. The diffusers folders hold a tiny
random UNet2DModel and a DDPMScheduler; one reverse step of ours is compared with diffusers' own step.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _cli import run_cli
from ddpm_jax import checkpoints, diffusion_model
from ddpm_jax.pipelines import generate
from ddpm_jax import config as config_lib
from ddpm_jax.evaluation import judge as judge_lib
from ddpm_jax.evaluation.likelihood import dataset_bpd

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST = str(ROOT / "experiments" / "mnist.py")




@pytest.fixture(scope="module")
def judge_cache(tmp_path_factory):
    """A cache dir holding an untrained 8×8 judge (tests/test_judge.py tests the trained one; here the wiring)."""
    cache = tmp_path_factory.mktemp("judge_cache")
    params = judge_lib.JudgeCNN().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    judge_lib.save_judge(judge_lib.Judge(params=params, image_size=8, seed=0, test_accuracy=0.1),
                         judge_lib.cache_path(8, 0, cache))
    return cache


@pytest.fixture
def workdir(tmp_path, monkeypatch, judge_cache):
    c = config_lib.apply_overrides(config_lib.load_config(MNIST), [
        "data.image_size=8", "model.sample_size=8", "diffusion.num_timesteps=40", "sample.steps=4"])
    config_lib.save_config(c, tmp_path / config_lib.CONFIG_FILENAME)
    monkeypatch.setattr(checkpoints, "load_params", lambda workdir, ema=True, step=None: {})
    monkeypatch.setattr(diffusion_model.DiffusionModel, "unconditional_eps_fn",
                        lambda self, params=None: lambda x_t, t: 0.5 * x_t)
    monkeypatch.setenv(judge_lib.CACHE_ENV, str(judge_cache))
    return tmp_path


def test_eval_workdir_writes_bits_per_dim_judge_and_figures(workdir, capsys):
    status, out, _ = run_cli(["eval", "--workdir", str(workdir), "--num-samples", "70", "--bpd-examples", "10",
                              "--bpd-batch-size", "4", "--batch-size", "32"], capsys)
    assert status == 0
    result = json.loads((workdir / "eval.json").read_text())
    assert result["samples"] == {**result["samples"], "num": 70, "sampler": "ddim", "steps": 4, "eta": 1.0, "seed": 0}
    bpd = result["bits_per_dim"]
    assert bpd["num_examples"] == 10 and bpd["dataset"] == "mnist_bundled" and "judge test split" in bpd["split"]
    assert "not held out" in bpd["note"] and "all 40 terms" in bpd["protocol"]
    assert len(result["bits_per_dim_terms"]) == 40

    # The same number as likelihood.dataset_bpd on the same digits with the same key.
    _, (test_x, _) = judge_lib.split_digits(8, 0)
    images = test_x[np.random.default_rng(0).permutation(1000)[:10]]
    from ddpm_jax.schedules import get_schedule

    expected = dataset_bpd(lambda x, t: 0.5 * x, get_schedule("linear", 40), images, jax.random.key(0), 4)
    assert bpd["value"] == pytest.approx(expected.bpd, rel=1e-6)
    assert bpd["std_error"] == pytest.approx(expected.std_error, rel=1e-6) and bpd["std_error"] > 0

    report = result["judge"]
    assert report["num_samples"] == 70 and sum(report["class_histogram"]) == 70
    assert "a proxy, NOT FID" in report["protocol"] and report["classifier_fid"] > 0
    assert "predicted" not in report and "classifier_fid_real_baseline" in report
    for name in ("eval_samples.png", "eval_vlb_terms.png"):
        assert (workdir / name).read_bytes()[:4] == b"\x89PNG"
    assert "bits/dim:" in out and "classifier FID" in out and "a proxy, NOT FID" in out and "eval.json" in out


def test_eval_flags_skip_parts_and_outdir(workdir, tmp_path, capsys):
    outdir = tmp_path / "elsewhere"
    status, out, _ = run_cli(["eval", "--workdir", str(workdir), "--num-samples", "4", "--bpd-examples", "0",
                              "--no-judge", "--sampler", "ddpm", "--outdir", str(outdir)], capsys)
    assert status == 0
    result = json.loads((outdir / "eval.json").read_text())
    assert "bits_per_dim" not in result and "judge" not in result
    assert result["samples"]["sampler"] == "ddpm" and result["samples"]["steps"] == 40
    assert not (workdir / "eval.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--workdir", "{tmp}/nope"], "does not exist"),
    (["--workdir", "{work}", "--num-samples", "1"], "--num-samples must be >= 2"),
    (["--workdir", "{work}", "--bpd-examples", "-1"], "--bpd-examples >= 0"),
    (["--workdir", "{work}", "--num-samples", "20", "--bpd-examples", "0", "--no-judge", "--inception",
      "{tmp}/missing.pth", "--reference", "{tmp}/stats.npz"], "Inception weights not found at"),
    (["--pretrained", "{tmp}"], "has no config.json"),
])
def test_eval_bad_input_exits_2_with_one_line(workdir, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path / "x", work=workdir) for a in args]
    (tmp_path / "x").mkdir()
    status, _, err = run_cli(["eval", *args], capsys)
    assert status == 2 and message in err and err.count("\n") == 1 and err.startswith("ddpm-jax: error: "), err


def test_eval_fid_wiring_with_a_stand_in_inception(workdir, monkeypatch, capsys):
    """--inception/--reference reach compute_fid (the network itself is tested in test_inception/test_fid)."""
    from ddpm_jax.evaluation import fid as fid_lib
    from ddpm_jax.evaluation import inception as inception_lib

    seen = {}
    monkeypatch.setattr(inception_lib, "load_inception", lambda path: seen.setdefault("path", path) and "net")

    def fake_compute_fid(samples, reference, inception=None, **kw):
        seen.update(samples=samples.shape, reference=reference.shape, inception=inception, **kw)
        protocol = fid_lib.FIDProtocol(metric="FID", num_samples=samples.shape[0], sample_shape=samples.shape[1:],
                                       weights="w", quantize=True, grayscale_to_rgb=True, features="pool3 (2048)",
                                       reference=kw["reference_name"], num_reference=reference.shape[0], splits=10)
        return {"fid": 12.5, "protocol": protocol, "is": 2.0, "is_std": 0.1}

    monkeypatch.setattr(fid_lib, "compute_fid", fake_compute_fid)
    status, out, _ = run_cli(["eval", "--workdir", str(workdir), "--num-samples", "20", "--bpd-examples", "0",
                              "--no-judge", "--inception", "weights.pth", "--reference", "mnist_bundled"], capsys)
    assert status == 0
    assert seen["path"] == "weights.pth" and seen["inception"] == "net"
    assert seen["samples"] == (20, 8, 8, 1) and seen["reference"] == (5000, 8, 8, 1)  # the dataset at the run's size
    assert seen["min_samples"] == 20 and seen["is_splits"] == 10
    result = json.loads((workdir / "eval.json").read_text())
    assert result["fid"]["value"] == 12.5 and "biased" in result["fid"]["note"]
    assert result["fid"]["protocol"]["reference"] == "mnist_bundled (5000 images)"
    assert result["inception_score"] == {"mean": 2.0, "std": 0.1, "splits": 10}
    assert "FID 12.500 (biased" in out and "Inception score 2.000" in out


def test_eval_needs_exactly_one_source(capsys):
    status, _, err = run_cli(["eval"], capsys)
    assert status == 2 and "one of the arguments --workdir --pretrained is required" in err
    status, _, err = run_cli(["eval", "--workdir", "a", "--pretrained", "b"], capsys)
    assert status == 2 and "not allowed with" in err


# ---- official checkpoints: diffusers UNet2DModel + DDPMScheduler folders ----------------------------------

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=8, attention_head_dim=8)


def _save_ddpm_folder(folder, variance_type="fixed_large", clip_sample=True, layout="root", T=20):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TINY_UNET).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * (p.std() if p.ndim > 1 else 0.1))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=0.001, beta_end=0.2,
                                        variance_type=variance_type, clip_sample=clip_sample)
    if layout == "root":  # google/ddpm-cifar10-32's layout
        unet.save_pretrained(folder, safe_serialization=True)
        scheduler.save_pretrained(folder)
    else:  # DDPMPipeline.save_pretrained: unet/ and scheduler/
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return unet, scheduler


@pytest.mark.parametrize("variance_type, clip_sample, layout", [
    ("fixed_large", True, "root"), ("fixed_small", False, "pipeline"), ("fixed_small_log", True, "root")])
def test_one_reverse_step_matches_diffusers_ddpm_scheduler(tmp_path, variance_type, clip_sample, layout):
    unet, scheduler = _save_ddpm_folder(tmp_path, variance_type, clip_sample, layout)
    model = generate.load_pretrained_ddpm(tmp_path)
    assert (model.image_size, model.channels, model.schedule.num_timesteps) == (8, 3, 20)
    assert model.variance == ("fixed_large" if variance_type == "fixed_large" else "fixed_small")
    assert model.clip_denoised is clip_sample and (model.sampler, model.steps) == ("ddpm", 20)
    np.testing.assert_allclose(model.schedule.betas, scheduler.betas.numpy(), rtol=1e-6)
    from ddpm_jax.diffusion import p_sample

    rng = np.random.default_rng(1)
    for t in (19, 1, 0):
        x_t = torch.from_numpy(rng.standard_normal((2, 3, 8, 8)).astype(np.float32) * 1.5)
        with torch.no_grad():
            eps = unet(x_t, t).sample
        expected = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample.numpy()
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t)).numpy()  # the noise step() drew
        nhwc = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))  # noqa: E731
        t_b = jnp.full((2,), t, jnp.int32)
        ours = p_sample(model.schedule, model.eps_fn(nhwc(x_t), t_b), nhwc(x_t), t_b, nhwc(z),
                        prediction=model.prediction, variance=model.variance, clip_denoised=model.clip_denoised)
        np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), expected, atol=2e-4, err_msg=f"t={t}")


def test_sample_pretrained_writes_grid_and_npz(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ddpm-tiny"
    _save_ddpm_folder(folder, layout="pipeline")
    monkeypatch.chdir(tmp_path)
    status, out, _ = run_cli(["sample", "--pretrained", str(folder), "--num", "3", "--npz", "--seed", "1"], capsys)
    assert status == 0
    assert out.split() == ["samples_ddpm-tiny.png", "samples_ddpm-tiny.npz"]
    images = np.load(tmp_path / "samples_ddpm-tiny.npz")["images"]
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    assert images.std() > 10  # not a blank grid
    ddim, _ = generate.sample_images(generate.load_pretrained_ddpm(str(folder)), 3, seed=1, sampler="ddim", steps=5,
                                     eta=0.0)
    assert ddim.shape == (3, 8, 8, 3) and np.all(np.abs(ddim) <= 1.0)


def test_eval_pretrained_bits_per_dim_on_a_folder_dataset(tmp_path, capsys, monkeypatch):
    from PIL import Image

    folder = tmp_path / "ddpm-tiny"
    _save_ddpm_folder(folder)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(5):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(pictures / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    status, out, _ = run_cli(["eval", "--pretrained", str(folder), "--num-samples", "4", "--bpd-examples", "5",
                              "--bpd-batch-size", "8", "--data", f"folder:{pictures}", "--sampler", "ddim",
                              "--steps", "4"], capsys)
    assert status == 0, out
    result = json.loads((tmp_path / "eval_ddpm-tiny" / "eval.json").read_text())
    assert result["bits_per_dim"]["num_examples"] == 5 and result["bits_per_dim"]["value"] > 0
    assert "judge" not in result  # RGB: no MNIST judge
    assert result["model"].startswith("pretrained")


@pytest.mark.parametrize("change, message", [
    ({"variance_type": "learned_range"}, "variance_type='learned_range'"),
    ({"thresholding": True}, "thresholding=true"),
    ({"clip_sample_range": 2.0}, "clip_sample_range=2.0"),
])
def test_unsupported_scheduler_options_are_named(tmp_path, change, message):
    _save_ddpm_folder(tmp_path)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        generate.load_pretrained_ddpm(tmp_path)


def test_missing_scheduler_config_is_named(tmp_path):
    _save_ddpm_folder(tmp_path)
    (tmp_path / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no scheduler_config.json"):
        generate.load_pretrained_ddpm(tmp_path)


_SHARDED_SAMPLING = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from ddpm_jax import diffusion_model
from ddpm_jax.models.unet import UNet, UNetConfig
from ddpm_jax.pipelines import generate
from ddpm_jax.schedules import get_schedule

cfg = UNetConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                 down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), add_attention=False,
                 norm_num_groups=4)
unet = UNet(cfg)
params = unet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))["params"]
model = diffusion_model.DiffusionModel(unet=unet, params=params, schedule=get_schedule("linear", 30), x0_shape=(8, 8, 1),
                                       sampler="ddim", steps=5, eta=1.0)
calls = []
real_jit = jax.jit
def spy(fun, **kw):
    calls.append(str(kw.get("out_shardings")))
    return real_jit(fun, **kw)
jax.jit = spy
eight, _ = generate.sample_images(model, 20, batch_size=16)   # chunks of 16 over 8 devices (the last one trimmed)
jax.jit = real_jit
one = np.concatenate([np.asarray(real_jit(lambda p, k: __import__("ddpm_jax").samplers.ddim_sample(
    model.unconditional_eps_fn(p), model.schedule, (16, 8, 8, 1), k, num_steps=5, eta=1.0))(
    model.params, jax.random.fold_in(jax.random.key(0), i))) for i in range(2)])[:20]
json.dump({"devices": jax.device_count(), "diff": float(np.max(np.abs(eight - one))), "shape": list(eight.shape),
           "shardings": calls}, open(sys.argv[1], "w"))
"""


def test_sampling_is_split_over_8_devices_and_matches_one_device(tmp_path):
    import subprocess
    import sys

    from _training_fixtures import subprocess_env

    out = tmp_path / "r.json"
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SAMPLING, str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["devices"] == 8 and r["shape"] == [20, 8, 8, 1]
    assert any("spec=P('data',)" in s for s in r["shardings"]), r["shardings"]  # the chain's output is sharded
    # the same chain, partitioned over 8 devices or not: only float32 rounding differs (measured 1.1e-5 after the
    # 5 DDIM steps, η = 1, images in [−1, 1])
    assert r["diff"] <= 2e-5
