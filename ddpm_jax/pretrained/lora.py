"""LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") for Stable Diffusion.

A LoRA adds to a frozen weight W [O, I] a product of two thin matrices (their Eq. 3, h = W₀x + ΔW x = W₀x + BAx,
with ΔW scaled by α/r, §4.1)::

    W' = W + s · (α / r) · B A          A [r, I] ("down"), B [r → O] ("up"), r ≪ min(I, O)

where s is the user's scale (diffusers' ``cross_attention_kwargs={"scale": s}`` / ``set_adapters`` weight, A1111's
``<lora:name:s>``). Several LoRAs add their terms: W' = W + Σ_k s_k (α_k / r_k) B_k A_k. In our layouts (Flax's
kernel is Wᵀ, ``convert.to_flax_layout``) the term is ``down @ up`` with ``down`` = Aᵀ [I, r] and ``up`` =
(α/r) Bᵀ [r, O]; for a convolution (kohya "LoCon", PEFT's Conv2d LoRA) A is a conv [r, I, kh, kw] and B a 1×1 conv
[O, r, 1, 1], so ``down`` [kh, kw, I, r] @ ``up`` [r, O] is a kernel [kh, kw, I, O].

The file formats read (``.safetensors``, or a torch pickle through ``state_dict.read_weights_file``):

* diffusers (``save_lora_weights``): ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (PEFT names), or the older
  ``<module>.lora.down.weight`` / ``lora.up.weight``, ``lora_linear_layer.down/up`` and attention processors'
  ``attn1.processor.to_q_lora.down.weight``; components ``unet.``, ``text_encoder.``, ``text_encoder_2.`` (SDXL);
  α from ``<module>.alpha`` keys or the file's ``lora_adapter_metadata`` (PEFT's ``lora_alpha``,
  ``alpha_pattern``, ``use_rslora``: α/√r), else α = r;
* kohya / A1111 (sd-scripts): ``lora_unet_<module with "_" for ".">.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, ``lora_te_`` (SD v1/2.x's text encoder), ``lora_te1_`` / ``lora_te2_`` (SDXL's two).

Modules are named as the checkpoint names them (diffusers' ``down_blocks.0.attentions.0.proj_in``, transformers'
``text_model.encoder.layers.0.self_attn.q_proj``); the table from those names to our parameter paths is not
written here but read off the model: every kernel's path through the exporter's inverse converters
(``convert.torch_key``, ``transformers_clip.transformers_clip_key``). Refused with one clear error: keys that
match no layer (listed with their count), a LoRA of another architecture (shapes that differ, SDXL components on
SD v1), LyCORIS variants (LoHa, LoKr, DoRA, Tucker ``lora_mid``). kohya's SDXL files name the U-Net's blocks as
the original SGM code does (``lora_unet_input_blocks_4_1_…``): their transformer blocks, samplers, conv_in/out and
time embedding are read through ``compvis.unet_prefixes``; their ResNet layers (``in_layers_2``) are not.

Applying (``StableDiffusion.load_lora`` / ``set_lora_scales`` / ``fuse_lora`` / ``unload_lora``): :func:`merge`
computes W' from W and the factors with the scales s_k a traced argument, inside the compiled sampling program for
the U-Net (one merge per call, before the denoising loop; new scales do not recompile) and in one jitted merge for
the text encoders; ``fuse`` replaces the weights by W' once; the original arrays are kept, so unloading restores
them bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from ddpm_jax.models.unet import UNetConfig
from ddpm_jax.pretrained.compvis import unet_prefixes
from ddpm_jax.pretrained.convert import Params, to_flax_layout, torch_key
from ddpm_jax.pretrained.state_dict import SAFETENSORS_SUFFIX, read_weights_file
from ddpm_jax.pretrained.transformers_clip import transformers_clip_key

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")   # what a LoRA may adapt
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
METADATA_KEY = "lora_adapter_metadata"                   # diffusers' safetensors header entry (PEFT LoraConfigs)
# the factor names of each format → "down" (A) / "up" (B)
_FACTOR_SUFFIX = re.compile(r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|"
                            r"lora_down|lora_up)\.weight$")
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")  # diffusers < 0.22
_NOT_LORA = re.compile(r"(hada_|lokr_|lora_mid|dora_scale|lora_magnitude_vector)")

Factors = dict[str, tuple[jax.Array, jax.Array]]   # our kernel path "a/b/c" → (down [..., I, r], up [r, O])


@dataclasses.dataclass(frozen=True)
class LoRA:
    """One LoRA file mapped onto a pipeline's parameters: per component ("unet", "text_encoder",
    "text_encoder_2"), our kernel path (``"down_blocks_0/attentions_0/…/to_q"``) → (down = Aᵀ [..., I, r],
    up = (α/r) Bᵀ [r, O]); :func:`merge` adds s · down @ up to that kernel."""

    name: str
    source: str
    factors: dict[str, Factors]

    @property
    def num_layers(self) -> int:
        return sum(len(f) for f in self.factors.values())


# ------------------------------------------------------------------------------------------------
# Names: checkpoint modules ↔ our kernels
# ------------------------------------------------------------------------------------------------

def module_names(params: Params, component: str) -> dict[str, str]:
    """{a layer's module name in the checkpoint's layout: our kernel's parent path "a/b/c"} for every Dense/Conv
    kernel of ``params``: the U-Net's in diffusers' names (``down_blocks.0.attentions.0.proj_in``), a text encoder's
    in transformers' (``text_model.encoder.layers.0.self_attn.q_proj``; a bare CLIPTextModel's both with the
    ``text_model.`` prefix of transformers v4 and kohya and without it, as transformers v5 names its modules).
    Built with the exporter's inverse key converters."""
    names = {}
    for path in traverse_util.flatten_dict(params):
        if path[-1] != "kernel":
            continue
        key = torch_key(path).removesuffix(".weight")
        if component != "unet":
            key = transformers_clip_key(key + ".").removesuffix(".")
            if "text_model" not in params:
                names["text_model." + key] = "/".join(path[:-1])
        names[key] = "/".join(path[:-1])
    return names


