"""Kill training with SIGKILL mid-run, re-run the same command: it resumes and ends where an
uninterrupted run of the same length ends (same data order, same random stream), bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from _training_fixtures import sigkill_when, subprocess_env
from ddpm_jax import checkpoints

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_training_worker.py")
NUM_STEPS = 30  # checkpoints every 5 steps (see _training_worker.run_train)


def _command(workdir):
    return [sys.executable, WORKER, "train", str(workdir), str(NUM_STEPS), "0.1"]


def _run_to_end(workdir):
    out = subprocess.run(_command(workdir), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


def _complete_checkpoints(workdir):
    path = checkpoints.checkpoint_dir(workdir)
    return [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []


def test_sigkill_then_rerun_resumes_to_the_uninterrupted_result(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run_to_end(straight)  # also fills the compilation cache for the runs below

    sigkill_when(_command(resumed), lambda: _complete_checkpoints(resumed), timeout=240)
    killed_at = checkpoints.latest_step(resumed)
    assert killed_at is not None and killed_at < NUM_STEPS, killed_at  # it really stopped mid-run

    _run_to_end(resumed)  # the same command again
    assert checkpoints.latest_step(resumed) == NUM_STEPS
    for ema in (False, True):
        a, b = checkpoints.load_params(straight, ema=ema), checkpoints.load_params(resumed, ema=ema)
        jax.tree.map(np.testing.assert_array_equal, a, b)
    # Same seed, same parameters → the same samples (the grid written at the end of both runs).
    grid = f"samples/step_{NUM_STEPS:07d}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(straight / grid)), np.asarray(Image.open(resumed / grid)))
    # metrics.jsonl has each logged step once, in order, despite the crash.
    steps = [json.loads(line)["step"] for line in open(resumed / "metrics.jsonl")]
    assert steps == list(range(5, NUM_STEPS + 1, 5))
