"""Single-file checkpoints (pretrained/compvis.py): SDXL base and refiner (Stability's sgm layout), SD 2.x (OpenCLIP
in the ldm layout) and SD v1 at its real block layout, against the diffusers folders they were written from.

Each tiny random diffusers folder (tests/_sd_fixtures.py) is written as a single file in its layout by
``to_single_file`` (diffusers' DIFFUSERS_TO_LDM_MAPPING read backwards), the file checked with diffusers' own
single-file converters (``check_with_diffusers``: they give back exactly the folder's weights), then loaded by
``StableDiffusion.from_pretrained(file, config_folder=folder)`` to params identical to the folder's. Plus: a
torch.save ``.ckpt`` with an EMA copy (``use_ema``), tokenizer folders with only ``tokenizer.json``, the CLI, and
one-line errors for files of no known layout or with missing keys.
No sampling except one CLI run.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import save_file  # noqa: E402

from _sd_fixtures import (  # noqa: E402
    REFINER_UNET,
    SDXL_SCHEDULER,
    check_with_diffusers,
    check_with_diffusers_single_file_loader,
    to_single_file,
    write_sd_folder,
)

from ddpm_jax.pipelines.stable_diffusion import StableDiffusion  # noqa: E402
from ddpm_jax.pretrained import compvis  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: tiny programs (tests/conftest.py)

SDXL_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 norm_num_groups=16, cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8)
SD2_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=16)
# SD v1's real layout: 4 levels, 2 ResNets per level, attention at the first three (tiny channel counts)
V1_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16, 32), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
               attention_head_dim=2, norm_num_groups=8)
V1_VAE = dict(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, layers_per_block=2,
              sample_size=32)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return {
        "sdxl": write_sd_folder(root / "sdxl", SDXL_UNET, diffusers.EulerDiscreteScheduler(**SCHEDULER), sdxl=True,
                                width_2=48),  # (diffusers' from_single_file tells its two encoders apart by width)
        "sd_v2": write_sd_folder(root / "sd2", SD2_UNET, diffusers.DDIMScheduler(
            **SCHEDULER, prediction_type="v_prediction"), pad_token="!", hidden_act="gelu"),
        "sd_v1": write_sd_folder(root / "v1", V1_UNET, diffusers.PNDMScheduler(**SCHEDULER, skip_prk_steps=True),
                                 vae=V1_VAE),
        "sdxl_refiner": write_sd_folder(root / "refiner", REFINER_UNET, diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER),
                                        refiner=True),  # text_encoder_2 alone, 32 wide; five time ids
    }


@pytest.fixture(scope="module")
def reference(folders):
    """Our from_pretrained of each diffusers folder, loaded once (param_shapes traces each network)."""
    cache = {}

    def params(layout):
        if layout not in cache:
            cache[layout] = StableDiffusion.from_pretrained(folders[layout]).params
        return cache[layout]
    return params


def assert_same_params(a, b):
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (p, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


@pytest.mark.parametrize("layout", ["sdxl", "sdxl_refiner", "sd_v2", "sd_v1"])
def test_single_file_loads_to_identical_params(folders, reference, layout, tmp_path):
    """diffusers' converters read the file back to the folder's weights; ours to the folder's params, exactly."""
    folder = folders[layout]
    state = to_single_file(folder, layout)
    check_with_diffusers(state, folder, layout)
    if layout == "sd_v2":  # what real 2.x files hold besides: OpenCLIP's projection and a last, never-run block
        prefix = "cond_stage_model.model."
        state[prefix + "text_projection"] = np.ones((32, 32), np.float32)
        last = {k: v for k, v in state.items() if k.startswith(prefix + "transformer.resblocks.1.")}
        state |= {k.replace("resblocks.1.", "resblocks.2."): v for k, v in last.items()}
    save_file(state, tmp_path / "model.safetensors")
    if layout.startswith("sdxl"):
        check_with_diffusers_single_file_loader(tmp_path / "model.safetensors", folder, refiner=layout == "sdxl_refiner")
    single = StableDiffusion.from_pretrained(tmp_path / "model.safetensors", config_folder=folder)
    assert_same_params(single.params, reference(layout))
    assert single.is_sdxl == layout.startswith("sdxl") and single.is_refiner == (layout == "sdxl_refiner")
    if layout == "sdxl":
        assert single.force_zeros_for_empty_prompt and single.tokenizer_2.pad_token == "!"
    if layout == "sdxl_refiner":  # (the refiner folder's model_index.json: force_zeros false)
        assert single.text_encoder is None and not single.force_zeros_for_empty_prompt
        assert single.tokenizer is None and single.tokenizer_2.pad_token == "!"
    if layout == "sd_v2":
        assert single.scheduler.config.prediction_type == "v_prediction" and single.tokenizer.pad_token == "!"
        eps = StableDiffusion.from_pretrained(tmp_path / "model.safetensors", config_folder=folder,
                                              prediction_type="epsilon")
        assert eps.scheduler.config.prediction_type == "epsilon"


