"""Stable Diffusion 2.x (stable_diffusion.py) against diffusers' StableDiffusionPipeline.

A tiny random SD-2.x-style folder saved by diffusers: v-prediction (scheduler prediction_type
"v_prediction"), linear projections in the transformers, per-level head counts, upcast attention,
a GELU text encoder, a tokenizer padding with "!". Our txt2img from the same initial latents equals
diffusers' to ≤ 1e-3, with and without guidance_rescale (Lin et al. 2024 Eq. 16).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from _sd_fixtures import pipe, sd, write_sd_folder  # noqa: E402,F401 (module fixtures over `folder`)

from ddpm_jax import guidance  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: tiny programs, a few calls each (tests/conftest.py)

SIZE = 32  # the tiny VAE has f = 2 → 16×16×4 latents
PROMPTS = ["a cat on the dog", "the dog"]
NEGATIVE = ["the cat", ""]
UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=16)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 set_alpha_to_one=False, clip_sample=False, prediction_type="v_prediction")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sd_folder(tmp_path_factory.mktemp("sd2"), UNET, diffusers.DDIMScheduler(**SCHEDULER), pad_token="!", hidden_act="gelu")


def test_sd2_folder_reads_as_sd2(sd, pipe):
    """The pieces that make it 2.x arrive: v-prediction, linear projections, heads per level, GELU, "!" padding."""
    assert sd.scheduler.config.prediction_type == "v_prediction" and sd.vae.config.scaling_factor == 0.18215  # SD v1/2 VAE
    assert sd.unet.config.use_linear_projection and sd.unet.config.num_attention_heads == (2, 4)
    assert sd.text_encoder.config.hidden_act == "gelu"
    ids = np.asarray(sd.tokenizer(["the dog"]))
    expected = pipe.tokenizer(["the dog"], padding="max_length", max_length=77, return_tensors="np").input_ids
    assert pipe.tokenizer.pad_token == "!" and ids[0, -1] == pipe.tokenizer.convert_tokens_to_ids("!")
    np.testing.assert_array_equal(ids, expected)


@pytest.mark.parametrize("name, rescale", [("euler", 0.0), ("ddim", 0.7)])
def test_sd2_txt2img_equals_diffusers_pipeline(sd, pipe, name, rescale):
    """Same latents, prompts and negative prompts → the same images to ≤ 1e-3, guidance_rescale φ = 0 and 0.7."""
    cls = {"euler": diffusers.EulerDiscreteScheduler, "ddim": diffusers.DDIMScheduler}[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    latents = np.random.default_rng(0).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)  # NHWC
    with torch.no_grad():
        expected = pipe(PROMPTS, negative_prompt=NEGATIVE, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                        num_inference_steps=5, guidance_scale=6.0, guidance_rescale=rescale, height=SIZE, width=SIZE,
                        output_type="np").images
    ours = sd.with_scheduler(name).txt2img(PROMPTS, NEGATIVE, guidance_scale=6.0, guidance_rescale=rescale,
                                           num_steps=5, height=SIZE, width=SIZE, latents=latents)
    assert expected.std() > 0.05
    np.testing.assert_allclose((ours["images"] + 1) / 2, expected, atol=1e-3, rtol=0)


def test_rescale_guidance_equals_diffusers_rescale_noise_cfg():
    """Eqs. 15–16 against diffusers' rescale_noise_cfg; φ = 0 is plain guidance exactly."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    rng = np.random.default_rng(1)
    guided, cond = rng.standard_normal((2, 2, 3, 4, 4)).astype(np.float32)
    expected = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond), guidance_rescale=0.7).numpy()
    np.testing.assert_allclose(guidance.rescale_guidance(guided, cond, 0.7), expected, atol=1e-6)
    np.testing.assert_array_equal(guidance.rescale_guidance(guided, cond, 0.0), guided)


def test_guidance_rescale_out_of_range_is_one_clear_error(sd):
    with pytest.raises(ValueError, match="guidance_rescale must be in"):
        sd.txt2img("the dog", guidance_rescale=1.5, num_steps=1, height=SIZE, width=SIZE)
