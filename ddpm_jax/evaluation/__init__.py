"""Evaluation: bits/dim from the variational bound (``likelihood``), the Fréchet distance (``frechet``), the FID
Inception network (``inception``), the FID/IS drivers (``fid``), the offline MNIST judge (``judge``: classifier FID, a
proxy for FID that needs no downloaded weights), the judged guidance sweep of conditional models (``conditional``)
and the report ``ddpm-jax eval`` writes (``report``). Import the submodule you need: this package re-exports nothing,
so that reading the judge does not load the report's pipelines."""
