"""Tests for evaluation/inception.py and pretrained/torch_pickle.py: parity with pytorch-fid's FID Inception on random
weights (loaded from both torch.save formats and safetensors), the bilinear resize, the weights errors."""

import pickle
import warnings

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ddpm_jax.pretrained import torch_pickle
from ddpm_jax.evaluation import inception as inc

pfi = pytest.importorskip("pytorch_fid.inception")


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """He-scaled convs and random BatchNorm statistics, so activations stay O(1) through all 94 convs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            out[key] = value
        elif key.endswith("conv.weight"):
            out[key] = torch.randn(value.shape, generator=g) * (2.0 / np.prod(value.shape[1:])) ** 0.5
        elif key == "fc.weight":
            out[key] = torch.randn(value.shape, generator=g) / value.shape[1] ** 0.5
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=g) * 1.5 + 0.5
        elif key.endswith("bn.weight"):
            out[key] = torch.rand(value.shape, generator=g) + 0.5
        else:  # bn.bias, running_mean, fc.bias
            out[key] = torch.randn(value.shape, generator=g) * 0.1
    return out


@pytest.fixture(scope="module")
def torch_fid_inception():
    """pytorch-fid's InceptionV3 (all four output blocks) and its fc, built by pytorch-fid itself with the
    weight download replaced by a random state dict of the very model being built."""
    built = []
    original = pfi._inception_v3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "_inception_v3", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
        mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: random_state_dict(built[-1]))
        model = pfi.InceptionV3(output_blocks=(0, 1, 2, 3)).eval()
    return model, built[-1].fc, built[-1].state_dict()


@pytest.fixture(scope="module")
def weight_files(torch_fid_inception, tmp_path_factory):
    _, _, state_dict = torch_fid_inception
    folder = tmp_path_factory.mktemp("inception")
    files = {"zip": folder / "zip.pth", "legacy": folder / "legacy.pth", "safetensors": folder / "w.safetensors"}
    torch.save(state_dict, files["zip"])
    torch.save(state_dict, files["legacy"], _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, files["safetensors"])
    return files


@pytest.fixture(scope="module")
def jax_inception(weight_files):
    return inc.load_inception(weight_files["zip"])


# --------------------------------------------------------------------------------------------
# torch_pickle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_pickle_reads_both_formats(tmp_path, zip_format):
    """dtypes, 0-d, empty, non-contiguous (transposed), offset views and shared storages, nested containers."""
    shared = torch.randn(20, dtype=torch.float64)
    obj = {
        "f32": torch.randn(3, 4), "i64": torch.arange(10)[2:7], "transposed": torch.randn(5, 6).t(),
        "scalar": torch.tensor(3), "f16": torch.randn(4).half(), "bf16": torch.randn(4).bfloat16(),
        "bool": torch.tensor([True, False]), "u8": torch.arange(5, dtype=torch.uint8), "empty": torch.zeros(0, 3),
        "view_a": shared[:5], "view_b": shared[5:].view(3, 5), "param": torch.nn.Parameter(torch.randn(2)),
        "nested": {"list": [torch.ones(2), 7, "text"], "tuple": (1.5, None)}, "step": 42,
    }
    path = tmp_path / "x.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    got = torch_pickle.load(path)
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            ref = value.detach().float().numpy() if value.dtype == torch.bfloat16 else value.detach().numpy()
            array = got[key].astype(np.float32) if key == "bf16" else got[key]
            assert isinstance(array, np.ndarray) and array.dtype == ref.dtype and array.shape == ref.shape, key
            np.testing.assert_array_equal(array, ref, err_msg=key)
    np.testing.assert_array_equal(got["nested"]["list"][0], np.ones(2, np.float32))
    assert got["nested"]["list"][1:] == [7, "text"] and got["nested"]["tuple"] == (1.5, None) and got["step"] == 42


def test_torch_pickle_refuses_code_and_handles_checkpoints(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save(model, tmp_path / "module.pth")  # a whole pickled nn.Module: would run torch code
    with pytest.raises(pickle.UnpicklingError, match="torch.nn.modules.container.Sequential"):
        torch_pickle.load(tmp_path / "module.pth")
    # a Lightning-style checkpoint: the state dict under "state_dict", next to foreign objects
    torch.save({"state_dict": model.state_dict(), "global_step": 3, "callbacks": {"x": torch.nn.ReLU()}},
               tmp_path / "model.ckpt", _use_new_zipfile_serialization=False)
    state = torch_pickle.load_state_dict(tmp_path / "model.ckpt")
    assert sorted(state) == sorted(model.state_dict())
    np.testing.assert_array_equal(state["0.weight"], model.state_dict()["0.weight"].numpy())
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="neither a torch.save zip archive nor a legacy torch pickle"):
        torch_pickle.load(tmp_path / "junk.pth")


def test_torch_pickle_converter_command(tmp_path):
    from safetensors.numpy import load_file

    state = {"a.weight": torch.randn(2, 3), "a.bias": torch.randn(2)}
    torch.save(state, tmp_path / "s.pth", _use_new_zipfile_serialization=False)
    torch_pickle.main([str(tmp_path / "s.pth"), str(tmp_path / "s.safetensors")])
    got = load_file(tmp_path / "s.safetensors")
    for key, value in state.items():
        np.testing.assert_array_equal(got[key], value.numpy())


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (23, 41), (310, 300)])
def test_resize_matches_torch_bilinear(size):
    """Up- and down-sampling, non-square: equal to F.interpolate(bilinear, align_corners=False)."""
    x = np.random.default_rng(0).uniform(-1, 1, (2, *size, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(inc.resize_bilinear(x, 299, 299)), ref, atol=2e-6)


def test_all_weight_formats_load_identically(weight_files, jax_inception):
    leaves = jax.tree_util.tree_leaves_with_path(jax_inception.variables)
    assert {path[0].key for path, _ in leaves} == {"params", "batch_stats"}
    for fmt in ("legacy", "safetensors"):
        other = inc.load_inception(weight_files[fmt])
        for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(other.variables)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{fmt} {jax.tree_util.keystr(path)}")
    assert jax_inception.weights.startswith("zip.pth (sha256 ")


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (2, 23, 41, 3)])
def test_parity_with_pytorch_fid(torch_fid_inception, jax_inception, shape):
    """Blocks 0–2, pool3 and logits of pytorch-fid's InceptionV3 (input in [0, 1], resized to 299) ≤ 1e-4."""
    model, fc, _ = torch_fid_inception
    x = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)  # ours: [-1, 1] NHWC
    with torch.no_grad():
        blocks = model(torch.from_numpy((x + 1) / 2).permute(0, 3, 1, 2))  # pytorch-fid's: [0, 1] NCHW
        logits = fc(blocks[3].flatten(1))
        unbiased = blocks[3].flatten(1) @ fc.weight.T
    names = ("block_0", "block_1", "block_2", "pool3", "logits", "logits_unbiased")
    ours = jax_inception.outputs(x, names=names, progress=False)
    refs = [b.permute(0, 2, 3, 1).numpy() for b in blocks[:3]] + [blocks[3].flatten(1).numpy(), logits.numpy(),
                                                                  unbiased.numpy()]
    for name, ref in zip(names, refs):
        assert ref.std() > 0.1, f"{name}: random weights gave degenerate activations"
        np.testing.assert_allclose(ours[name], ref, atol=1e-4, rtol=0, err_msg=name)
    np.testing.assert_allclose(jax_inception.features(x, progress=False), refs[3], atol=1e-4, rtol=0)
    np.testing.assert_allclose(jax_inception.logits(x, bias=True, progress=False), refs[4], atol=1e-4, rtol=0)


