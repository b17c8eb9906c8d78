"""Building blocks of the diffusion U-Net, bottom-up.

The DDPM network (Ho et al. 2020, Appendix B) is a U-Net "based on a Wide ResNet" with the
PixelCNN++ backbone: ResNet blocks with GroupNorm, the timestep added to every block through a
sinusoidal (Transformer) embedding, and self-attention at the 16×16 resolution. Stable Diffusion's
U-Net (Rombach et al. 2022) reuses the same blocks and adds cross-attention to text.

Every module here mirrors one diffusers module, and its parameters carry the same names
(``conv1``, ``time_emb_proj``, ``to_q``, …) so that ``ddpm_jax.pretrained.diffusers`` can load diffusers
checkpoints with a plain key mapping:

=====================  ==========================================
ours                   diffusers
=====================  ==========================================
timestep_embedding     embeddings.get_timestep_embedding
TimestepMLP            embeddings.TimestepEmbedding
ResnetBlock            resnet.ResnetBlock2D
Downsample             downsampling.Downsample2D (use_conv=True)
Upsample               upsampling.Upsample2D (use_conv=True)
Attention              attention_processor.Attention (the math)
SpatialSelfAttention   Attention(norm_num_groups=…, residual_connection=True), the U-Net's attention block
GEGLU, FeedForward     activations.GEGLU, attention.FeedForward (activation_fn="geglu")
BasicTransformerBlock  attention.BasicTransformerBlock (norm_type="layer_norm")
Transformer2D          transformers.Transformer2DModel (continuous input), SD's "spatial transformer"
=====================  ==========================================

Arrays are NHWC: ``[B, H, W, C]``. Parameters are float32; ``dtype`` is the computation dtype
(e.g. ``jnp.bfloat16`` on accelerators).
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


# --------------------------------------------------------------------------------------------
# Timestep embedding
# --------------------------------------------------------------------------------------------


def timestep_embedding(
    t: Array,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> Array:
    """Sinusoidal embedding of the timestep (the Transformer's position encoding, Vaswani et al. 2017 §3.5).

    With ``half = dim // 2`` frequencies

        ω_i    = max_period ** (−i / (half − downscale_freq_shift)),     i = 0, …, half − 1
        emb(t) = [sin(t·ω_0), …, sin(t·ω_{half−1}), cos(t·ω_0), …, cos(t·ω_{half−1})]

    ``flip_sin_to_cos=True`` puts the cosines first. The original DDPM code (and the
    google/ddpm-* checkpoints) uses ``downscale_freq_shift=1`` and sines first; Stable Diffusion
    uses ``downscale_freq_shift=0`` and cosines first. An odd ``dim`` gets one zero column.

    Args:
      t: timesteps, shape [B]; integers or floats.
      dim: embedding size.
    Returns:
      float32 array [B, dim].
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / (half - downscale_freq_shift))  # [half]
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)  # [B, 2·half]
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))  # [B, dim]
    return emb


