"""Data parallelism: 8 simulated CPU devices and two real processes give the single-device result.

Each test runs in a subprocess: the device count (XLA_FLAGS) and jax.distributed.initialize must be
set before JAX starts, and the other tests run single-device in the pytest process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from _training_fixtures import subprocess_env

# Compile-bound: a one-level U-Net's train step compiled for 1, 2 and 8 devices, run twice. Without XLA's backend
# optimisation (tests/conftest.py; the workers inherit JAX_DISABLE_MOST_OPTIMIZATIONS) the 8-device worker took
# 44 s of CPU instead of 88 s (same equalities: sharded vs single 6e-8, pmap vs sharded 0).
pytestmark = pytest.mark.fast_compile

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_training_worker.py")
TIMEOUT = 300


def _run(args, env):
    return subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _check(proc):
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out[-4000:]


def test_sharded_jit_and_pmap_steps_equal_the_single_device_step(tmp_path):
    out = tmp_path / "result.json"
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    _check(_run(["devices8", str(out)], env))
    result = json.loads(out.read_text())
    assert result["changed"] > 1e-4                   # two steps did move the parameters
    assert result["sharded_vs_single"] <= 1e-5        # jit over 8 devices == jit on 1 device
    assert result["pmap_vs_sharded"] <= 1e-5          # pmap + lax.pmean == sharded jit
    assert result["batch_error"] and "not divisible by the number of devices (8)" in result["batch_error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_feeding_half_the_batch_each_equal_one_process(tmp_path):
    port = _free_port()
    two_devices = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    hosts = [_run(["multihost", str(i), "2", str(port), str(tmp_path / f"host{i}.npz")], two_devices)
             for i in range(2)]
    for proc in hosts:
        _check(proc)
    # the one-process reference runs after the two hosts, so that it does not slow either of them down while
    # they wait on each other in their collectives (gloo gives up on a peer after 30 s)
    _check(_run(["multihost", "0", "1", "0", str(tmp_path / "single.npz")], subprocess_env()))
    single, host0, host1 = (np.load(tmp_path / f) for f in ("single.npz", "host0.npz", "host1.npz"))
    assert int(single["devices"]) == 1 and int(host0["devices"]) == 4  # 2 processes × 2 devices
    names = [k for k in single.files if k != "devices"]
    assert names
    for name in names:
        np.testing.assert_allclose(host0[name], single[name], atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(host1[name], host0[name], err_msg=name)
