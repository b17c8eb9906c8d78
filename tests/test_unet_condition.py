"""The cross-attention (Stable Diffusion) U-Net: parity with diffusers' UNet2DConditionModel, the
cross-attention maps, class conditioning, and every condition/config error.

Parity tests build tiny random diffusers models (every weight, norm and bias perturbed, so no zero-
or one-initialised parameter can hide a mapping bug), save them with save_pretrained, load them with
load_unet and compare ε̂ for the same latents, timesteps, encoder_hidden_states (our ``context``) and
class labels, to 1e-4 absolute (NCHW ↔ NHWC).
"""

import dataclasses
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ddpm_jax.models.unet import (  # noqa: E402
    UNet,
    UNetConfig,
    apply_with_attention_maps,
    check_condition,
)
from ddpm_jax.pretrained.diffusers import UNET2D_CONDITION_DEFAULTS, load_unet, unet_config_from_diffusers  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: tiny programs, a few calls each (tests/conftest.py)

CROSS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    norm_num_groups=8, cross_attention_dim=16,
)  # fmt: skip
CONFIGS = {
    # (a) cross-attention at both levels and in the mid block, 1×1-conv projections, a different number of
    # heads per level (diffusers' "attention_head_dim" = heads), two transformer blocks per Transformer2D.
    "conv-projection-two-levels": dict(
        down_block_types=CROSS[0], up_block_types=CROSS[1], attention_head_dim=(2, 4), transformer_layers_per_block=2
    ),
    # (b) SD's layout (no attention at the lowest level), linear projections, a class-label table.
    "linear-projection-class-labels": dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        use_linear_projection=True,
        num_class_embeds=5,
        norm_eps=1e-6,
    ),
    # (c) a vector condition through the "projection" class embedding (an MLP), SD-2-style embedding settings.
    "class-projection": dict(
        down_block_types=CROSS[0],
        up_block_types=CROSS[1],
        attention_head_dim=2,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=12,
        flip_sin_to_cos=False,
        freq_shift=1,
        mid_block_scale_factor=2**0.5,
    ),
    # (d) SDXL's layout: no attention at the first level, transformer depth per level (1 there, 2 below and
    # in the mid block), linear projections, heads per level, and SDXL's added conditioning "text_time": a pooled
    # text embedding [B, 12] and six time ids [B, 6], each id embedded with 8 sinusoidal features (12 + 6·8 = 60).
    "sdxl-text-time": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=60,
    ),
}


def _save_random_diffusers_unet(folder, name, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**TINY, **CONFIGS[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (p.std() if p.ndim > 1 else 0.1))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _inputs(name, batch=2, tokens=5):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 4, 16, 16)).astype(np.float32)  # NCHW latents
    t = np.array([3, 917][:batch])
    context = rng.standard_normal((batch, tokens, 16)).astype(np.float32)
    labels = None
    if CONFIGS[name].get("num_class_embeds"):
        labels = np.array([4, 1][:batch])
    elif CONFIGS[name].get("class_embed_type") == "projection":
        labels = rng.standard_normal((batch, 12)).astype(np.float32)
    added = {}
    if CONFIGS[name].get("addition_embed_type") == "text_time":
        # pooled text embedding; (original h, w), (crop top, left), (target h, w) as SDXL's pipeline passes them
        added = {"text_embeds": rng.standard_normal((batch, 12)).astype(np.float32),
                 "time_ids": np.array([[16, 16, 0, 0, 16, 16], [40, 24, 3, 5, 32, 32]][:batch], np.float32)}
    return x, t, context, labels, added


def _diffusers_eps(model, x, t, context, labels, added):
    with torch.no_grad():
        labels = None if labels is None else torch.from_numpy(labels)
        out = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context), class_labels=labels,
                    added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()} or None)
    return out.sample.numpy()


