"""pytest setup shared by every test file."""

import os

# The CLI's on-disk compilation cache (ddpm_jax/compile_cache.py) stays off in tests that call cli.main
# in-process, so nothing is written under ~/.cache; test_compile_cache.py turns it on in its subprocess.
os.environ.setdefault("DDPM_JAX_COMPILE_CACHE", "off")
