"""The benchmark's code path on a tiny U-Net, one timed call each, so the script cannot rot.

Nothing here asserts a speed: timings on a shared CI machine mean nothing. It checks that every
measurement runs and is a positive finite number, that the diffusers model built from our config
has exactly our parameter count, and that the table and JSON come out.
"""

import importlib.util
import json
import math
import pathlib
import sys

import pytest

# compile-bound (tests/conftest.py); bench_gpu's train_jax and sd_jax_float32 parts compile the very programs of
# bench_unet's and bench_stable_diffusion's tiny runs (same configs, batches and steps): the shared cache loads them
pytestmark = [pytest.mark.fast_compile, pytest.mark.usefixtures("shared_compilation_cache")]


def _load_benchmark(name: str):
    """benchmarks/<name>.py as a module (works without the repo on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


bench_unet = _load_benchmark("bench_unet")


def _positive(value):
    return value is not None and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_benchmark_runs_on_a_tiny_config(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench_unet.main(["--config", "tiny", "--iters", "1", "--ddim-steps", "2", "--json", str(out)])

    jax_row = report["rows"][0]
    assert jax_row["framework"] == "jax" and jax_row["config"] == "tiny"
    for key in ("compile_s", "train_steps_per_s", "train_images_per_s", "forward_images_per_s", "ddim_images_per_s"):
        assert _positive(jax_row[key]), (key, jax_row[key])
    if bench_unet.torch_available():
        torch_row = report["rows"][1]
        assert torch_row["framework"] == "diffusers"
        assert torch_row["params"] == jax_row["params"]  # the identical network
        assert _positive(torch_row["train_steps_per_s"]) and _positive(torch_row["ddim_images_per_s"])
        assert set(report["ratios"][0]) >= {"train_steps_per_s", "forward_images_per_s", "ddim_images_per_s"}

    assert json.loads(out.read_text())["rows"][0]["params"] == jax_row["params"]
    printed = capsys.readouterr().out
    assert "train steps/s" in printed and "tiny" in printed


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_diffusers_model_from_our_config_has_our_parameter_count(name):
    """diffusers_kwargs builds the same network (checked by parameter count, without timing it)."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp

    from ddpm_jax.models.unet import UNet

    cfg = bench_unet.CONFIGS[name]()
    shapes = jax.eval_shape(UNet(cfg.unet).init, jax.random.key(0),
                            jnp.zeros((1, cfg.height, cfg.width, cfg.channels)), jnp.zeros((1,), jnp.int32))
    ours = bench_unet.count_params(shapes["params"])
    theirs = sum(p.numel() for p in diffusers.UNet2DModel(**bench_unet.diffusers_kwargs(cfg.unet)).parameters())
    assert ours == theirs
    if name == "cifar10":
        assert ours == 35_746_307  # Ho et al.'s 35.7M


def test_layer_profile_runs_on_a_tiny_shape():
    """benchmarks/bench_layers.py (the conv/GroupNorm profile) on one tiny shape, one iteration."""
    bench_layers = _load_benchmark("bench_layers")
    rows = bench_layers.main(["--shapes", "2x8x8x8", "--groups", "4", "--iters", "1"])
    assert {row["op"] for row in rows} == {"conv_fwd", "conv_fwd_bwd", "group_norm", "group_norm_fwd_bwd",
                                          "group_norm_flax", "group_norm_flax_fwd_bwd"}
    assert all(_positive(row["jax_ms"]) for row in rows)
    with pytest.raises(ValueError, match="BxHxWxC"):
        bench_layers.parse_shape("8x8")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny", "tiny-sdxl"])