def _ours(module, params, x, t, context, labels, added):
    labels = None if labels is None else jnp.asarray(labels)
    out = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context),
                       labels, **{k: jnp.asarray(v) for k, v in added.items()})
    return np.asarray(out).transpose(0, 3, 1, 2)  # NHWC → NCHW


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name → (diffusers model, folder), built once for the module."""
    out = {}
    for name in CONFIGS:
        folder = tmp_path_factory.mktemp(name)
        out[name] = (_save_random_diffusers_unet(folder, name), folder)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(saved, name):
    model, folder = saved[name]
    x, t, context, labels, added = _inputs(name)
    expected = _diffusers_eps(model, x, t, context, labels, added)
    module, params = load_unet(folder)
    got = _ours(module, params, x, t, context, labels, added)
    assert np.abs(expected).mean() > 0.1  # a meaningful comparison, not of two near-zero arrays
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # The condition matters: another context (and, for class-conditional models, other labels) changes ε̂.
    other = _ours(module, params, x, t, context[::-1], None if labels is None else labels[::-1], added)
    assert np.abs(other - got).mean() > 1e-2
    if added:  # and so does each added condition alone: the pooled embedding, the time ids
        for key in added:
            swapped = _ours(module, params, x, t, context, labels, dict(added, **{key: added[key][::-1]}))
            assert np.abs(swapped - got).mean() > 1e-2, key


def test_cross_attention_maps_match_diffusers(saved):
    """Every attn2's softmax(QKᵀ/√d) [B, heads, H·W, L], in forward order, equals diffusers' (classic processor)."""
    from diffusers.models.attention_processor import AttnProcessor

    model, folder = saved["conv-projection-two-levels"]
    model.set_attn_processor(AttnProcessor())
    captured = []
    for name, sub in model.named_modules():
        if name.endswith("attn2"):
            original = sub.get_attention_scores

            def record(query, key, mask=None, _original=original, _heads=sub.heads):
                probs = _original(query, key, mask)  # [B·heads, H·W, L]
                captured.append(probs.reshape(-1, _heads, *probs.shape[1:]).numpy())
                return probs

            sub.get_attention_scores = record
    x, t, context, labels, added = _inputs("conv-projection-two-levels", tokens=7)
    expected_eps = _diffusers_eps(model, x, t, context, labels, added)

    module, params = load_unet(folder)
    eps, maps = apply_with_attention_maps(
        module, params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context)
    )
    np.testing.assert_allclose(np.asarray(eps).transpose(0, 3, 1, 2), expected_eps, rtol=0, atol=1e-4)
    # down 0 (2 heads, 16×16), down 1 (4 heads, 8×8), mid (4 heads), up 0 (4 heads) ×2, up 1 (2 heads) ×2;
    # each Transformer2D has 2 blocks.
    assert list(maps)[:2] == [
        "down_blocks_0/attentions_0/transformer_blocks_0/attn2",
        "down_blocks_0/attentions_0/transformer_blocks_1/attn2",
    ]
    assert len(maps) == len(captured) == 2 * (1 + 1 + 1 + 2 + 2)
    assert maps["down_blocks_0/attentions_0/transformer_blocks_0/attn2"].shape == (2, 2, 256, 7)
    assert maps["mid_block/attentions_0/transformer_blocks_1/attn2"].shape == (2, 4, 64, 7)
    for ours, theirs in zip(maps.values(), captured):
        assert ours.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(ours).sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_context_shared_by_the_batch_and_scalar_labels(saved):
    """A context [1, L, D] and a scalar label mean the same condition for every example."""
    _, folder = saved["linear-projection-class-labels"]
    module, params = load_unet(folder)
    x, t, context, _, _ = _inputs("linear-projection-class-labels")
    x = jnp.asarray(x.transpose(0, 2, 3, 1))
    shared = module.apply({"params": params}, x, t, jnp.asarray(context[:1]), 3)
    repeated = module.apply({"params": params}, x, t, jnp.asarray(np.repeat(context[:1], 2, 0)), jnp.array([3, 3]))
    np.testing.assert_allclose(shared, repeated, atol=1e-6)


def test_out_of_range_label_under_jit_gives_nan(saved):
    """Inside jit the label values cannot be checked; an out-of-range label gives NaN, not another class."""
    _, folder = saved["linear-projection-class-labels"]
    module, params = load_unet(folder)
    x, t, context, _, _ = _inputs("linear-projection-class-labels")
    apply = jax.jit(lambda labels: module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), t, context, labels))
    out = np.asarray(apply(jnp.array([1, 5])))  # num_class_embeds = 5
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
    assert np.isnan(np.asarray(apply(jnp.array([-1, 0])))[0]).all()  # no wrap-around to the last class


# ------------------------------------------------------------------------------------------------
# Configuration: SD 1.x, diffusers' defaults and naming quirk
# ------------------------------------------------------------------------------------------------

SD_V1_CONFIG_JSON = {  # CompVis/stable-diffusion-v1-4, unet/config.json
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.2.2",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def test_stable_diffusion_v1_config_and_parameter_count():
    config = unet_config_from_diffusers(SD_V1_CONFIG_JSON)
    assert config == UNetConfig.stable_diffusion_v1()
    assert config.level_heads == (8, 8, 8, 8)  # "attention_head_dim": 8 is the number of heads
    shapes = jax.eval_shape(UNet(config).init, jax.random.key(0), *config.input_specs())["params"]
    ours = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes))
    with torch.device("meta"):  # no memory, no initialisation: just the module tree
        reference = diffusers.UNet2DConditionModel(**{k: v for k, v in SD_V1_CONFIG_JSON.items() if not k.startswith("_")})
    assert ours == sum(p.numel() for p in reference.parameters()) == 859_520_964
    head = shapes["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    assert head["attn2"]["to_k"]["kernel"].shape == (768, 320)  # keys from the 768-d text states
    assert head["ff"]["net_0"]["proj"]["kernel"].shape == (320, 2 * 4 * 320)  # GEGLU: value and gate halves


SDXL_CONFIG_JSON = {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the options it sets)
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def test_sdxl_base_config_and_parameter_count():
    """``UNetConfig.sdxl_base()`` is what SDXL base's config.json reads as, with diffusers' parameter count (the
    modules built on torch's meta device: no memory, no initialisation) and the added embedding's 2816-wide input."""
    config = unet_config_from_diffusers(SDXL_CONFIG_JSON)
    assert config == UNetConfig.sdxl_base()
    assert config.level_heads == (5, 10, 20) and config.level_transformer_layers == (1, 2, 10)
    shapes = jax.eval_shape(UNet(config).init, jax.random.key(0), *config.input_specs())["params"]
    ours = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes))
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**{k: v for k, v in SDXL_CONFIG_JSON.items() if not k.startswith("_")})
    assert ours == sum(p.numel() for p in reference.parameters()) == 2_567_463_684
    assert shapes["add_embedding"]["linear_1"]["kernel"].shape == (2816, 1280)
    assert "attentions_0" not in shapes["down_blocks_0"]  # no attention at the first level
    assert len([k for k in shapes["mid_block"]["attentions_0"] if k.startswith("transformer_blocks_")]) == 10


def test_num_attention_heads_and_per_level_heads():
    base = dict(SD_V1_CONFIG_JSON, block_out_channels=[320, 640, 1280, 1280])
    sd2 = unet_config_from_diffusers(dict(base, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True))
    assert sd2.level_heads == (5, 10, 20, 20)  # SD 2.x: 64 channels per head everywhere
    # A num_attention_heads entry, where present, is the number of heads (it wins over attention_head_dim).
    assert unet_config_from_diffusers(dict(base, num_attention_heads=16)).level_heads == (16,) * 4


def test_defaults_are_diffusers_defaults():
    """Keys an old config.json leaves out take UNet2DConditionModel's own default values."""
    signature = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters
    for key, value in UNET2D_CONDITION_DEFAULTS.items():
        assert signature[key].default == value, key
    assert signature["attention_head_dim"].default == 8 and signature["num_attention_heads"].default is None
    assert unet_config_from_diffusers({"_class_name": "UNet2DConditionModel"}).level_heads == (8,) * 4


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

SMALL = UNetConfig(
    **{k: v for k, v in TINY.items()},
    down_block_types=CROSS[0],
    up_block_types=CROSS[1],
    mid_block_type="UNetMidBlock2DCrossAttn",
    num_attention_heads=2,
    num_class_embeds=3,
)


def _shapes(config, context=(2, 5, 16), labels=((2,), jnp.int32), x=(2, 16, 16, 4)):
    spec = lambda s, dtype=jnp.float32: None if s is None else jax.ShapeDtypeStruct(s, dtype)
    args = (spec(x), spec((x[0],), jnp.int32), spec(context), None if labels is None else spec(*labels))
    return jax.eval_shape(UNet(config).init, jax.random.key(0), *args)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(context=None), "this U-Net has cross-attention \\(cross_attention_dim=16\\): pass context=\\[B, L, 16\\]"),
        (dict(context=(2, 5, 12)), "context has last dimension 12 but the U-Net's cross_attention_dim is 16"),
        (dict(context=(2, 16)), "context must be \\[B, L, D_ctx\\], got shape \\(2, 16\\)"),
        (dict(context=(3, 5, 16)), "context batch 3 must be 1 or the image batch 2"),
        (dict(labels=None), "class-conditional \\(labels\\): pass class_labels, integers \\[B\\] in \\[0, 3\\)"),
        (dict(labels=((2,), jnp.float32)), "class_labels must be integers, got dtype float32"),
        (dict(labels=((2, 1), jnp.int32)), "class_labels must be a scalar or have shape \\[B\\] = \\[2\\]"),
    ],
)
def test_bad_condition_shapes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _shapes(SMALL, **kwargs)


