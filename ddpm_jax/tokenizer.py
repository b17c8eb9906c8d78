"""CLIP's tokenizer: text → 77 token ids, as Stable Diffusion's text encoder expects them.

CLIP (Radford et al. 2021, §2.4) uses "a lower-cased byte pair encoding (BPE) representation of the
text with a 49,152 vocab size" (Sennrich et al. 2016), bracketed with ``[SOS]`` and ``[EOS]``
tokens, and a context length of 77. A tokenizer folder — the ``tokenizer/`` folder of every
Stable Diffusion checkpoint — holds ``vocab.json`` (token → id) and ``merges.txt`` (the BPE merge
rules, in priority order), optionally ``special_tokens_map.json`` / ``tokenizer_config.json``.

The BPE itself is transformers' ``CLIPTokenizer``; this module fixes the conventions around it:

    ids = [<|startoftext|>] + BPE(prompt)[: L − 2] + [<|endoftext|>] + [pad] · (L − 2 − n)

with L = 77, a ``UserWarning`` whenever a prompt loses tokens, and clear errors for a folder
missing a file. transformers is imported lazily: it is needed here only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CONTEXT_LENGTH = 77  # CLIP's (and therefore Stable Diffusion's) text context length


class Tokenizer:
    """Wraps a transformers ``CLIPTokenizer``; ``tokenize(prompts)`` → ``[B, context_length]`` int32."""

    def __init__(self, bpe: Any, context_length: int = CONTEXT_LENGTH):
        self.bpe = bpe  # the transformers tokenizer: BPE and the special tokens
        self.context_length = context_length
        self.bos_token_id: int = bpe.bos_token_id  # <|startoftext|>
        self.eos_token_id: int = bpe.eos_token_id  # <|endoftext|>
        self.pad_token_id: int = bpe.pad_token_id  # <|endoftext|> in SD 1.x, "!" in SD 2.x
        self.vocab_size: int = len(bpe)

    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts → token ids ``[B, context_length]`` int32, with start/end tokens and padding.

        A prompt longer than ``context_length − 2`` BPE tokens is truncated (its end-of-text token
        kept last) with a warning naming it. An empty prompt is ``[SOS, EOS, pad, …]``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.context_length
        out = np.full((len(prompts), length), self.pad_token_id, dtype=np.int32)
        encoded = self.bpe(list(prompts), add_special_tokens=True, padding=False, truncation=False)["input_ids"]
        for i, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
            if len(ids) > length:
                warnings.warn(
                    f"prompt {i} ({prompt[:40]!r}…) is {len(ids)} tokens long with start/end tokens; "
                    f"truncated to CLIP's context length {length}",
                    UserWarning,
                    stacklevel=2,
                )
                ids = ids[: length - 1] + [self.eos_token_id]
            out[i, : len(ids)] = ids
        return out

    __call__ = tokenize

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids → text, without the special tokens."""
        return self.bpe.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(folder: str | Path, context_length: int = CONTEXT_LENGTH) -> Tokenizer:
    """Load a CLIP tokenizer folder (``vocab.json`` + ``merges.txt``, as shipped inside SD checkpoints).

    Raises:
      FileNotFoundError naming the missing file (transformers would otherwise silently build a
        tokenizer without merges, i.e. one token per character).
      ImportError if transformers is not installed.
    """
    folder = Path(folder)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"tokenizer folder {folder} has no {name} (a CLIP tokenizer needs vocab.json and merges.txt)")
    try:
        from transformers import CLIPTokenizer
    except ImportError as err:
        raise ImportError("load_tokenizer uses transformers' CLIPTokenizer: pip install transformers") from err
    return Tokenizer(CLIPTokenizer.from_pretrained(str(folder)), context_length)