def test_layouts_are_told_from_the_keys_with_the_released_configs(folders):
    """Without a config folder the keys choose the layout, whose released configs are implied."""
    for layout in ("sdxl", "sdxl_refiner", "sd_v2", "sd_v1"):
        assert compvis.detect_layout(to_single_file(folders[layout], layout)) == layout
    from ddpm_jax.models.clip import CLIPTextConfig
    from ddpm_jax.models.unet import UNetConfig
    from ddpm_jax.models.vae import AutoencoderKLConfig
    from ddpm_jax.pretrained.diffusers import autoencoder_kl_config_from_diffusers, unet_config_from_diffusers
    from ddpm_jax.pretrained.transformers_clip import text_config_from_transformers

    v1 = compvis.IMPLIED_CONFIGS["sd_v1"]  # the same as the library's SD v1 presets
    assert unet_config_from_diffusers(v1["unet"]) == UNetConfig.stable_diffusion_v1()
    assert autoencoder_kl_config_from_diffusers(v1["vae"]) == AutoencoderKLConfig.sd_v1()
    assert text_config_from_transformers(v1["text_encoder"]) == CLIPTextConfig()
    sdxl = compvis.IMPLIED_CONFIGS["sdxl"]  # and the SDXL presets (their parameter count: test_unet_condition)
    assert unet_config_from_diffusers(sdxl["unet"]) == UNetConfig.sdxl_base()
    assert autoencoder_kl_config_from_diffusers(sdxl["vae"]) == AutoencoderKLConfig.sdxl()
    assert compvis.IMPLIED_CONFIGS["sd_v2"]["text_encoder"]["num_hidden_layers"] == 23  # ViT-H's 24th never runs


@pytest.mark.parametrize("layout", ["sdxl", "sdxl_refiner", "sd_v2"])
def test_without_config_folder_the_layout_implies_configs_tokenizers_scheduler(folders, reference, layout, tmp_path,
                                                                               monkeypatch):
    """No config folder: the layout's implied configs (here the tiny folder's, patched in for the released ones),
    one tokenizer folder for both encoders (the OpenCLIP one padding with "!"), the release's scheduler."""
    import json

    folder = folders[layout]
    configs = {name: json.loads((folder / name / "config.json").read_text())
               for name in ("unet", "vae", "text_encoder", "text_encoder_2") if (folder / name).is_dir()}
    monkeypatch.setitem(compvis.IMPLIED_CONFIGS, layout, configs)
    save_file(to_single_file(folder, layout), tmp_path / "model.safetensors")
    single = StableDiffusion.from_pretrained(tmp_path / "model.safetensors", tokenizer=folders["sd_v1"] / "tokenizer")
    assert_same_params(single.params, reference(layout))
    if layout == "sdxl":
        assert single.tokenizer.pad_token == "<|endoftext|>" and single.tokenizer_2.pad_token == "!"
        assert single.scheduler.name == "euler" and single.force_zeros_for_empty_prompt
    elif layout == "sdxl_refiner":  # the release's flags: aesthetic-score time ids, no zeros for ∅
        assert single.tokenizer is None and single.tokenizer_2.pad_token == "!" and single.scheduler.name == "euler"
        assert single.is_refiner and not single.force_zeros_for_empty_prompt
    else:
        assert single.tokenizer.pad_token == "!" and single.scheduler.config.prediction_type == "v_prediction"


def test_ckpt_pickle_with_ema_copy(folders, reference, tmp_path):
    """A torch.save .ckpt ({"state_dict": …}, read by torch_pickle without torch) of a "full" checkpoint: the
    U-Net in model.diffusion_model.* (here noise) and its EMA copy in model_ema.* (the folder's weights)."""
    folder = folders["sd_v1"]
    state = to_single_file(folder, "sd_v1")
    ema = {"model_ema." + "".join(k.split(".")[1:]): v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    noisy = {k: (v + 1.0 if k.startswith("model.diffusion_model.") else v) for k, v in state.items()}
    checkpoint = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in (noisy | ema).items()}
    checkpoint |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)}
    torch.save({"state_dict": checkpoint, "global_step": 10}, tmp_path / "full.ckpt")
    assert_same_params(StableDiffusion.from_pretrained(tmp_path / "full.ckpt", config_folder=folder, use_ema=True).params,
                       reference("sd_v1"))
    raw = StableDiffusion.from_pretrained(tmp_path / "full.ckpt", config_folder=folder).params
    np.testing.assert_array_equal(np.asarray(raw["unet"]["conv_out"]["bias"]),
                                  np.asarray(reference("sd_v1")["unet"]["conv_out"]["bias"]) + 1.0)
    save_file(state, tmp_path / "ema-only.safetensors")
    with pytest.raises(ValueError, match="no model_ema"):
        StableDiffusion.from_pretrained(tmp_path / "ema-only.safetensors", config_folder=folder, use_ema=True)


