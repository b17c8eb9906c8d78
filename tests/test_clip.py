"""CLIP (models/clip.py, pretrained/transformers_clip.py) against transformers' PyTorch CLIP, the reference.

Tiny random transformers models (seeded, every weight perturbed so no LayerNorm is trivially 1/0)
are saved to tmp_path and loaded with our loaders; outputs must match to ≤ 1e-4.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from ddpm_jax.models.clip import (  # noqa: E402
    CLIPTextModelWithProjection,
    CLIPTextTransformer,
    CLIPVisionTransformer,
    pooled_token_index,
)
from ddpm_jax.objectives import clip_loss, contrastive_logits  # noqa: E402
from ddpm_jax.pretrained.transformers_clip import load_clip, load_clip_text, load_clip_vision  # noqa: E402

TOL = 1e-4
VOCAB = 99
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=8, bos_token_id=97, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=8,
              patch_size=4, num_channels=3, projection_dim=8)


def _perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(2.3)
            else:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _save(model, folder):
    model.save_pretrained(folder)
    return folder


def _ids(eos_token_id):
    """Two prompts: start token, content, end token, padding. The largest id (98) sits in the content
    of row 0, so argmax pooling (legacy) and first-EOS pooling pick different positions."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 90, size=(2, 12))
    ids[:, 0] = 97
    ids[0, 3] = 98
    ids[0, 7:] = eos_token_id  # end token at 7, then padding with end tokens (SD 1.x convention)
    ids[1, 10] = eos_token_id
    ids[1, 11] = 1
    return ids


def _close(ours, theirs):
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape
    err = float(np.abs(ours - theirs).max())
    assert err <= TOL, err


@pytest.mark.parametrize(
    "eos_token_id, hidden_act", [(60, "gelu"), (2, "quick_gelu")], ids=["first-eos", "legacy-argmax"]
)
def test_text_model_matches_transformers(tmp_path, eos_token_id, hidden_act):
    config = transformers.CLIPTextConfig(**TEXT, eos_token_id=eos_token_id, hidden_act=hidden_act)
    reference = _perturb(transformers.CLIPTextModel(config), seed=1)
    module, params = load_clip_text(_save(reference, tmp_path / "text"))
    assert isinstance(module, CLIPTextTransformer)

    ids = _ids(60)
    with torch.no_grad():
        expected = reference(torch.tensor(ids), output_hidden_states=True)
    out = module.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    _close(out.last_hidden_state, expected.last_hidden_state)
    _close(out.hidden_states[-2], expected.hidden_states[-2])  # penultimate layer ("clip skip")
    assert len(out.hidden_states) == len(expected.hidden_states) == 3
    _close(out.pooled, expected.pooler_output)
    # the two conventions really differ on these ids: row 0 pools at 7 (first EOS) or 3 (argmax)
    assert int(pooled_token_index(jnp.asarray(ids), eos_token_id)[0]) == (7 if eos_token_id == 60 else 3)


def test_text_model_old_layout_and_projection(tmp_path):
    """SD checkpoints (saved by transformers v4) prefix keys with text_model. and keep position_ids."""
    config = transformers.CLIPTextConfig(**TEXT, eos_token_id=60)
    reference = _perturb(transformers.CLIPTextModel(config), seed=2)
    folder = _save(reference, tmp_path / "text")
    state = load_file(folder / "model.safetensors")
    state = {f"text_model.{k}": v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    save_file(state, folder / "model.safetensors")
    module, params = load_clip_text(folder)
    ids = _ids(60)
    with torch.no_grad():
        expected = reference(torch.tensor(ids))
    _close(module.apply({"params": params}, jnp.asarray(ids)).last_hidden_state, expected.last_hidden_state)

    # SDXL's text_encoder_2 (OpenCLIP ViT-bigG in transformers' layout): GELU, the legacy eos_token_id 2 (argmax
    # pooling), text_projection W_t (no bias) on the pooled output; SDXL reads embeds and hidden_states[-2].
    bigg = transformers.CLIPTextConfig(**TEXT, eos_token_id=2, hidden_act="gelu")
    with_projection = _perturb(transformers.CLIPTextModelWithProjection(bigg), seed=3)
    module, params = load_clip_text(_save(with_projection, tmp_path / "projection"))
    assert isinstance(module, CLIPTextModelWithProjection)
    with torch.no_grad():
        expected = with_projection(torch.tensor(ids), output_hidden_states=True)
    out = module.apply({"params": params}, jnp.asarray(ids))
    _close(out.embeds, expected.text_embeds)
    _close(out.last_hidden_state, expected.last_hidden_state)
    _close(out.hidden_states[-2], expected.hidden_states[-2])
    assert "bias" not in params["text_projection"]


def test_text_model_variant_file(tmp_path):
    """variant="fp16" reads model.fp16.safetensors (diffusers' variant names, as SD's text_encoder/ ships);
    the plain model.safetensors next to it is not read, and a missing variant file is named."""
    config = transformers.CLIPTextConfig(**TEXT, eos_token_id=60)
    folder = _save(_perturb(transformers.CLIPTextModel(config), seed=4), tmp_path / "text")
    state = load_file(folder / "model.safetensors")
    save_file({k: v.astype(np.float16) for k, v in state.items()}, folder / "model.fp16.safetensors")
    plain_module, plain = load_clip_text(folder)
    module, half = load_clip_text(folder, variant="fp16")
    assert module == plain_module
    assert jax.tree.structure(half) == jax.tree.structure(plain)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(half))  # converted to the model's dtype
    fp16_rounding = jax.tree.map(lambda a: a.astype(jnp.float16).astype(jnp.float32), plain)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(half), jax.tree.leaves(fp16_rounding)))
    assert any(not bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(half), jax.tree.leaves(plain)))
    ids = jnp.asarray(_ids(60))
    np.testing.assert_allclose(module.apply({"params": half}, ids).last_hidden_state,
                               plain_module.apply({"params": plain}, ids).last_hidden_state, atol=2e-2)
    with pytest.raises(FileNotFoundError, match=r"no model\.non_ema\.safetensors \(or \.bin\)"):
        load_clip_text(folder, variant="non_ema")


