"""The paper-reproduction experiment files for 256×256 images (experiments/ddpm_*256.py).

Checks the settings of Ho et al. 2020, Appendix B, and that the U-Net is the paper's 114M-parameter
model laid out as the released diffusers checkpoints (google/ddpm-*-256), so that
``ddpm-jax sample --pretrained`` on those weights and a run of these configs are the same network.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import config as config_lib
from ddpm_jax.models.unet import UNet, UNetConfig
from ddpm_jax.pretrained.diffusers import unet_config_from_diffusers

ROOT = pathlib.Path(__file__).resolve().parents[1]
CELEBAHQ = ROOT / "experiments" / "ddpm_celebahq256.py"
CHURCH = ROOT / "experiments" / "ddpm_lsun_church256.py"

# config.json of the google/ddpm-*-256 family on the Hugging Face Hub (copied from google/ddpm-cat-256;
# church-256 and celebahq-256 are conversions of the same architecture, 114M parameters in the paper).
HUB_256_CONFIG = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 512, 512], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
PAPER_256_PARAMS = 113_673_219  # "our LSUN and CelebA-HQ models have 114 million parameters"


def _unet(config) -> UNetConfig:
    return UNetConfig(**config.model.to_dict())


def _num_params(unet_config: UNetConfig) -> int:
    shapes = jax.eval_shape(UNet(unet_config).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("path, steps, data", [(CELEBAHQ, 500_000, "tfds:celeb_a_hq/256"),
                                               (CHURCH, 1_200_000, "tfds:lsun/church_outdoor")])
def test_papers_settings(path, steps, data):
    c = config_lib.load_config(path)
    assert set(c) == {"data", "model", "diffusion", "train", "sample"}
    assert (c.data.name, c.data.image_size, c.data.channels, c.data.random_flip) == (data, 256, 3, True)
    assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.diffusion.prediction) == ("linear", 1000, "eps")
    t = c.train
    assert (t.batch_size, t.lr, t.num_steps, t.ema_decay, t.ema_warmup) == (64, 2e-5, steps, 0.9999, False)
    assert c.model.dropout == 0.0
    assert (c.sample.sampler, c.sample.steps) == ("ddpm", 1000)
    for doc_part in ("Command::", "Hardware:", "Expected result"):
        assert doc_part in path.read_text()


def test_256_unet_is_the_released_architecture_with_the_papers_parameter_count():
    celebahq, church = (_unet(config_lib.load_config(p)) for p in (CELEBAHQ, CHURCH))
    assert celebahq == church
    assert celebahq == unet_config_from_diffusers(HUB_256_CONFIG)  # field for field, dropout 0 included
    n = _num_params(celebahq)
    assert n == PAPER_256_PARAMS
    assert abs(n - 114e6) / 114e6 < 0.005


def test_parameter_count_equals_diffusers_unet2dmodel():
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    config = {k: v for k, v in HUB_256_CONFIG.items() if k != "_class_name"}
    model = diffusers.UNet2DModel(**config)
    assert sum(p.numel() for p in model.parameters()) == PAPER_256_PARAMS