def test_bad_condition_values_and_unused_conditions():
    with pytest.raises(ValueError, match="class_labels must be in \\[0, 3\\) \\(num_class_embeds\\), got values from 0 to 3"):
        check_condition(SMALL, jnp.zeros((2, 5, 16)), jnp.array([0, 3]))
    with pytest.raises(ValueError, match="got values from -1 to 1"):
        check_condition(SMALL, jnp.zeros((2, 5, 16)), np.array([-1, 1]))
    ddpm = UNetConfig(block_out_channels=(32,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
    with pytest.raises(ValueError, match="context was given but this U-Net has no cross-attention blocks"):
        check_condition(ddpm, context=jnp.zeros((1, 5, 16)))
    with pytest.raises(ValueError, match="class_labels were given but this U-Net is not class-conditional"):
        check_condition(ddpm, class_labels=jnp.array([0]))
    projection = dataclasses.replace(SMALL, num_class_embeds=None, class_embed_type="projection",
                                     projection_class_embeddings_input_dim=12)  # fmt: skip
    with pytest.raises(ValueError, match="class_labels must be \\[B, 12\\] vectors"):
        check_condition(projection, jnp.zeros((2, 5, 16)), jnp.zeros((2, 10)), batch=2)
    with pytest.raises(ValueError, match="pass class_labels, vectors \\[B, 12\\]"):
        check_condition(projection, jnp.zeros((2, 5, 16)))
    check_condition(SMALL, jnp.zeros((1, 5, 16)), jnp.array([0, 2]), batch=2)  # fine: no error


def test_added_condition_errors():
    """SDXL's text_embeds/time_ids: required by a "text_time" U-Net (called without them: one clear error), their
    widths must fill projection_class_embeddings_input_dim, refused by a U-Net without added conditioning."""
    sdxl = dataclasses.replace(SMALL, num_class_embeds=None, addition_embed_type="text_time", addition_time_embed_dim=4,
                               projection_class_embeddings_input_dim=36)  # 12 + 6·4
    context, pooled, ids = jnp.zeros((2, 5, 16)), jnp.zeros((2, 12)), jnp.zeros((2, 6))
    x, t, context_spec, labels, pooled_spec, ids_spec = sdxl.input_specs(batch=2, context_length=5)
    assert pooled_spec.shape == (2, 12) and ids_spec.shape == (2, 6) and labels is None
    with pytest.raises(ValueError, match="SDXL's added conditioning .*pass text_embeds=.* missing: text_embeds and time_ids"):
        jax.eval_shape(UNet(sdxl).init, jax.random.key(0), x, t, context_spec)
    with pytest.raises(ValueError, match="missing: time_ids$"):
        check_condition(sdxl, context, text_embeds=pooled)
    with pytest.raises(ValueError, match="give 12 \\+ 5·4 = 32 features, but .*projection_class_embeddings_input_dim=36"):
        check_condition(sdxl, context, text_embeds=pooled, time_ids=jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="one B \\(1 or the image batch\\), got shapes \\(2, 12\\) and \\(3, 6\\)"):
        check_condition(sdxl, context, text_embeds=pooled, time_ids=jnp.zeros((3, 6)), batch=2)
    with pytest.raises(ValueError, match="time ids × 4 leave no room for the pooled text embedding"):
        sdxl.input_specs(num_time_ids=9)
    with pytest.raises(ValueError, match="text_embeds/time_ids were given but this U-Net has no added conditioning"):
        check_condition(SMALL, context, jnp.array([0, 1]), time_ids=ids)
    check_condition(sdxl, context, text_embeds=pooled, time_ids=ids, batch=2)  # fine: no error


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(cross_attention_dim=None), "cross-attention blocks need cross_attention_dim"),
        (dict(num_attention_heads=(2, 3)), "divisible by num_attention_heads=\\(2, 3\\) \\(not: \\[\\(64, 3\\)\\]\\)"),
        (dict(num_attention_heads=(2, 2, 2)), "num_attention_heads needs one entry per level \\(2\\)"),
        (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "unsupported mid_block_type"),
        (dict(transformer_layers_per_block=0), "transformer_layers_per_block must be >= 1"),
        (dict(class_embed_type="timestep"), "unsupported class_embed_type 'timestep'"),
        (dict(class_embed_type="projection"), "needs projection_class_embeddings_input_dim"),
        (dict(class_embed_type="projection", projection_class_embeddings_input_dim=4), "not both"),
        (dict(num_class_embeds=0), "num_class_embeds must be >= 1"),
        (dict(addition_embed_type="text"), "unsupported addition_embed_type 'text'"),
        (dict(addition_embed_type="text_time"), "needs addition_time_embed_dim \\(256 in SDXL\\)"),
    ],
)
def test_bad_configs(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMALL, **change)