def test_batching_and_grayscale(jax_inception):
    """A zero-padded last batch changes nothing; grayscale = its RGB repetition (all batches of 2: one compile)."""
    x = np.random.default_rng(2).uniform(-1, 1, (3, 16, 16, 1)).astype(np.float32)
    padded = jax_inception.features(x, batch_size=2, progress=False)  # batches [0, 1] and [2, pad]
    full = np.concatenate([jax_inception.features(x[:2], progress=False),
                           jax_inception.features(x[1:], progress=False)])
    np.testing.assert_allclose(padded, full[[0, 1, 3]], atol=1e-5)
    np.testing.assert_allclose(jax_inception.features(np.repeat(x, 3, -1), batch_size=2, progress=False), padded,
                               atol=1e-6)


# --------------------------------------------------------------------------------------------
# Input checks and weights errors
# --------------------------------------------------------------------------------------------


def test_bad_images_raise():
    ok = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match=r"dtype uint8.*/ 127.5 - 1"):
        inc.check_images(ok.astype(np.uint8))
    with pytest.raises(ValueError, match=r"values in \[0, 255\].*expected \[-1, 1\].*x / 127.5 - 1"):
        inc.check_images(np.stack([np.zeros((8, 8, 3)), np.full((8, 8, 3), 255.0)]))
    with pytest.raises(ValueError, match=r"values in \[-1.5, 1.5\].*np.clip"):
        inc.check_images(np.linspace(-1.5, 1.5, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3))
    inc.check_images(ok + np.linspace(-1.05, 1.05, 8)[None, :, None, None])  # slight overshoot is tolerated
    with pytest.raises(ValueError, match=r"NHWC \[N, H, W, 1 or 3\], got shape \(2, 3, 8, 8\)"):
        inc.check_images(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        inc.check_images(np.full((1, 8, 8, 3), np.nan, np.float32))
    with pytest.warns(RuntimeWarning, match=r"all images values are >= 0.*\[0, 1\]\?.*2 \* x - 1"):
        inc.check_images(np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inc.check_images(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)))


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    default = tmp_path / ".cache" / "ddpm_jax" / inc.WEIGHTS_FILE
    assert inc.default_weights_path() == default
    with pytest.raises(FileNotFoundError, match=rf"not found at {default}.*download {inc.WEIGHTS_URL}.*"
                                                rf"put it at {default}.*DDPM_JAX_INCEPTION"):
        inc.load_inception()
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(tmp_path / "elsewhere.pth"))
    assert inc.default_weights_path() == tmp_path / "elsewhere.pth"
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        inc.load_inception()


def test_hash_in_name_is_checked(weight_files, tmp_path):
    fake = tmp_path / inc.WEIGHTS_FILE  # random weights under the original's name
    fake.write_bytes(weight_files["legacy"].read_bytes())
    with pytest.raises(ValueError, match="not 6726825d.*corrupt or not the original"):
        inc.load_inception(fake)


def test_mismatched_state_dict_lists_keys(torch_fid_inception, tmp_path):
    _, _, state_dict = torch_fid_inception
    state = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)  # torchvision's aux head, not part of the FID net
    state["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 1, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"(?s)missing.*params/fc/bias.*unexpected.*AuxLogits.*wrong shape.*Conv2d_1a"):
        inc.load_inception(tmp_path / "bad.pth")