def test_stable_diffusion_benchmark_runs_on_a_tiny_config(tmp_path, config):
    """benchmarks/bench_stable_diffusion.py with --config tiny (SD v1's layout, with the whole txt2img) and tiny-sdxl
    (SDXL's: added "text_time" conditioning, no attention at the first level; ours and diffusers' each in a process of
    its own): every timing positive, the same U-Net as diffusers' built from ``unet_config_to_diffusers``."""
    bench_sd = _load_benchmark("bench_stable_diffusion")
    out = tmp_path / "sd.json"
    # tiny: both frameworks in this process; tiny-sdxl: each in its own process (the default)
    report = bench_sd.main(["--config", config, "--iters", "1", "--steps", "2", "--json", str(out)]
                           + (["--in-process"] if config == "tiny" else []))
    ours = report["rows"][0]
    timings = ("unet_step_s", "unet_compile_s", "vae_decode_s", "peak_rss_gb")
    if config == "tiny":
        timings += ("txt2img_s", "txt2img_first_call_s")
        assert ours["txt2img_recompiled"] is False  # a new prompt and guidance scale reuse the program
    for key in timings:
        assert _positive(ours[key]), (key, ours[key])
    if bench_sd.torch_available():
        theirs = report["rows"][1]
        assert theirs["unet_params"] == ours["unet_params"] and _positive(theirs["unet_step_s"])
    assert json.loads(out.read_text())["rows"][0]["config"] == config


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path, capsys):
    """benchmarks/bench_gpu.py --dry-run: every part's code on tiny configs (CPU, in this process), the table and the
    JSON. sd_jax_bfloat16 is sd_jax_float32's function with another dtype (bf16 modules: test_mixed_precision.py)."""
    bench_gpu = _load_benchmark("bench_gpu")
    out, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    parts = "train_jax,train_diffusers,ddpm_sample,sd_jax_float32,sd_diffusers"
    report = bench_gpu.main(["--dry-run", "--in-process", "--parts", parts, "--json", str(out), "--markdown", str(md)])
    rows = {(r["part"], r["dtype"], r["what"].split(",")[0]): r for r in report["rows"]}
    assert all(r["what"] != "FAILED" for r in report["rows"]), [r for r in report["rows"] if r["what"] == "FAILED"]
    assert _positive(rows["train_jax", "float32", "train step"]["value"])
    assert _positive(rows["train_jax", "float32", "train step"]["compile_s"])
    assert _positive(rows["ddpm_sample", "float32", "2 images × 25 ancestral steps"]["value"])
    assert _positive(rows["sd_jax_float32", "float32", "txt2img 16²"]["value"])
    if bench_unet.torch_available():  # diffusers' UNet2DModel (f32, autocast bf16) and its pipeline on our weights
        assert _positive(rows["train_diffusers", "bfloat16", "train step"]["value"])
        assert _positive(rows["sd_diffusers", "float32", "txt2img 16²"]["value"])
        assert _positive(rows["sd_diffusers", "bfloat16", "txt2img 16²"]["value"])
    assert json.loads(out.read_text())["rows"][0]["part"] == "train_jax"
    assert "| train_jax | jax | float32 | train step, batch 2 |" in md.read_text()
    assert "| part | framework |" in capsys.readouterr().out


def test_gpu_benchmark_guards_each_part(tmp_path):
    """A part that fails or runs past its limit is a FAILED row (the rest of the run goes on)."""
    bench_gpu = _load_benchmark("bench_gpu")
    no_weights = bench_gpu.run_in_process("sd_diffusers", bench_gpu.DRY, tmp_path, 10)
    assert no_weights[0]["what"] == "FAILED" and "no weights from sd_jax_float32" in no_weights[0]["note"]
    killed = bench_gpu.run_in_subprocess("train_jax", True, tmp_path, 0.5)  # a subprocess cannot import jax in 0.5 s
    assert killed[0]["what"] == "FAILED" and killed[0]["note"] == "timed out after 0.5 s (killed)"
    with pytest.raises(SystemExit, match="unknown parts \\['nope'\\]"):
        bench_gpu.main(["--dry-run", "--parts", "nope"])


def test_data_memory_benchmark_runs_on_tiny_data(tmp_path):
    """benchmarks/bench_data.py (old vs new loader, peak RSS, the asserted bound) on 300 mock CIFAR records and
    8 generated 256² pictures, 2 batches: every path runs, both read the same batches, the bound holds."""
    pytest.importorskip("tensorflow_datasets")
    bench_data = _load_benchmark("bench_data")
    report = bench_data.main(["--cifar-n", "300", "--folder-n", "8", "--folder", str(tmp_path / "pictures"),
                              "--batches", "2", "--batch", "4", "--json", str(tmp_path / "data.json")])
    rows = report["rows"]
    assert [(r["mode"], r["n"]) for r in rows] == [("old", 300), ("new", 300), ("old", 8), ("new", 8)]
    assert rows[3]["shape"] == [256, 256, 3] and all(_positive(r["s_per_batch"]) for r in rows)
    assert json.loads((tmp_path / "data.json").read_text())["rows"] == rows


def test_memory_benchmark_reads_xla_buffer_sizes_on_a_tiny_unet():
    """benchmarks/bench_memory.py's measurement (the compiled loss gradient's memory analysis) on a tiny U-Net."""
    bench_memory = _load_benchmark("bench_memory")
    row = bench_memory.measure("tiny", "blocks", batch=3, iters=1)
    assert row["remat"] == "blocks" and row["batch"] == 3
    assert all(_positive(row[k]) for k in ("temp_mb", "argument_mb", "output_mb", "compile_s", "step_s"))
