"""The shared loop (loop.run) on a toy least-squares problem: pytree batches, hooks, resume, NaN stop."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import checkpoints, data, parallel
from ddpm_jax.training import loop


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    w: jax.Array          # [2]
    seen: jax.Array       # running sum of the labels: shows which batches were used


def toy_step(state, batch, key):
    x, y = batch["x"], batch["y"]                           # [B, 2], [B]
    loss = jnp.mean((x @ state.w - y) ** 2)
    grad = jax.grad(lambda w: jnp.mean((x @ w - y) ** 2))(state.w)
    noise = 0.0 * jax.random.normal(jax.random.fold_in(key, state.step))
    return (state.replace(step=state.step + 1, w=state.w - 0.1 * grad + noise, seen=state.seen + jnp.sum(y)),
            {"loss": loss, "w0": state.w[0]})


def _data():
    x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    return x, (x @ np.array([2.0, -1.0])).astype(np.float32)


def _run(workdir, num_steps, hooks=(), y_scale=1.0, prefetch=2):
    x, y = _data()
    mesh = parallel.make_mesh()
    state = jax.device_put(ToyState(jnp.zeros((), jnp.int32), jnp.zeros(2), jnp.zeros(())),
                           parallel.replicated_sharding(mesh))
    batch_fn = lambda s: {"x": data.get_batch(x, s, 8, 0), "y": y_scale * data.get_batch(y, s, 8, 0)}
    step = loop.compile_step(toy_step, mesh)
    return loop.run(state, step, batch_fn, workdir=workdir, num_steps=num_steps, key=jax.random.key(0),
                    mesh=mesh, log_every=5, ckpt_every=10, hooks=hooks, prefetch=prefetch)


def test_hooks_logging_and_exact_resume(tmp_path):
    calls = []
    full = _run(tmp_path / "full", 30, hooks=[loop.Hook(12, lambda s, step: calls.append(step))])
    assert calls == [12, 24, 30]                                       # every 12 and after the last step
    lines = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [5, 10, 15, 20, 25, 30]
    assert set(lines[0]) == {"step", "steps_per_sec", "loss", "w0"}
    assert lines[-1]["loss"] < 1e-2 * lines[0]["loss"]                  # it learned w = (2, -1)

    _run(tmp_path / "split", 20)                                       # stops at 20 (checkpoint at 20)
    resumed = _run(tmp_path / "split", 30)                             # same command, longer: resumes
    np.testing.assert_array_equal(np.asarray(resumed.w), np.asarray(full.w))
    np.testing.assert_array_equal(np.asarray(resumed.seen), np.asarray(full.seen))
    assert checkpoints.latest_step(tmp_path / "split") == 30


def test_prefetching_changes_nothing_across_a_resume(tmp_path):
    plain = _run(tmp_path / "plain", 30, prefetch=0)                  # batch_fn called in the loop itself
    _run(tmp_path / "split", 20, prefetch=3)                           # batches made 3 steps ahead ...
    resumed = _run(tmp_path / "split", 30, prefetch=2)                 # ... and a fresh prefetcher from step 20
    np.testing.assert_array_equal(np.asarray(resumed.w), np.asarray(plain.w))
    np.testing.assert_array_equal(np.asarray(resumed.seen), np.asarray(plain.seen))


def test_non_finite_loss_stops_before_saving(tmp_path):
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step 0 .*last good checkpoint is step None"):
        _run(tmp_path, 10, y_scale=np.inf)
    assert checkpoints.latest_step(tmp_path) is None


def test_bad_parallel_kind():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="train.parallel must be 'jit' or 'pmap'"):
        loop.compile_step(toy_step, mesh, "shard_map")
    with pytest.raises(ValueError, match="not available for this trainer"):
        loop.compile_step(toy_step, mesh, "pmap")