def _split_key(key: str) -> tuple[str, str, str] | None:
    """A LoRA file key → (component, module name as the checkpoint names it, "down" | "up" | "alpha"), the kohya
    module name with "_" for "." (resolved later); None for a key that is not one of the formats'."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            module, _, part = key[len(prefix):].partition(".")
            kind = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
            return (component, "kohya:" + module, kind) if kind else None
    component = next((c for c in COMPONENTS if key.startswith(c + ".")), "unet")  # no prefix: diffusers' attn procs
    key = key.removeprefix(component + ".")
    if old := _OLD_PROCESSOR.search(key):
        module = key[:old.start()] + "." + ("to_out.0" if old[1] == "to_out" else old[1])
        return component, module, old[2]
    if key.endswith(".alpha"):
        return component, key.removesuffix(".alpha"), "alpha"
    if factor := _FACTOR_SUFFIX.search(key):
        return component, key[:factor.start()], "down" if factor[1].endswith(("A", "down")) else "up"
    return None


def _peft_alphas(path: Path) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata`` (a safetensors header entry): {component: its PEFT LoraConfig dict}."""
    if path.suffix != SAFETENSORS_SUFFIX:
        return {}
    with safe_open(path, "np") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _peft_scale(config: Mapping[str, Any], module: str, rank: int) -> float | None:
    """α/r (α/√r with ``use_rslora``) from a PEFT LoraConfig, ``alpha_pattern`` matched as PEFT does; None: no α."""
    if not config or "lora_alpha" not in config:
        return None
    if config.get("use_dora"):
        raise ValueError("this LoRA is a DoRA (use_dora=True): weight-decomposed LoRA is not implemented")
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def sgm_module_names(unet_names: Mapping[str, str], config: UNetConfig) -> dict[str, str]:
    """{a U-Net layer's name in the original (CompVis / SGM) blocks: our kernel path}, from the diffusers names
    and ``compvis.unet_prefixes`` (``down_blocks.1.attentions.0.`` ↔ ``input_blocks.4.1.``): what kohya's SDXL
    LoRAs use (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``). Inside the blocks the names are
    diffusers' except in a ResNet (``in_layers.2`` for ``conv1``), whose layers this does not name."""
    names = {}
    for compvis, diffusers in unet_prefixes(config).items():
        for module, path in unet_names.items():
            if (module + ".").startswith(diffusers) and ".resnets." not in diffusers:
                names[(compvis + module[len(diffusers):]).rstrip(".")] = path
    return names