def test_loader_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="UNet2DModel or UNet2DConditionModel folders, but config.json has _class_name='AutoencoderKL'"):
        load_unet(tmp_path)
    cond = {"_class_name": "UNet2DConditionModel"}
    for change, message in [
        (dict(addition_embed_type="text"), "addition_embed_type='text', not implemented"),
        (dict(only_cross_attention=True), "only_cross_attention=True, not implemented"),
        (dict(conv_in_kernel=1), "conv_in_kernel=1, not implemented"),
        (dict(mid_block_type=None), "mid_block_type=None, not implemented"),
        (dict(class_embed_type="timestep"), "class_embed_type='timestep', not implemented"),
        (dict(cross_attention_dim=[768, 768, 768, 768]), "cross_attention_dim=\\[768, 768, 768, 768\\]: only one int"),
        (dict(down_block_types=["SimpleCrossAttnDownBlock2D"] * 4), "with \\['SimpleCrossAttnDownBlock2D'\\], not implemented"),
    ]:
        with pytest.raises(ValueError, match=message):
            unet_config_from_diffusers(dict(cond, **change))
    assert unet_config_from_diffusers(dict(cond, only_cross_attention=[False] * 4)).has_cross_attention


def test_bfloat16_compute_keeps_float32_params_output_and_maps():
    config = dataclasses.replace(SMALL, dtype=jnp.bfloat16)
    x, t, context, labels, _, _ = config.input_specs(batch=2, context_length=5)
    x = jax.ShapeDtypeStruct((2, 16, 16, 4), jnp.float32)
    params = jax.eval_shape(UNet(config).init, jax.random.key(0), x, t, context, labels)["params"]
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out, maps = jax.eval_shape(
        lambda *a: apply_with_attention_maps(UNet(config), *a), params, x, t, context, labels
    )
    assert out.shape == (2, 16, 16, 4) and out.dtype == jnp.float32
    assert len(maps) == 1 + 1 + 1 + 2 + 2  # one transformer block per Transformer2D here
    assert maps["down_blocks_1/attentions_0/transformer_blocks_0/attn2"].shape == (2, 2, 64, 5)
    assert all(m.dtype == jnp.float32 for m in maps.values())