def test_vision_model_matches_transformers(tmp_path):
    reference = _perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)), seed=4)
    module, params = load_clip_vision(_save(reference, tmp_path / "vision"))
    assert isinstance(module, CLIPVisionTransformer)
    images = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)  # NCHW for torch
    with torch.no_grad():
        expected = reference(torch.tensor(images), output_hidden_states=True)
    out = module.apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)))  # NHWC for us
    _close(out.last_hidden_state, expected.last_hidden_state)
    _close(out.hidden_states[0], expected.hidden_states[0])
    _close(out.hidden_states[-2], expected.hidden_states[-2])
    _close(out.pooled, expected.pooler_output)


def test_clip_model_logits_and_loss_match_transformers(tmp_path):
    config = transformers.CLIPConfig(
        text_config={**TEXT, "eos_token_id": 60}, vision_config=VISION, projection_dim=8
    )
    reference = _perturb(transformers.CLIPModel(config), seed=5)
    module, params = load_clip(_save(reference, tmp_path / "clip"))
    ids = _ids(60)
    images = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), pixel_values=torch.tensor(images), return_loss=True)
    out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(images.transpose(0, 2, 3, 1)))
    _close(out.logits_per_image, expected.logits_per_image)
    _close(out.logits_per_text, expected.logits_per_text)
    _close(clip_loss(out.image_embeds, out.text_embeds, params["logit_scale"]), expected.loss)


def _numpy_clip_loss(image, text, logit_scale):
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    logits = min(np.exp(logit_scale), 100.0) * image @ text.T
    n = len(logits)
    loss_i = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i, i] for i in range(n)])
    loss_t = np.mean([np.log(np.exp(logits[:, j]).sum()) - logits[j, j] for j in range(n)])
    return (loss_i + loss_t) / 2


@pytest.mark.parametrize("logit_scale", [np.log(1 / 0.07), 5.0])  # 5.0: exp(5) = 148 is clipped to 100
def test_clip_loss_against_numpy(logit_scale):
    rng = np.random.default_rng(3)
    image, text = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    ours = clip_loss(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32), jnp.float32(logit_scale))
    np.testing.assert_allclose(float(ours), _numpy_clip_loss(image, text, logit_scale), rtol=1e-5)
    grad = jax.grad(clip_loss, argnums=2)(jnp.asarray(image), jnp.asarray(text), jnp.float32(logit_scale))
    assert (float(grad) == 0.0) == (logit_scale > np.log(100))  # no gradient past the clip
    # matching pairs that are perfectly aligned and far from the rest give a loss near zero
    aligned = np.eye(5)
    assert float(clip_loss(jnp.asarray(aligned), jnp.asarray(aligned), jnp.float32(np.log(100)))) < 1e-3
    logits = contrastive_logits(jnp.asarray(image), jnp.asarray(text), jnp.float32(logit_scale))
    assert logits.shape == (5, 5)


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"CLIPTextModel.*BertModel"):
        load_clip_text(bert)
    with pytest.raises(ValueError, match=r"CLIPVisionModel.*BertModel"):
        load_clip_vision(bert)
    with pytest.raises(ValueError, match=r"CLIPModel.*BertModel"):
        load_clip(bert)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip_text(tmp_path / "nowhere")

    folder = _save(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)), tmp_path / "text")
    state = load_file(folder / "model.safetensors")
    del state["final_layer_norm.bias"]
    state["encoder.layers.0.mlp.fc1.weight"] = state["encoder.layers.0.mlp.fc1.weight"][:5]
    state["encoder.layers.0.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError) as info:
        load_clip_text(folder)
    message = str(info.value)
    assert "final_layer_norm/bias" in message and "missing" in message
    assert "encoder.layers.0.extra.weight" in message and "unexpected" in message
    assert "fc1.weight" in message and "wrong shape" in message


def test_checkpoint_of_another_clip_tower_is_rejected(tmp_path):
    """A vision tower given to the text loader (and vice versa) names what was found; a text config over
    vision weights lists the missing and unexpected keys."""
    vision = _save(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)), tmp_path / "vision")
    text = _save(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)), tmp_path / "text")
    with pytest.raises(ValueError, match=r"load_clip_text reads a transformers CLIPTextModel.*CLIPVisionModel"):
        load_clip_text(vision)
    with pytest.raises(ValueError, match=r"load_clip_vision reads a transformers CLIPVisionModel.*CLIPTextModel"):
        load_clip_vision(text)
    with pytest.raises(ValueError, match=r"load_clip reads a transformers CLIPModel.*CLIPTextModel"):
        load_clip(text)
    (vision / "config.json").write_text((text / "config.json").read_text())  # text config, vision weights
    with pytest.raises(ValueError) as info:
        load_clip_text(vision)
    assert "missing" in str(info.value) and "unexpected" in str(info.value)