def read_lora(path: str | Path, targets: Mapping[str, Params], name: str | None = None,
              unet_config: UNetConfig | None = None) -> LoRA:
    """A LoRA file (diffusers or kohya format, see the module docstring) → :class:`LoRA` for the pipeline whose
    parameters are ``targets`` ({"unet": …, "text_encoder": …, "text_encoder_2": … (SDXL)}); with the U-Net's
    ``unet_config`` kohya's SGM block names (SDXL) are read too (:func:`sgm_module_names`).

    Raises one-line ValueErrors: keys that match no layer (their count and the first few), an architecture
    mismatch (components the pipeline lacks; factors whose shapes do not fit the kernels), a factor without its
    pair, a LyCORIS variant.
    """
    path = Path(path)
    state = read_weights_file(path)
    peft = _peft_alphas(path)
    label = f"LoRA {path.name}"
    if not state:
        raise ValueError(f"{label} holds no tensors")
    if bad := sorted(k for k in state if _NOT_LORA.search(k)):
        raise ValueError(f"{label} is a LyCORIS/DoRA variant (e.g. {bad[0]}), not a plain LoRA: not implemented")
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key, array in state.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
        else:
            parts.setdefault(split[:2], {})[split[2]] = np.asarray(array, np.float32)
    absent = sorted({c for c, _ in parts} - set(targets))
    if absent:
        raise ValueError(f"{label} adapts {', '.join(absent)}, which this pipeline does not have (components: "
                         f"{', '.join(sorted(targets))}): a LoRA for another architecture (an SDXL LoRA on SD v1/2.x?)")
    names = {c: module_names(targets[c], c) for c in {c for c, _ in parts}}
    kohya = {c: {m.replace(".", "_"): m for m in names[c]} for c in names}   # kohya's flat name → the module name
    if "unet" in names and unet_config is not None:                          # + the SGM names (kohya's SDXL)
        sgm = sgm_module_names(names["unet"], unet_config)
        names["unet"] |= sgm
        kohya["unet"] |= {m.replace(".", "_"): m for m in sgm}
    factors: dict[str, Factors] = {}
    misshaped = []
    for (component, module), part in sorted(parts.items()):
        if module.startswith("kohya:"):
            module = kohya[component].get(module.removeprefix("kohya:"), module)
        if module not in names[component]:
            unknown += [f"{component}.{module}.{kind}" for kind in part]
            continue
        if "down" not in part or "up" not in part:
            raise ValueError(f"{label}: {component}.{module} has {'/'.join(sorted(part))} but not both factors (down, up)")
        down, up = part["down"], part["up"]                                  # A [r, I(, kh, kw)], B [O, r(, 1, 1)]
        rank = down.shape[0]
        scale = (float(part["alpha"]) / rank if "alpha" in part
                 else _peft_scale(peft.get(component, {}), module, rank) or 1.0)     # α/r; α = r when not given
        target_path = names[component][module]
        kernel = traverse_util.flatten_dict(targets[component])[tuple(target_path.split("/")) + ("kernel",)]
        down_f = to_flax_layout(down, "kernel")                               # [I, r] or [kh, kw, I, r]
        if up.ndim == 4 and up.shape[2:] != (1, 1) or up.ndim not in (2, 4) or up.shape[1] != rank:
            misshaped.append(f"{component}.{module} up {tuple(up.shape)} (rank {rank})")
            continue
        up_f = scale * up.reshape(up.shape[:2]).T                             # (α/r) Bᵀ [r, O]
        delta_shape = (*down_f.shape[:-1], up_f.shape[1])
        if delta_shape != tuple(kernel.shape):
            misshaped.append(f"{component}.{module} gives {delta_shape}, the model's kernel is {tuple(kernel.shape)}")
            continue
        factors.setdefault(component, {})[target_path] = (jnp.asarray(down_f, kernel.dtype), jnp.asarray(up_f, kernel.dtype))
    if unknown:
        raise ValueError(f"{label}: {len(unknown)} keys match no layer of this pipeline, e.g. "
                         f"{', '.join(sorted(unknown)[:4])} (a LoRA for another model, or an unknown format)")
    if misshaped:
        raise ValueError(f"{label} does not fit this model ({len(misshaped)} layers of another shape, e.g. "
                         f"{misshaped[0]}): a LoRA for another architecture")
    return LoRA(name or path.stem, str(path), factors)


