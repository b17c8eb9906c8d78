"""Contrastive training of a small CLIP on captioned digits, and its zero-shot / retrieval evaluation.

CLIP (Radford et al. 2021, §2.3, Figure 3): for a batch of N (image, caption) pairs, embed the images
with the vision transformer and the captions with the text transformer, and train both so that each
image is most similar to its own caption among the N captions, and each caption to its own image
(``objectives.clip_loss``, the symmetric InfoNCE loss with a learned, clipped temperature).

Here the pairs are ``data.load_captioned_digits``: the bundled MNIST digits, randomly scaled and
placed, with captions measured from the pixels ("a thick, slanted seven", "the number 7 written
small in the top left"). The tokenizer is a small BPE fitted on the training captions
(``tokenizer.train_tokenizer``) unless ``config.tokenizer.path`` names a folder.

The loop is the one every trainer shares (``training.loop.run``: resume, NaN stop, metrics.jsonl,
checkpoints, hooks); the state is ``training.loop.TrainState`` (step, params, EMA params, Adam state);
the step is one ``jax.jit`` over the device mesh, the global batch sharded along "data" — the loss
needs all N×N similarities, which the sharded jit computes over the *global* batch (XLA gathers the
embeddings), so the result does not depend on the number of devices. (A pmap step would have to
``all_gather`` the embeddings itself; it is not offered.)

Evaluation on held-out digits (``eval.json``):

* **zero-shot accuracy**: classify each image as the digit d whose prompt embedding, averaged over
  templates ("a handwritten digit {name}", "the number {digit}", …), is most similar (§3.1.4, with
  its prompt ensembling);
* **text → image recall@k**: for each held-out caption, is its own image among the k most similar
  held-out images?

Config (``experiments/clip_mnist.py``)::

    config.data.image_size     int    H = W of the digits (28: MNIST's own size)
    config.data.layout         str    "random" (digits rescaled and moved; captions say where) | "original"
    config.data.seed           int    layout and caption seed of the first placement
    config.data.num_layouts    int    K placements of every training digit (seeds seed … seed + K − 1), each
                                      measured and captioned anew: more distinct pairs, less memorisation
    config.data.num_held_out   int    digits kept out of training for the evaluation
    config.tokenizer.path      str|None   a tokenizer folder (vocab.json + merges.txt); None = fit one
    config.tokenizer.vocab_size    int    size of the fitted BPE
    config.tokenizer.context_length int   tokens per caption (77 in CLIP; captions here are ≤ ~20)
    config.model.text.*        CLIPTextConfig fields (vocab_size, eos_token_id and
                               max_position_embeddings are set from the tokenizer)
    config.model.vision.*      CLIPVisionConfig fields (image_size, num_channels set from the data)
    config.model.projection_dim    int    size of the joint embedding space
    config.model.logit_scale_init_value  float   log(1/τ₀) = log(1/0.07)
    config.train.*             batch_size, num_steps, lr, warmup_steps, grad_clip, ema_decay, ema_warmup,
                               seed, log_every, ckpt_every, keep_checkpoints, plot_every, num_plot
    config.eval.templates      tuple[str]  zero-shot prompts, with {name} ("seven") and/or {digit} ("7")
    config.eval.recall_ks      tuple[int]  k of recall@k

Outputs in ``workdir``: config.json (with the tokenizer's sizes filled in), tokenizer/ (so the workdir
is self-contained), metrics.jsonl, loss.png, similarity/step_<N>.png and similarity.png (the
contrastive matrix of a fixed held-out batch), eval.json, checkpoints/.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import config as config_lib
from ddpm_jax import data as data_lib
from ddpm_jax import parallel, plotting
from ddpm_jax.data import DIGIT_NAMES
from ddpm_jax.models.clip import (
    CLIPModel,
)
from ddpm_jax.objectives import clip_loss, contrastive_logits
from ddpm_jax.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from ddpm_jax.training import loop
from ddpm_jax.training.loop import TrainState, ema_decay_at, ema_update, make_lr_schedule, make_optimizer, split_held_out
from ddpm_jax.workdir import EVAL_FILENAME, TOKENIZER_DIR, clip_config

PyTree = Any
Metrics = dict[str, jax.Array]

DEFAULT_TEMPLATES = ("a handwritten digit {name}", "the number {digit}", "a handwritten {name}", "the digit {digit}")


# ================================================================================================
# Config → model
# ================================================================================================

def resolve_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ml_collections.ConfigDict:
    """Fills in what the tokenizer and the data decide: vocabulary size, end token, context length,
    image size and channels (so config.json rebuilds exactly this model)."""
    config = ml_collections.ConfigDict(config.to_dict())  # a copy
    config.model.text.vocab_size = tokenizer.vocab_size
    config.model.text.eos_token_id = tokenizer.eos_token_id
    config.model.text.max_position_embeddings = tokenizer.context_length
    config.model.vision.image_size = int(config.data.image_size)
    config.model.vision.num_channels = 1
    return config


def init_params(model: CLIPModel, key: jax.Array) -> PyTree:
    c = model.config
    ids = jnp.zeros((1, c.text.max_position_embeddings), jnp.int32)
    images = jnp.zeros((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels), jnp.float32)
    return model.init(key, ids, images)["params"]


def create_train_state(model: CLIPModel, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """``training.loop.TrainState`` (step, params, EMA params, Adam state) for the CLIP model."""
    params = init_params(model, key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                               apply_fn=model.apply, tx=tx)


# ================================================================================================
# The step
# ================================================================================================

def make_train_step(model: CLIPModel, config: ml_collections.ConfigDict) -> Callable[
        [TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, Metrics]]:
    """The pure ``train_step(state, batch, key) -> (state, metrics)`` on the global batch.

    ``batch = {"images": [B, H, W, 1], "input_ids": [B, T]}``, row i a matching pair. The step uses no
    randomness (``key`` is unused). Metrics: loss (Figure 3's symmetric cross-entropy), accuracy (the
    fraction of images whose own caption is the most similar in the batch), logit_scale (exp(s),
    clipped at 100), grad_norm (before clipping), lr.
    """
    cfg = config.train
    lr_schedule = make_lr_schedule(cfg.lr, cfg.warmup_steps)
    ema_decay, ema_warmup = float(cfg.ema_decay), bool(cfg.get("ema_warmup", False))

    def loss_fn(params: PyTree, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        out = model.apply({"params": params}, batch["input_ids"], batch["images"])
        return clip_loss(out.image_embeds, out.text_embeds, params["logit_scale"]), out.logits_per_image

    def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
        del key  # deterministic: no dropout, no augmentation inside the step
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, ema_decay, ema_warmup)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])),
            "logit_scale": jnp.minimum(jnp.exp(state.params["logit_scale"]), 100.0),
            "grad_norm": optax.tree.norm(grads),
            "lr": lr_schedule(state.step),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_update(state.ema_params, params, decay))
        return new_state, metrics

    return train_step


# ================================================================================================
# Embeddings and the evaluation metrics
# ================================================================================================

def _batched(fn: Callable[[jax.Array], jax.Array], x: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over ``x`` in chunks of ``batch_size`` (the last chunk padded, so one compiled shape)."""
    out = []
    for start in range(0, len(x), batch_size):
        chunk = x[start: start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(np.asarray(fn(chunk))[: batch_size - pad])
    return np.concatenate(out)


def encode_texts(model: CLIPModel, params: PyTree, input_ids: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Token ids [N, T] → text embeddings [N, E] (unnormalised)."""
    fn = jax.jit(lambda ids: model.apply({"params": params}, ids, method=CLIPModel.encode_text))
    return _batched(fn, np.asarray(input_ids, np.int32), min(batch_size, len(input_ids)))


def encode_images(model: CLIPModel, params: PyTree, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Images [N, H, W, C] in [-1, 1] → image embeddings [N, E] (unnormalised)."""
    fn = jax.jit(lambda x: model.apply({"params": params}, x, method=CLIPModel.encode_image))
    return _batched(fn, np.asarray(images, np.float32), min(batch_size, len(images)))


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity = dot product)."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_prompts(templates: Sequence[str], names: Sequence[str]) -> list[str]:
    """[C · K] prompts, class-major: class c's K templates filled with ``{name}`` and ``{digit}`` (= c)."""
    return [t.format(name=name, digit=c) for c, name in enumerate(names) for t in templates]


def class_embeddings(text_embeds: np.ndarray, num_classes: int) -> np.ndarray:
    """Prompt ensembling (CLIP §3.1.4): [C · K, E] class-major prompt embeddings → [C, E], the mean of
    each class's normalised prompt embeddings, renormalised."""
    per_class = normalize(text_embeds).reshape(num_classes, -1, text_embeds.shape[-1])  # [C, K, E]
    return normalize(per_class.mean(axis=1))


def zero_shot_predictions(image_embeds: np.ndarray, class_embeds: np.ndarray) -> np.ndarray:
    """argmax_c cos(image, class c) for each image: [N] class indices."""
    return np.argmax(normalize(image_embeds) @ normalize(class_embeds).T, axis=1)


def zero_shot_accuracy(image_embeds: np.ndarray, class_embeds: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of images [N, E] whose most similar class embedding [C, E] is their label [N]."""
    return float(np.mean(zero_shot_predictions(image_embeds, class_embeds) == np.asarray(labels)))


def recall_at_k(query_embeds: np.ndarray, target_embeds: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Retrieval recall@k: query i's match is target i; recall@k is the fraction of queries whose match
    is among the k most similar targets (cosine). Ties count against the match: its rank is the number
    of *other* targets at least as similar."""
    sim = normalize(query_embeds) @ normalize(target_embeds).T        # [N, N]
    own = np.diag(sim)[:, None]
    others = np.ones_like(sim, dtype=bool)
    np.fill_diagonal(others, False)
    rank = np.sum((sim >= own) & others, axis=1)                      # 0 = the match is strictly first
    return {int(k): float(np.mean(rank < k)) for k in ks}


def evaluate(model: CLIPModel, params: PyTree, tokenizer: Tokenizer, images: np.ndarray, labels: np.ndarray,
             captions: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
             ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Zero-shot digit accuracy (prompt ensemble over ``templates``) and text→image recall@k on
    (images, labels, captions); returns a JSON-able dict."""
    num_classes, labels = len(DIGIT_NAMES), np.asarray(labels)
    prompts, first_prompts = class_prompts(templates, DIGIT_NAMES), class_prompts(templates[:1], DIGIT_NAMES)
    texts = [*prompts, *first_prompts, *captions]
    text_embeds = encode_texts(model, params, tokenizer(texts))  # one pass: one compiled shape
    classes = class_embeddings(text_embeds[: len(prompts)], num_classes)
    single = class_embeddings(text_embeds[len(prompts): len(prompts) + num_classes], num_classes)
    caption_embeds = text_embeds[len(prompts) + num_classes:]
    image_embeds = encode_images(model, params, images)
    predictions = zero_shot_predictions(image_embeds, classes)
    recalls = recall_at_k(caption_embeds, image_embeds, ks)
    return {
        "num_images": int(len(images)),
        "zero_shot_accuracy": float(np.mean(predictions == labels)),
        "zero_shot_accuracy_first_template": zero_shot_accuracy(image_embeds, single, labels),
        "zero_shot_per_digit": {name: float(np.mean(predictions[labels == d] == d))
                                for d, name in enumerate(DIGIT_NAMES) if np.any(labels == d)},
        "templates": list(templates),
        **{f"text_to_image_recall@{k}": v for k, v in recalls.items()},
        **{f"chance_recall@{k}": min(1.0, k / len(images)) for k in ks},
        "chance_zero_shot_accuracy": 0.1,
    }


# ================================================================================================
# Figures
# ================================================================================================

def plot_similarity_matrix(images: np.ndarray, captions: Sequence[str], similarity: np.ndarray,
                           path: str | os.PathLike, title: str = "") -> pathlib.Path:
    """The contrastive matrix: cosine similarity of caption i (row) and image j (column), the images
    drawn above their columns; a trained CLIP has its largest entries on the diagonal."""
    n = len(captions)
    fig = plotting.new_figure(figsize=(5.5 + 0.7 * n, 1.4 + 0.6 * n))
    grid = fig.add_gridspec(2, 1, height_ratios=[1, n], hspace=0.03, left=0.45, right=0.97, top=0.93, bottom=0.03)
    strip = plotting.make_grid(np.asarray(images), nrow=n, padding=1)  # [h, w, C] uint8
    ax_images = fig.add_subplot(grid[0])
    ax_images.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", aspect="auto",
                     extent=(-0.5, n - 0.5, 0, 1))
    ax_images.axis("off")
    ax = fig.add_subplot(grid[1])
    # One fixed colour scale for every matrix (a cosine lies in [-1, 1]), centred at 0, with a colour bar.
    shown = ax.imshow(similarity, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto",
                      extent=(-0.5, n - 0.5, n - 0.5, -0.5))
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{similarity[i, j]:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if abs(similarity[i, j]) > 0.6 else "black")
    ax.set_yticks(range(n), [c if len(c) <= 48 else c[:46] + "…" for c in captions], fontsize=10)
    ax.set_xticks(range(n), [str(j) for j in range(n)], fontsize=10)
    ax.set_xlabel("image")
    fig.colorbar(shown, ax=ax, label="cosine similarity", fraction=0.04, pad=0.02)
    if title:
        ax_images.set_title(title, fontsize=9)
    return plotting.save_figure(fig, path)


# ================================================================================================
# The loop
# ================================================================================================

def fixed_batch_indices(indices: np.ndarray, labels: np.ndarray, num: int, seed: int) -> np.ndarray:
    """``num`` of ``indices`` drawn by ``seed``, preferring distinct labels (one per digit first), ordered
    by label: the fixed batch whose similarity matrix is drawn during training."""
    rng = np.random.default_rng([seed, 11])
    order = rng.permutation(np.asarray(indices))
    labels = np.asarray(labels)
    _, first = np.unique(labels[order], return_index=True)          # the first drawn of each label
    rest = np.setdiff1d(np.arange(len(order)), first, assume_unique=True)
    chosen = order[np.concatenate([np.sort(first), rest])[: min(num, len(order))]]
    return chosen[np.argsort(labels[chosen], kind="stable")]


def _tokenizer_for(config: ml_collections.ConfigDict, workdir: str, captions: Sequence[str]) -> Tokenizer:
    """workdir/tokenizer/ if it exists (resuming); else config.tokenizer.path copied there; else a BPE
    fitted on ``captions`` and saved there."""
    folder = os.path.join(workdir, TOKENIZER_DIR)
    length = int(config.tokenizer.context_length)
    if os.path.isdir(folder):
        return load_tokenizer(folder, context_length=length)
    if config.tokenizer.get("path"):
        tokenizer = load_tokenizer(config.tokenizer.path, context_length=length)
        if jax.process_index() == 0:
            tokenizer.save(folder)
        return tokenizer
    out = folder if jax.process_index() == 0 else tempfile.mkdtemp()  # one writer per workdir
    train_tokenizer(captions, out, vocab_size=int(config.tokenizer.vocab_size))
    return load_tokenizer(out, context_length=length)


def captioned_layouts(config: ml_collections.ConfigDict, dataset: Any | None = None
                      ) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """(layouts, train indices, held-out indices): the digits in ``data.num_layouts`` placements (seeds
    data.seed + k), each measured and captioned, or ``dataset``; held-out *digits* (all their placements)
    are never trained on and are evaluated in the first placement."""
    if dataset is None:
        layouts = [data_lib.load_captioned_digits(int(config.data.image_size), seed=int(config.data.seed) + k,
                                                  layout=config.data.get("layout", "random"))
                   for k in range(int(config.data.get("num_layouts", 1)))]
    else:
        layouts = [dataset]
    images = np.asarray(layouts[0].images, np.float32)                        # [N, H, W, 1]
    size = int(config.data.image_size)
    if images.ndim != 4 or images.shape[1:] != (size, size, 1):
        raise ValueError(f"images have shape {images.shape}, but config.data.image_size asks for [N, {size}, {size}, 1]")
    train_idx, held_idx = split_held_out(len(images), int(config.data.num_held_out), int(config.train.seed))
    return layouts, train_idx, held_idx


def write_evaluation(config: ml_collections.ConfigDict, workdir: str, model: CLIPModel, state: TrainState,
                     tokenizer: Tokenizer, images: np.ndarray, labels: np.ndarray, captions: Sequence[str]
                     ) -> dict[str, Any]:
    """eval.json (zero-shot accuracy, recall@k on the held-out digits), similarity.png and loss.png."""
    params = jax.tree.map(loop.first_local, state.ema_params)
    record = evaluate(model, params, tokenizer, images, labels, captions, tuple(config.eval.templates),
                      tuple(config.eval.recall_ks))
    record = {"step": int(loop.first_local(state.step)), **record}
    if jax.process_index() == 0:
        pathlib.Path(workdir, EVAL_FILENAME).write_text(json.dumps(record, indent=2) + "\n")
        latest = pathlib.Path(workdir, "similarity", f"step_{record['step']:07d}.png")
        if latest.is_file():
            pathlib.Path(workdir, "similarity.png").write_bytes(latest.read_bytes())
        metrics = pathlib.Path(workdir, "metrics.jsonl")
        if metrics.is_file() and metrics.stat().st_size:
            plotting.plot_loss_curve(metrics, os.path.join(workdir, "loss.png"))
    logging.info("zero-shot accuracy %.3f, text→image recall@1/5/10 %s", record["zero_shot_accuracy"],
                 [round(record.get(f"text_to_image_recall@{k}", float("nan")), 3) for k in (1, 5, 10)])
    return record


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, dataset: Any | None = None
          ) -> TrainState:
    """Trains (or resumes) the CLIP of ``config`` in ``workdir``, then writes eval.json; returns the state.

    ``dataset`` (anything with ``images`` [N, H, W, 1], ``labels`` [N] and ``captions``) overrides
    ``data.load_captioned_digits``. Raises FloatingPointError at the first non-finite loss and
    ValueError for a batch that does not split over the devices or a bad model config.
    """
    cfg = config.train
    workdir = os.fspath(workdir)
    is_chief = jax.process_index() == 0
    kind = cfg.get("parallel", "jit")
    if kind != "jit":
        raise ValueError(f"train.parallel={kind!r}: the CLIP step runs as one sharded jit (its loss needs the "
                         f"whole batch); use 'jit'")
    mesh = parallel.make_mesh()
    loop.check_batch_split(cfg.batch_size, mesh, kind)
    os.makedirs(workdir, exist_ok=True)

    # ---------------------------------------------------------------------------------------------
    # Data and tokenizer
    # ---------------------------------------------------------------------------------------------
    layouts, train_idx, held_idx = captioned_layouts(config, dataset)
    images = np.asarray(layouts[0].images, np.float32)                        # [N, H, W, 1]
    labels, captions = np.asarray(layouts[0].labels), list(layouts[0].captions)
    train_captions = [layout.captions[i] for layout in layouts for i in train_idx]
    tokenizer = _tokenizer_for(config, workdir, train_captions)
    config = resolve_config(config, tokenizer)
    if is_chief:
        config_lib.save_config(config, os.path.join(workdir, config_lib.CONFIG_FILENAME))
    input_ids = tokenizer(captions)                                           # [N, T] int32, first placement
    train_images = np.concatenate([np.asarray(layout.images, np.float32)[train_idx] for layout in layouts])
    train_ids = tokenizer(train_captions)                                     # [K · N_train, T]

    # ---------------------------------------------------------------------------------------------
    # Model, optimizer, state
    # ---------------------------------------------------------------------------------------------
    model = CLIPModel(clip_config(config))
    tx = make_optimizer(cfg.lr, cfg.warmup_steps, cfg.grad_clip)
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    replicated = parallel.replicated_sharding(mesh)
    state = jax.jit(functools.partial(create_train_state, model, tx), out_shardings=replicated)(init_key)

    def log_start(start_step: int) -> None:
        num_params = sum(x.size for x in jax.tree.leaves(state.params))
        logging.info("%s params; %s at step %d", f"{num_params:,}", "resuming" if start_step else "starting",
                     start_step)

    # ---------------------------------------------------------------------------------------------
    # The contrastive matrix of a fixed held-out batch, during training
    # ---------------------------------------------------------------------------------------------
    plot_idx = fixed_batch_indices(held_idx, labels, int(cfg.get("num_plot", 10)), cfg.seed)
    plot_images, plot_ids = images[plot_idx], input_ids[plot_idx]
    plot_captions = [captions[i] for i in plot_idx]

    @jax.jit
    def similarity_fn(params: PyTree) -> jax.Array:
        out = model.apply({"params": params}, plot_ids, plot_images)
        return contrastive_logits(out.text_embeds, out.image_embeds, jnp.zeros(()))  # cosines [texts, images]

    def save_similarity(state: TrainState, step: int) -> None:
        similarity = loop.first_local(similarity_fn(state.ema_params))
        if is_chief:
            path = os.path.join(workdir, "similarity", f"step_{step:07d}.png")
            plot_similarity_matrix(plot_images, plot_captions, similarity, path, title=f"step {step}")

    # ---------------------------------------------------------------------------------------------
    # Loop
    # ---------------------------------------------------------------------------------------------
    def batch_fn(step: int) -> dict[str, np.ndarray]:
        args = (step, cfg.batch_size, cfg.seed, jax.process_index(), jax.process_count())
        return {"images": data_lib.get_batch(train_images, *args), "input_ids": data_lib.get_batch(train_ids, *args)}

    plot_every = int(cfg.get("plot_every", 0)) or int(cfg.num_steps)
    state = loop.run(
        state, loop.compile_step(make_train_step(model, config), mesh, kind), batch_fn, workdir=workdir,
        num_steps=cfg.num_steps, key=train_key, mesh=mesh, kind=kind, log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every, keep_checkpoints=cfg.get("keep_checkpoints", 3),
        hooks=[loop.Hook(plot_every, save_similarity)], on_start=log_start)

    # ---------------------------------------------------------------------------------------------
    # Evaluation on the held-out digits
    # ---------------------------------------------------------------------------------------------
    write_evaluation(config, workdir, model, state, tokenizer, images[held_idx], labels[held_idx],
                     [captions[i] for i in held_idx])
    return state

