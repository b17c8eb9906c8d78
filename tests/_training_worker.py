"""Subprocess worker for the training tests (run as a script; not a test file).

    python tests/_training_worker.py train WORKDIR NUM_STEPS [SLEEP_PER_STEP]
    python tests/_training_worker.py gan CONFIG.py WORKDIR SLEEP_PER_STEP     (the GAN trainer, slowed down)
    python tests/_training_worker.py devices8 OUT.json          (needs 8 host devices in XLA_FLAGS)
    python tests/_training_worker.py multihost PROCESS_ID NUM_PROCESSES PORT OUT.npz

Multi-device and multi-process runs must start in a fresh process: XLA_FLAGS and
jax.distributed.initialize act before the first JAX computation.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _training_fixtures import tiny_config, tiny_images  # noqa: E402


def run_train(workdir: str, num_steps: int, sleep: float = 0.0) -> None:
    """The "same command" of the resume test: re-running it continues from the latest checkpoint."""
    from ddpm_jax import data
    from ddpm_jax.training import diffusion as diffusion_trainer

    if sleep:  # slow the loop down (not the numbers) so the test can kill it mid-run
        get_batch = data.get_batch
        data.get_batch = lambda *a, **k: (time.sleep(sleep), get_batch(*a, **k))[1]
    config = tiny_config(num_steps=num_steps, ckpt_every=5, log_every=5, sample_every=num_steps)
    diffusion_trainer.train(config, workdir, images=tiny_images())


def slow_down_batches(sleep: float) -> None:
    """Sleep before each batch (the loop, not the numbers, gets slower) so a test can kill a run mid-way."""
    from ddpm_jax import data

    get_batch = data.get_batch
    data.get_batch = lambda *a, **k: (time.sleep(sleep), get_batch(*a, **k))[1]


def run_gan(config_path: str, workdir: str, sleep: float) -> None:
    """``ddpm-jax train-gan --config CONFIG --workdir WORKDIR``, each step ``sleep`` seconds slower."""
    from ddpm_jax import config as config_lib
    from ddpm_jax.training import gan

    slow_down_batches(sleep)
    gan.train(config_lib.load_config(config_path), workdir)


def _setup(config, mesh):
    import jax

    from ddpm_jax import parallel
    from ddpm_jax.training import diffusion as diffusion_trainer
    from ddpm_jax.training import loop
    from ddpm_jax.models.unet import UNet, UNetConfig
    from ddpm_jax.schedules import get_schedule

    model = UNet(UNetConfig(**config.model.to_dict()))
    schedule = get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    tx = loop.make_optimizer(config.train.lr, config.train.warmup_steps, config.train.grad_clip)
    state = jax.jit(lambda k: diffusion_trainer.create_train_state(model, tx, k, (1, 8, 8, 1)),
                    out_shardings=parallel.replicated_sharding(mesh))(jax.random.key(0))
    return model, schedule, state


def run_steps(config, mesh, num_steps: int, process_index: int = 0, process_count: int = 1):
    """``num_steps`` steps of ``config.train.parallel`` over ``mesh``; returns the params (host numpy)."""
    import jax
    import numpy as np

    from ddpm_jax import data, parallel
    from ddpm_jax.training import diffusion as diffusion_trainer

    model, schedule, state = _setup(config, mesh)
    step_fn = diffusion_trainer.compile_train_step(model, schedule, config, mesh)
    images = tiny_images(n=32)
    key = jax.random.key(1)
    pmap = config.train.parallel == "pmap"
    if pmap:
        state = parallel.replicate(state, list(mesh.devices.flat))
    for step in range(num_steps):
        batch = data.get_batch(images, step, config.train.batch_size, 0, process_index, process_count)
        batch = parallel.split_for_pmap(batch) if pmap else parallel.shard_batch(batch, mesh)
        state, _ = step_fn(state, batch, key)
    if pmap:
        state = parallel.unreplicate(state)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), {"params": state.params,
                                                                       "ema": state.ema_params})


def max_diff(a, b) -> float:
    import jax
    import numpy as np

    return float(max(jax.tree.leaves(jax.tree.map(lambda x, y: np.max(np.abs(x - y)), a, b))))


def run_devices8(out_path: str) -> None:
    import jax

    from ddpm_jax import parallel
    from ddpm_jax.training import diffusion as diffusion_trainer

    assert jax.device_count() == 8, jax.devices()
    single = run_steps(tiny_config(), parallel.make_mesh(jax.devices()[:1]), 2)
    sharded = run_steps(tiny_config(), parallel.make_mesh(), 2)
    pmapped = run_steps(tiny_config(parallel="pmap"), parallel.make_mesh(), 2)
    try:
        diffusion_trainer.train(tiny_config(batch_size=12), "/nonexistent/never-created", images=tiny_images())
        batch_error = None
    except ValueError as e:
        batch_error = str(e)
    result = {
        "sharded_vs_single": max_diff(sharded, single),
        "pmap_vs_sharded": max_diff(pmapped, sharded),
        "changed": max_diff(single, run_steps(tiny_config(), parallel.make_mesh(jax.devices()[:1]), 0)),
        "batch_error": batch_error,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


def run_multihost(process_id: int, num_processes: int, port: int, out_path: str) -> None:
    import jax
    import numpy as np

    from ddpm_jax import parallel

    if num_processes > 1:
        assert parallel.maybe_initialize_distributed(f"localhost:{port}", num_processes, process_id)
    assert jax.process_count() == num_processes
    params = run_steps(tiny_config(), parallel.make_mesh(), 3, jax.process_index(), jax.process_count())
    flat = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(out_path, devices=jax.device_count(), **flat)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "train":
        run_train(args[0], int(args[1]), float(args[2]) if len(args) > 2 else 0.0)
    elif command == "gan":
        run_gan(args[0], args[1], float(args[2]))
    elif command == "devices8":
        run_devices8(args[0])
    elif command == "multihost":
        run_multihost(int(args[0]), int(args[1]), int(args[2]), args[3])
    else:
        raise SystemExit(f"unknown command {command!r}")