def test_tokenizer_json_only_folder(folders, tmp_path):
    """A tokenizer folder with only tokenizer.json (CLIPTokenizerFast.save_pretrained, slow files deleted) gives
    transformers' ids, padding included."""
    from ddpm_jax.tokenizer import load_tokenizer

    for source, pad in ((folders["sd_v1"] / "tokenizer", "<|endoftext|>"), (folders["sd_v2"] / "tokenizer", "!")):
        fast = transformers.CLIPTokenizerFast.from_pretrained(str(source))
        out = tmp_path / pad.strip("<|>")
        fast.save_pretrained(out)
        for name in ("vocab.json", "merges.txt"):
            (out / name).unlink(missing_ok=True)
        assert (out / "tokenizer.json").is_file()
        ours = load_tokenizer(out)
        prompts = ["a cat on the dog", "The DOG, the cat.", ""]  # (no "!": the fast tokenizer splits its pad token out)
        expected = fast(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        assert ours.pad_token == pad
        np.testing.assert_array_equal(np.asarray(ours.tokenize(prompts)), expected)


def test_bad_single_files_are_one_line_errors(folders, tmp_path):
    save_file({"foo.weight": np.zeros(2, np.float32), "bar.bias": np.zeros(2, np.float32)}, tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match=r"its 2 keys \(bar\.bias, foo\.weight\) match no known single-file layout") as err:
        StableDiffusion.from_pretrained(tmp_path / "odd.safetensors", tokenizer=folders["sd_v1"] / "tokenizer")
    assert "\n" not in str(err.value) and "conditioner.embedders.1.model.*" in str(err.value)

    folder = folders["sdxl"]
    state = to_single_file(folder, "sdxl")
    for key in ("model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.ln_final.weight",
                "conditioner.embedders.1.model.text_projection"):
        del state[key]
    state["model.diffusion_model.extra.weight"] = np.zeros(2, np.float32)
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError) as err:
        StableDiffusion.from_pretrained(tmp_path / "broken.safetensors", config_folder=folder)
    message = str(err.value)
    assert "\n" not in message and "SDXL base (Stability's sgm" in message
    assert "model.diffusion_model.* (unet): 1 missing (add_embedding/linear_1/kernel), 1 unexpected " \
           "(model.diffusion_model.extra.weight)" in message
    assert "conditioner.embedders.1.model.* (text_encoder_2): 2 missing (text_model/final_layer_norm/scale, " \
           "text_projection/kernel)" in message
    with pytest.raises(ValueError, match="configs have no text_encoder_2"):
        StableDiffusion.from_pretrained(tmp_path / "broken.safetensors", config_folder=folders["sd_v1"])

    refiner = to_single_file(folders["sdxl_refiner"], "sdxl_refiner")
    del refiner["conditioner.embedders.0.model.text_projection"]
    refiner["conditioner.embedders.1.model.ln_final.weight"] = np.zeros(2, np.float32)  # (no such embedder in it)
    save_file(refiner, tmp_path / "refiner.safetensors")
    with pytest.raises(ValueError) as err:
        StableDiffusion.from_pretrained(tmp_path / "refiner.safetensors", config_folder=folders["sdxl_refiner"])
    message = str(err.value)
    assert "\n" not in message and "does not match the SDXL refiner (Stability's sgm" in message
    assert "1 unexpected keys outside the networks (conditioner.embedders.1.model.ln_final.weight)" in message
    assert "conditioner.embedders.0.model.* (text_encoder_2): 1 missing (text_projection/kernel)" in message


def test_cli_txt2img_sdxl_single_file(folders, tmp_path):
    """(A refiner single file through the CLI: test_sdxl_refiner.py::test_cli_txt2img_with_refiner.)"""
    from ddpm_jax import cli

    save_file(to_single_file(folders["sdxl"], "sdxl"), tmp_path / "sdxl.safetensors")
    out = tmp_path / "out.png"
    assert cli.main(["txt2img", "--model", str(tmp_path / "sdxl.safetensors"), "--config-folder", str(folders["sdxl"]),
                     "a cat", "--steps", "1", "--height", "16", "--width", "16", "--out", str(out)]) == 0
    assert out.is_file()
