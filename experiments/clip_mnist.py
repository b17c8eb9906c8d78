"""A small CLIP trained contrastively on the 5,000 bundled MNIST digits with measured captions (CPU).

Command::

    ddpm-jax train-clip --config experiments/clip_mnist.py --workdir runs/clip_mnist

Hardware: TBD (measured below).

Expected result: TBD.
"""

import math

import ml_collections

IMAGE_SIZE = 28


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict(dict(
        image_size=IMAGE_SIZE,
        layout="random",      # digits rescaled (0.6–1×) and moved; the captions say how
        seed=0,               # layout and caption templates
        num_held_out=500,     # 50 per class on average, for zero-shot accuracy and recall@k
    ))

    config.tokenizer = ml_collections.ConfigDict(dict(
        path=None,            # None: fit a BPE on the training captions (or a folder from `ddpm-jax train-tokenizer`)
        vocab_size=1000,      # at most; the captions use ~50 words, so most become single tokens
        context_length=32,    # CLIP's is 77; the longest caption here is ~20 tokens
    ))

    config.model = ml_collections.ConfigDict(dict(
        text=ml_collections.ConfigDict(dict(
            vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64,
            eos_token_id=1)),  # vocab_size, eos_token_id, max_position_embeddings: set from the tokenizer
        vision=ml_collections.ConfigDict(dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=7, num_channels=1, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            projection_dim=64)),
        projection_dim=64,
        logit_scale_init_value=math.log(1 / 0.07),  # τ₀ = 0.07 (CLIP §2.5)
    ))

    config.train = ml_collections.ConfigDict(dict(
        batch_size=128,
        num_steps=1000,
        lr=1e-3,
        warmup_steps=100,
        grad_clip=1.0,
        ema_decay=0.99,
        ema_warmup=True,
        seed=0,
        log_every=50,
        ckpt_every=500,
        keep_checkpoints=2,
        plot_every=250,       # the contrastive matrix of 10 held-out pairs
        num_plot=10,
        parallel="jit",
    ))

    config.eval = ml_collections.ConfigDict(dict(
        templates=("a handwritten digit {name}", "the number {digit}", "a handwritten {name}", "the digit {digit}"),
        recall_ks=(1, 5, 10),
    ))
    return config
