"""Host memory of the training data: the whole dataset as float32 (old) vs decoded per batch (new).

Two datasets, each loaded and iterated for ``--batches`` batches of ``--batch`` images, every
measurement in a fresh Python process, its peak resident set size (the kernel's VmHWM, reset after the
imports) compared with its RSS before loading:

(a) CIFAR-10-shaped: ``tfds:cifar10`` under ``tfds.testing.mock_data`` (``--cifar-n`` = 50,000 random
    32×32×3 uint8 records served by tensorflow-datasets' ``tfds.data_source`` code path; no real
    CIFAR-10 is needed or downloaded);
(b) a folder of ``--folder-n`` = 2,000 generated 256×256 RGB PNGs (smooth random pictures written
    to ``--folder``, default /tmp/ddpm_jax_bench_folder256, once).

    old  ``data.load_dataset(config)`` (the whole dataset as one float32 array, what the trainers held
         before) + ``data.get_batch`` per step;
    new  ``data.open_dataset(config)`` (uint8, decoded, fitted and converted per batch) +
         ``data.get_batch`` through ``data.Prefetcher`` (depth ``--prefetch``), as ``training.diffusion`` reads.

Reported: peak RSS over the process's RSS before loading (after the imports and one warm-up read of one
image, which loads the reader's lazy modules), in MB, and seconds per batch.
The bound asserted for the new path: growth ≤ (prefetch + 2) float32 batches + the same in uint8 + 64 MB
(batches alive at once: ``prefetch`` queued, one being built, one in use), independent of the number of
images; the old path grows with N × H × W × C × 4 bytes.

    python benchmarks/bench_data.py                                   # (a) and (b), 20 batches of 64
    python benchmarks/bench_data.py --cifar-n 2000 --folder-n 100 --batches 3   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

MB = 2**20


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def _reset_peak_rss() -> None:
    """Resets the kernel's peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0), so that what the imports
    peaked at is not counted; ``ru_maxrss`` cannot be reset."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mb() -> float:
    """Peak resident set size since the last reset (VmHWM), MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def write_folder(path: pathlib.Path, n: int, size: int = 256, seed: int = 0) -> pathlib.Path:
    """``n`` smooth random RGB pictures (8×8 random colours, enlarged bicubically) as PNGs, once."""
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    if len(list(path.glob("*.png"))) >= n:
        return path
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize((size, size), Image.Resampling.BICUBIC).save(path / f"{i:05d}.png")
    return path


def child(mode: str, config: dict, mock_n: int, batches: int, batch: int, prefetch: int) -> dict:
    """One measurement (run in its own process): load + iterate, peak RSS growth and time per batch."""
    from ddpm_jax import data

    mock = None
    if mock_n:
        import tensorflow_datasets as tfds

        mock = tfds.testing.mock_data(num_examples=mock_n, policy=tfds.testing.MockPolicy.USE_CODE)
        mock.__enter__()
    data.open_dataset(config)[[0]]   # warm-up, both paths: the reader's and decoder's lazy imports
    _reset_peak_rss()
    before = _rss_mb()
    start = time.perf_counter()
    if mode == "old":
        images = data.load_dataset(config)                                  # [N, H, W, C] float32
        batch_fn = lambda s: data.get_batch(images, s, batch, 0)            # noqa: E731
        n = len(images)
    else:
        source = data.open_dataset(config)                                  # nothing decoded yet
        batch_fn = data.Prefetcher(lambda s: data.get_batch(source, s, batch, 0), 0, batches, prefetch)
        n = len(source)
    load_s = time.perf_counter() - start
    checksum = 0.0
    start = time.perf_counter()
    for s in range(batches):
        x = batch_fn(s)                                                     # [batch, H, W, C] float32
        checksum += float(x[:, 0, 0, 0].sum())
    iter_s = time.perf_counter() - start
    if mode == "new":
        batch_fn.close()
    if mock is not None:
        mock.__exit__(None, None, None)
    return {"mode": mode, "n": n, "shape": list(x.shape[1:]), "rss_before_mb": before,
            "peak_growth_mb": _peak_rss_mb() - before, "load_s": load_s, "s_per_batch": iter_s / batches,
            "checksum": checksum}


def run_child(mode: str, config: dict, mock_n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--child-config", json.dumps(config),
           "--child-mock", str(mock_n), "--batches", str(args.batches), "--batch", str(args.batch),
           "--prefetch", str(args.prefetch)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def new_path_bound_mb(shape: tuple[int, int, int], batch: int, prefetch: int) -> float:
    """The stated bound on the new path's peak RSS growth: (prefetch + 2) batches as float32 + uint8, + 64 MB."""
    batch_bytes = batch * int(np.prod(shape)) * (4 + 1)
    return (prefetch + 2) * batch_bytes / MB + 64.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar-n", type=int, default=50_000)
    parser.add_argument("--folder-n", type=int, default=2_000)
    parser.add_argument("--folder", default="/tmp/ddpm_jax_bench_folder256")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    parser.add_argument("--child-mock", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.child_config), args.child_mock, args.batches,
                               args.batch, args.prefetch)))
        return {}

    folder = write_folder(pathlib.Path(args.folder), args.folder_n)
    cases = [("cifar10-shaped (tfds mock)", {"name": "tfds:cifar10", "image_size": 32, "channels": 3},
              args.cifar_n),
             (f"256² folder ({args.folder_n} PNGs)", {"name": f"folder:{folder}", "image_size": 256, "channels": 3,
                                                        "num_examples": args.folder_n}, 0)]
    rows = []
    load_before = os.getloadavg()
    print(f"batch {args.batch}, {args.batches} batches, prefetch {args.prefetch}; load average {load_before}")
    print("| data | path | N | peak RSS growth MB | bound MB | load s | s/batch |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, config, mock_n in cases:
        results = {mode: run_child(mode, config, mock_n, args) for mode in ("old", "new")}
        assert results["old"]["checksum"] == results["new"]["checksum"], "old and new paths read different batches"
        for mode, r in results.items():
            bound = new_path_bound_mb(tuple(r["shape"]), args.batch, args.prefetch) if mode == "new" else None
            r.update(data=name, bound_mb=bound)
            rows.append(r)
            print(f"| {name} | {mode} | {r['n']:,} | {r['peak_growth_mb']:.0f} | {'' if bound is None else f'{bound:.0f}'} "
                  f"| {r['load_s']:.1f} | {r['s_per_batch']:.3f} |")
        new = results["new"]
        assert new["peak_growth_mb"] <= new["bound_mb"], (
            f"{name}: the per-batch loader grew by {new['peak_growth_mb']:.0f} MB > bound {new['bound_mb']:.0f} MB")
    report = {"load_average_before": load_before, "load_average_after": os.getloadavg(), "batch": args.batch,
              "batches": args.batches, "prefetch": args.prefetch, "rows": rows}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"the per-batch loader stayed under its bound on both datasets; load average after: "
          f"{report['load_average_after']}")
    return report


if __name__ == "__main__":
    main()