# ------------------------------------------------------------------------------------------------
# Applying
# ------------------------------------------------------------------------------------------------

def merge(params: Params, factors: Sequence[Factors], scales: jax.Array) -> Params:
    """W' = W + Σ_k s_k · down_k @ up_k (Hu et al. 2022 Eq. 3, α/r folded into up_k) for every kernel adapted by
    one of ``factors`` (one dict per LoRA); ``scales`` [K] the s_k (traceable). The sum is taken in float32 and
    cast to W's dtype once; kernels no LoRA adapts are returned as they are (the same arrays)."""
    if not factors:
        return params
    flat = traverse_util.flatten_dict(params)
    deltas: dict[tuple[str, ...], jax.Array] = {}
    for k, adapter in enumerate(factors):
        for parent, (down, up) in adapter.items():
            path = tuple(parent.split("/")) + ("kernel",)
            delta = scales[k] * jnp.matmul(down.astype(jnp.float32), up.astype(jnp.float32))   # [..., I, O]
            deltas[path] = deltas[path] + delta if path in deltas else delta
    for path, delta in deltas.items():
        flat[path] = (flat[path].astype(jnp.float32) + delta).astype(flat[path].dtype)
    return traverse_util.unflatten_dict(flat)


merge_jit = jax.jit(merge)


@dataclasses.dataclass
class LoRASet:
    """The LoRAs loaded into a pipeline, in load order, with their scales; ``fused``: the original parameters
    while the LoRAs are merged into the pipeline's (``StableDiffusion.fuse_lora``), else None."""

    loras: dict[str, LoRA] = dataclasses.field(default_factory=dict)
    scales: dict[str, float] = dataclasses.field(default_factory=dict)
    fused: dict[str, Params] | None = None

    def add(self, lora: LoRA, scale: float) -> None:
        if lora.name in self.loras:
            raise ValueError(f"a LoRA named {lora.name!r} is loaded already; pass another name= or unload it first")
        self.loras[lora.name], self.scales[lora.name] = lora, float(scale)

    def set_scales(self, scales: Mapping[str, float]) -> None:
        if unknown := sorted(set(scales) - set(self.loras)):
            raise ValueError(f"no LoRA named {', '.join(map(repr, unknown))}; loaded: {', '.join(self.loras) or 'none'}")
        self.scales.update({name: float(s) for name, s in scales.items()})

    def remove(self, name: str | None) -> None:
        if name is None:
            self.loras.clear(), self.scales.clear()
        elif name not in self.loras:
            raise ValueError(f"no LoRA named {name!r}; loaded: {', '.join(self.loras) or 'none'}")
        else:
            del self.loras[name], self.scales[name]

    def traced(self, component: str) -> tuple[tuple[Factors, ...], jax.Array]:
        """(the factors of ``component`` per LoRA, their scales [K] float32): :func:`merge`'s arguments, empty while
        fused. The factors' structure decides the compiled program; the scales are a traced value."""
        if self.fused is not None:
            return (), jnp.zeros((0,), jnp.float32)
        names = [n for n in self.loras if component in self.loras[n].factors]
        return (tuple(self.loras[n].factors[component] for n in names),
                jnp.asarray([self.scales[n] for n in names], jnp.float32))

    def apply(self, params: Params, component: str) -> Params:
        """``params`` of ``component`` with the on-the-fly LoRAs merged (the jitted :func:`merge`)."""
        factors, scales = self.traced(component)
        return merge_jit(params, factors, scales) if factors else params


__all__ = ["COMPONENTS", "KOHYA_PREFIXES", "LoRA", "LoRASet", "METADATA_KEY", "merge", "merge_jit", "module_names",
           "read_lora", "sgm_module_names"]