class TimestepMLP(nn.Module):
    """The two-layer MLP on top of the sinusoidal embedding: Dense → SiLU → Dense.

    In the DDPM code this is ``temb = dense1(nonlinearity(dense0(get_timestep_embedding(t))))``,
    with ``features = 4 · ch``. The result is shared by every ResNet block of the U-Net.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: Array) -> Array:
        # emb: [B, D_in] → [B, features]
        emb = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(emb)
        emb = nn.silu(emb)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(emb)


# --------------------------------------------------------------------------------------------
# Group normalization
# --------------------------------------------------------------------------------------------


class GroupNorm(nn.Module):
    """Group normalization (Wu & He 2018, Eqs. 1–3), equal to Flax's ``nn.GroupNorm`` (same parameter names
    ``scale`` γ and ``bias`` β, same numbers to ~1e-6) and to torch's ``GroupNorm``, written so that XLA
    compiles it to two cheap passes over x:

        μ_{b,g}  = mean of x over the positions and the C/G channels of group g          (Eq. 1)
        σ²_{b,g} = E[x²] − μ²_{b,g}                 (clamped at 0; Flax's default fast variance)  (Eq. 2)
        y = γ_c (x − μ_{b,g}) / √(σ²_{b,g} + ε) + β_c = a_{b,c} · x + b_{b,c}          (Eq. 3)
        with a_{b,c} = γ_c / √(σ²_{b,g(c)} + ε) and b_{b,c} = β_c − μ_{b,g(c)} a_{b,c}

    The statistics are per-channel sums over the positions ([B, C]: one contiguous reduction of x and
    x²), then pooled over each group's channels ([B, G]); the output is one multiply-add per element.
    Flax's formulation reduces x reshaped to [B, …, G, C/G] over non-adjacent axes, which XLA:CPU
    compiles to slower loops (benchmarks/README.md, "GroupNorm"). Statistics run in float32 whatever
    ``dtype`` (the output's).
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # x: [B, ..., C] → [B, ..., C]
        channels, groups = x.shape[-1], self.num_groups
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into num_groups={groups} groups; "
                             f"use a num_groups that divides {channels}")
        gamma = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)  # [C]
        beta = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)  # [C]
        x32 = x.astype(jnp.float32)
        positions = tuple(range(1, x.ndim - 1))
        batch = x.shape[0]
        mean_c = jnp.mean(x32, axis=positions)  # [B, C]
        square_c = jnp.mean(jnp.square(x32), axis=positions)  # [B, C]
        mean_g = mean_c.reshape(batch, groups, -1).mean(-1)  # [B, G]
        var_g = jnp.maximum(square_c.reshape(batch, groups, -1).mean(-1) - jnp.square(mean_g), 0.0)  # [B, G]
        per_channel = lambda a: jnp.repeat(a, channels // groups, axis=1)  # [B, G] → [B, C]
        a = per_channel(jax.lax.rsqrt(var_g + self.epsilon)) * gamma  # [B, C]
        b = beta - per_channel(mean_g) * a  # [B, C]
        shape = (batch,) + (1,) * len(positions) + (channels,)  # [B, 1, …, 1, C]
        return (x32 * a.reshape(shape) + b.reshape(shape)).astype(self.dtype)


# --------------------------------------------------------------------------------------------
# Convolutions: ResNet block, down- and up-sampling
# --------------------------------------------------------------------------------------------

# "Same" 3×3 convolution, PyTorch's Conv2d(kernel_size=3, padding=1).
Conv3x3 = functools.partial(nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)))


class ExampleDropout(nn.Module):
    """Dropout (Srivastava et al. 2014, §4: r ~ Bernoulli(1 − rate), ỹ = r ⊙ y, here rescaled by 1/(1 − rate)
    as in Flax and PyTorch) with one mask per example, drawn from that example's own key.

        m_b ~ Bernoulli(1 − rate) elementwise, from fold_in(keys[b], crc32(this module's path))
        y_b = m_b ⊙ x_b / (1 − rate)

    With ``keys`` [B] (typed keys, one per example), example b's mask depends on keys[b] and on which
    dropout layer this is, never on the other examples: a network run once on the whole batch gives
    every example the mask it would get alone. That is what lets the training step call the model once
    on the batch and stay independent of how the batch is split over devices. With ``keys=None`` it is
    Flax's ``nn.Dropout`` on the "dropout" rng collection (one draw for the whole batch).
    """

    rate: float

    @nn.compact
    def __call__(self, x: Array, keys: Array | None = None, *, deterministic: bool) -> Array:
        # x: [B, ...], keys: [B] or None → [B, ...]
        if deterministic or self.rate == 0.0:
            return x
        if keys is None:
            return nn.Dropout(self.rate, deterministic=False)(x)
        if keys.shape != x.shape[:1]:
            raise ValueError(f"dropout_keys must be one key per example, shape [{x.shape[0]}]; got {keys.shape}")
        site = zlib.crc32("/".join(self.scope.path).encode())  # the same number in every run and process
        draw = lambda key: jax.random.bernoulli(jax.random.fold_in(key, site), 1.0 - self.rate, x.shape[1:])
        keep = jax.vmap(draw)(keys)  # [B, ...]
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


