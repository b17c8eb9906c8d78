"""The CLI's persistent compilation cache (ddpm_jax/compile_cache.py): where it goes, and that it is written
there, and not at all when it is off."""

from __future__ import annotations

import os
import subprocess
import sys

import jax

from _training_fixtures import subprocess_env
from ddpm_jax import cli, compile_cache

# A `ddpm-jax sample` of a fake 8×8 model (ε̂ = 0, no checkpoint) in a fresh process, as test_cli.py fakes it.
SAMPLE_SCRIPT = """
import sys
from ddpm_jax import checkpoints, cli, diffusion_model
from ddpm_jax import config as config_lib
workdir = sys.argv[1]
c = config_lib.apply_overrides(config_lib.load_config("experiments/mnist.py"), [
    "data.image_size=8", "model.sample_size=8", "diffusion.num_timesteps=40", "sample.steps=2"])
config_lib.save_config(c, workdir + "/" + config_lib.CONFIG_FILENAME)
checkpoints.load_params = lambda workdir, ema=True, step=None: {}
diffusion_model.DiffusionModel.unconditional_eps_fn = lambda self, params=None: lambda x_t, t: 0.0 * x_t
sys.exit(cli.main(["sample", "--workdir", workdir, "--num", "2", "--out", workdir + "/s.png", *sys.argv[2:]]))
"""


def test_cache_dir_follows_the_flag_the_variable_and_xdg(tmp_path):
    home = os.path.expanduser("~")
    assert compile_cache.cache_dir(environ={}) == os.path.join(home, ".cache", "ddpm_jax", "jax_cache")
    assert compile_cache.cache_dir(environ={"XDG_CACHE_HOME": "/xdg"}) == "/xdg/ddpm_jax/jax_cache"
    assert compile_cache.cache_dir(environ={"DDPM_JAX_COMPILE_CACHE": str(tmp_path)}) == str(tmp_path)
    assert compile_cache.cache_dir(environ={"DDPM_JAX_COMPILE_CACHE": "OFF"}) is None
    assert compile_cache.cache_dir(False, environ={"DDPM_JAX_COMPILE_CACHE": str(tmp_path)}) is None


def test_no_compile_cache_writes_nothing_and_leaves_jax_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPM_JAX_COMPILE_CACHE", str(tmp_path / "cache"))
    before = jax.config.jax_compilation_cache_dir
    status = None
    try:
        cli.main(["sample", "--workdir", str(tmp_path / "missing"), "--no-compile-cache"])
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2 and "missing" in capsys.readouterr().err          # failed on the workdir, after the cache step
    assert not (tmp_path / "cache").exists() and jax.config.jax_compilation_cache_dir == before


def test_cli_writes_compiled_programs_where_told(tmp_path):
    cache = tmp_path / "cache"
    env = subprocess_env(DDPM_JAX_COMPILE_CACHE=str(cache))
    del env["JAX_COMPILATION_CACHE_DIR"]                                   # the tests' shared cache: not here
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SAMPLE_SCRIPT, str(tmp_path)], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "s.png").exists()
    assert len(os.listdir(cache)) >= 1                                     # the sampler's program, at least