class ResnetBlock(nn.Module):
    """The pre-activation ResNet block of the DDPM U-Net (Wide ResNet / PixelCNN++ style).

        h = conv1(SiLU(GroupNorm(x)))
        h = h + Dense(SiLU(temb))                          (timestep conditioning, per channel)
        h = conv2(Dropout(SiLU(GroupNorm(h))))
        out = (shortcut(x) + h) / output_scale_factor

    ``shortcut`` is the identity, or a 1×1 conv when the channel count changes. ``temb=None``
    gives the unconditioned block used by the VAE. ``dropout_keys`` [B]: one dropout key per example
    (``ExampleDropout``); None: the "dropout" rng collection.
    """

    out_channels: int
    num_groups: int = 32
    eps: float = 1e-6
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None, train: bool = False, *,
                 dropout_keys: Array | None = None) -> Array:
        # x: [B, H, W, C_in], temb: [B, D] → [B, H, W, out_channels]
        group_norm = functools.partial(
            GroupNorm, num_groups=self.num_groups, epsilon=self.eps, dtype=self.dtype
        )
        h = nn.silu(group_norm(name="norm1")(x))
        h = Conv3x3(self.out_channels, dtype=self.dtype, name="conv1")(h)  # [B, H, W, C_out]
        if temb is not None:
            temb = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + temb[:, None, None, :]  # [B, 1, 1, C_out] broadcast over H, W
        h = nn.silu(group_norm(name="norm2")(h))
        h = ExampleDropout(self.dropout, name="dropout")(h, dropout_keys, deterministic=not train)
        h = Conv3x3(self.out_channels, dtype=self.dtype, name="conv2")(h)  # [B, H, W, C_out]
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3×3 convolution.

    ``padding=1`` pads one pixel on every side (diffusers' default). ``padding=0`` pads one pixel
    at the bottom and right only, which is what TensorFlow's ``"SAME"`` does for stride 2 and
    therefore what the original DDPM code and the google/ddpm-* checkpoints use.
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # x: [B, H, W, C] → [B, H/2, W/2, out_channels]
        if self.padding not in (0, 1):
            raise ValueError(f"Downsample padding must be 0 or 1, got {self.padding}")
        p = self.padding
        return nn.Conv(
            self.out_channels,
            (3, 3),
            strides=(2, 2),
            padding=((p, 1), (p, 1)),  # (top, bottom), (left, right)
            dtype=self.dtype,
            name="conv",
        )(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour ×2, then a 3×3 convolution."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # x: [B, H, W, C] → [B, 2H, 2W, out_channels]
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        return Conv3x3(self.out_channels, dtype=self.dtype, name="conv")(x)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def attention_probs(q: Array, k: Array, mask: Array | None = None) -> Array:
    """softmax(Q Kᵀ / √d) per head, in float32: the weights each query token gives the S key tokens.

    Args:
      q: [B, T, heads, d]; k: [B, S, heads, d]; mask: boolean broadcastable to [B, heads, T, S],
        False = "may not attend".
    Returns:
      [B, heads, T, S], each row summing to 1.
    """
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])  # [B, heads, T, S]
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
    """softmax(Q Kᵀ / √d) V per head (Vaswani et al. 2017, Eq. 1) as one fused ``jax.nn.dot_product_attention``.

    On a GPU with fp16/bf16 inputs and no mask this is cuDNN's flash attention, which never stores the
    [B, heads, T, S] scores (Stable Diffusion's 64² latents: T = S = 4096); everywhere else (CPU, TPU,
    float32, masks, shapes cuDNN refuses) XLA's implementation. The softmax runs in float32.

    Args:
      q: [B, T, heads, d]; k, v: [B, S, heads, d]; mask: boolean broadcastable to [B, heads, T, S].
    Returns:
      [B, T, heads, d].
    """
    if mask is None and q.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "gpu":
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):  # cuDNN refuses this shape or this GPU
            pass
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, Eq. 1 and §3.2.2).

        Q = x W_q,  K = c W_k,  V = c W_v            (c = context, or x itself for self-attention)
        head_i = softmax(Q_i K_iᵀ / √head_dim) V_i    (one slice of head_dim channels per head)
        out = concat(head_1, …, head_H) W_out

    Self-attention when ``context`` is None; cross-attention otherwise (queries from the image,
    keys and values from e.g. the text encoder, in Stable Diffusion). The context may have any
    feature size: the key/value projections adapt to it.

    With ``sow_attention_probs=True`` and the ``"intermediates"`` collection mutable
    (``module.apply(..., mutable=["intermediates"])``), the probabilities softmax(QKᵀ/√d)
    [B, heads, T, S] are stored under ``intermediates/…/attention_probs`` (Stable Diffusion's
    per-token cross-attention maps). Otherwise nothing is stored and nothing extra is computed.
    """

    query_dim: int  # feature size of x, and of the output
    num_heads: int = 1
    head_dim: int = 64
    use_bias: bool = True  # q/k/v projection biases (True in the DDPM U-Net, False in SD's transformer)
    sow_attention_probs: bool = False  # store softmax(QKᵀ/√d) in "intermediates" when that is mutable
    dtype: Dtype = jnp.float32

    def setup(self):
        inner_dim = self.num_heads * self.head_dim
        projection = functools.partial(nn.Dense, inner_dim, use_bias=self.use_bias, dtype=self.dtype)
        self.to_q = projection()
        self.to_k = projection()
        self.to_v = projection()
        self.to_out_0 = nn.Dense(self.query_dim, dtype=self.dtype)  # diffusers' to_out[0]

    def __call__(self, x: Array, context: Array | None = None, *, mask: Array | None = None) -> Array:
        # x: [B, T, query_dim], context: [B, S, D_ctx] → [B, T, query_dim]
        # mask: optional boolean, broadcastable to [B, heads, T, S]; False = "may not attend" (e.g. the
        # causal mask of CLIP's text transformer, token i sees tokens 0..i only).
        context = x if context is None else context
        batch, tokens, _ = x.shape
        split_heads = lambda a: a.reshape(a.shape[0], a.shape[1], self.num_heads, self.head_dim)
        q = split_heads(self.to_q(x))  # [B, T, heads, head_dim]
        k = split_heads(self.to_k(context))  # [B, S, heads, head_dim]
        v = split_heads(self.to_v(context))  # [B, S, heads, head_dim]
        if self.sow_attention_probs and self.is_mutable_collection("intermediates"):
            probs = attention_probs(q, k, mask)  # [B, heads, T, S]
            self.sow("intermediates", "attention_probs", probs)
            out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)  # [B, T, heads, head_dim]
        else:
            out = dot_product_attention(q, k, v, mask)  # [B, T, heads, head_dim], fused (cuDNN on GPU)
        out = out.reshape(batch, tokens, self.num_heads * self.head_dim)  # [B, T, inner_dim]
        return self.to_out_0(out)


class SpatialSelfAttention(Attention):
    """The U-Net's self-attention block: every pixel attends to every pixel of the feature map.

        out = (x + Attention(GroupNorm(x) as H·W tokens)) / rescale_output_factor

    In Ho et al. it sits after the ResNet blocks at 16×16 and in the middle of the U-Net (one
    head over all channels); diffusers' ``attention_head_dim`` splits it into several heads.
    """

    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    rescale_output_factor: float = 1.0

    def setup(self):
        super().setup()
        self.group_norm = GroupNorm(
            num_groups=self.norm_num_groups, epsilon=self.norm_eps, dtype=self.dtype
        )

    def __call__(self, x: Array) -> Array:
        # x: [B, H, W, C] with C == query_dim
        batch, height, width, channels = x.shape
        tokens = self.group_norm(x).reshape(batch, height * width, channels)  # [B, H·W, C]
        h = super().__call__(tokens).reshape(batch, height, width, channels)  # [B, H, W, C]
        return (x + h) / self.rescale_output_factor


# --------------------------------------------------------------------------------------------
# Stable Diffusion's spatial transformer: self-attention, cross-attention to text, GEGLU MLP
# --------------------------------------------------------------------------------------------


def layer_norm(eps: float = 1e-5, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """PyTorch's LayerNorm: E[(x − μ)²] for the variance (not E[x²] − μ², which cancels badly)."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class GEGLU(nn.Module):
    """The GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer", Eq. 5):

        [a, g] = x W + b          (one Dense to 2 · features, split in halves)
        GEGLU(x) = a ⊙ GELU(g)    (the exact, erf-based GELU, as PyTorch's F.gelu)
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # x: [B, T, D] → [B, T, features]
        a, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return a * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """The transformer's MLP: GEGLU(D → mult·D), then Dense(mult·D → D).

    Named like diffusers' ``ff.net``: ``net_0`` is the GEGLU, ``net_1`` a dropout (0 in Stable
    Diffusion, hence absent here), ``net_2`` the output projection.
    """

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    def setup(self):
        self.net_0 = GEGLU(self.mult * self.dim, self.dtype)
        self.net_2 = nn.Dense(self.dim, dtype=self.dtype)

    def __call__(self, x: Array) -> Array:
        # x: [B, T, D] → [B, T, D]
        return self.net_2(self.net_0(x))


class BasicTransformerBlock(nn.Module):
    """One pre-LayerNorm Transformer block with cross-attention (Rombach et al. 2022, Appendix E.2):

        x = x + SelfAttention(LayerNorm₁(x))                      (pixels attend to pixels)
        x = x + CrossAttention(LayerNorm₂(x), context)           (Q from pixels, K and V from the context)
        x = x + FeedForward(LayerNorm₃(x))                        (GEGLU MLP)

    The q/k/v projections have no bias (diffusers' ``attention_bias=False``). The cross-attention
    (``attn2``) stores its probabilities [B, heads, H·W, L] when "intermediates" is mutable.
    """

    dim: int
    num_heads: int
    head_dim: int
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        # x: [B, T, dim] (T = H·W pixels), context: [B, L, D_ctx] → [B, T, dim]
        attention = functools.partial(
            Attention, self.dim, self.num_heads, self.head_dim, use_bias=False, dtype=self.dtype
        )
        x = x + attention(name="attn1")(layer_norm(self.norm_eps, self.dtype, "norm1")(x))
        x = x + attention(sow_attention_probs=True, name="attn2")(layer_norm(self.norm_eps, self.dtype, "norm2")(x), context)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(layer_norm(self.norm_eps, self.dtype, "norm3")(x))


class Transformer2D(nn.Module):
    """Stable Diffusion's spatial transformer: a feature map attends to itself and to a context.

        h = proj_in(GroupNorm(x))                      1×1 conv, or a Dense on the H·W tokens
        h = BasicTransformerBlock(h, context) × num_layers   on the H·W tokens [B, H·W, heads·head_dim]
        out = x + proj_out(h)

    A 1×1 convolution and a Dense are the same map per pixel; ``use_linear_projection`` only says
    which one the checkpoint stores (SD 1.x: conv, [O, I, 1, 1]; SD 2.x: linear, [O, I]).
    The GroupNorm's epsilon is 1e-6 whatever the U-Net's, as in diffusers.
    """

    num_heads: int
    head_dim: int
    num_layers: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        # x: [B, H, W, C], context: [B, L, D_ctx] → [B, H, W, C]
        batch, height, width, channels = x.shape
        inner_dim = self.num_heads * self.head_dim
        if self.use_linear_projection:
            project = lambda features, name: nn.Dense(features, dtype=self.dtype, name=name)
        else:
            project = lambda features, name: nn.Conv(features, (1, 1), dtype=self.dtype, name=name)
        h = GroupNorm(self.norm_num_groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)  # [B, H, W, C]
        h = project(inner_dim, "proj_in")(h).reshape(batch, height * width, inner_dim)  # [B, H·W, inner]
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                inner_dim, self.num_heads, self.head_dim, dtype=self.dtype, name=f"transformer_blocks_{i}"
            )(h, context)
        h = project(channels, "proj_out")(h.reshape(batch, height, width, inner_dim))  # [B, H, W, C]
        return x + h
