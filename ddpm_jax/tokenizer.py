"""CLIP's tokenizer: text → 77 token ids, as Stable Diffusion's text encoder expects them.

CLIP (Radford et al. 2021, §2.4) uses "a lower-cased byte pair encoding (BPE) representation of the
text with a 49,152 vocab size" (Sennrich et al. 2016), bracketed with ``[SOS]`` and ``[EOS]``
tokens, and a context length of 77. A tokenizer folder — the ``tokenizer/`` folder of every
Stable Diffusion checkpoint, or one written by ``ddpm-jax train-tokenizer`` — holds ``vocab.json``
(token → id) and ``merges.txt`` (the BPE merge rules, in priority order) — or only the tokenizers library's
``tokenizer.json``, which holds both (what transformers v5 writes) — optionally
``special_tokens_map.json`` / ``tokenizer_config.json`` (e.g. SD 2.x pads with ``"!"``).

The whole tokenizer is written out here, in plain Python (no transformers, no ``regex``, no
``ftfy`` at run time); ``tests/test_tokenizer.py`` proves that it gives the same ids as
transformers' ``CLIPTokenizer`` (the tokenizer diffusers' pipelines use). Text → ids in five steps:

1. **Special tokens**: the literal strings ``<|startoftext|>`` / ``<|endoftext|>`` in a prompt are
   those tokens; the text between them is tokenized on its own.
2. **Clean** (:func:`clean_text`): Unicode NFC, every whitespace run → one space, lower case.
   (OpenAI's original also runs ``ftfy.fix_text`` and ``html.unescape``; transformers' CLIPTokenizer,
   our reference, does neither, and neither do we.)
3. **Pre-tokenize** (:func:`pre_tokenize`) into words with CLIP's pattern
   ``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``: contractions, letter runs,
   *single* digits, punctuation runs; whitespace separates words and is dropped.
4. **Bytes → symbols** (:func:`bytes_to_unicode`): each word's UTF-8 bytes are mapped one-to-one to
   printable characters (GPT-2's trick), so any text, emoji included, has a spelling in the
   vocabulary and nothing is ever "unknown". The word's last symbol gets the suffix ``</w>``
   ("end of word"), so ``"dog"`` at a word end and inside ``"dogma"`` are different tokens.
5. **BPE** (:meth:`Tokenizer.bpe`): repeatedly merge the adjacent pair of symbols whose rule comes
   first in merges.txt, until no pair has a rule (Sennrich et al. 2016, Algorithm 1 applied to one
   word). Then look each symbol up in vocab.json.

and around it the context window:

    ids = [<|startoftext|>] + BPE(prompt)[: L − 2] + [<|endoftext|>] + [pad] · (L − 2 − n)

with L = 77, a ``UserWarning`` naming a prompt that loses tokens, and clear errors for a folder
missing a file. ``train_tokenizer`` (``ddpm-jax train-tokenizer``) learns a small BPE on captions
with the same conventions and writes the same folder format, so both paths use one loader.

Equality with transformers holds for every character Python's ``unicodedata`` knows; characters
assigned in a newer Unicode version than Python's (e.g. some recent CJK extensions) may be
classified differently by transformers' Rust tokenizer.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
import numpy as np

CONTEXT_LENGTH = 77  # CLIP's (and therefore Stable Diffusion's) text context length
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")  # tried in this order, as in the pattern
MERGES_HEADER = "#version: 0.2"


# --------------------------------------------------------------------------------------------
# The pieces: bytes ↔ symbols, cleaning, pre-tokenization
# --------------------------------------------------------------------------------------------


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to 256 printable unicode characters.

    Printable Latin-1 bytes (``!``…``~``, ``¡``…``¬``, ``®``…``ÿ``) map to themselves; the other 68
    (control characters, space, …) to ``chr(256)``, ``chr(257)``, … in byte order — so a space is
    ``Ġ`` (chr(288)). BPE then works on strings of these characters, never on raw whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(chars.items()))


# Whitespace as in the Unicode White_Space property (the regex \s of transformers' Rust tokenizer);
# Python's str.isspace() also counts the ASCII separators \x1c–\x1f, which are not whitespace there.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")


def _is_space(c: str) -> bool:
    return c.isspace() and c not in "\x1c\x1d\x1e\x1f"


def clean_text(text: str) -> str:
    """NFC-normalise, turn every whitespace run into one space, lower-case (step 2)."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).lower()


def _is_letter(c: str) -> bool:  # \p{L}: Lu, Ll, Lt, Lm, Lo
    return unicodedata.category(c).startswith("L")


def _is_number(c: str) -> bool:  # \p{N}: Nd, Nl, No
    return unicodedata.category(c).startswith("N")


def pre_tokenize(text: str) -> list[str]:
    """Split cleaned text into words with CLIP's pattern (step 3), written as a scanner.

    At each position the first alternative that matches wins, as in a regex alternation:
    a (lower-cased) special-token spelling; else a contraction; else a run of letters; else ONE digit
    ("2024" is four words); else whitespace (skipped); else a run of characters that are neither
    space, letter nor digit (punctuation, symbols, emoji). transformers then re-splits each word
    with GPT-2's pattern (``ByteLevel``), which changes only the special-token spellings (they mix
    letters and punctuation): ``<|startoftext|>`` → ``<|``, ``startoftext``, ``|>``.
    """
    words, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        special = next((s for s in (BOS_TOKEN, EOS_TOKEN) if text.startswith(s, i)), None)
        contraction = next((s for s in CONTRACTIONS if text.startswith(s, i)), None)
        if special:
            words.extend(["<|", special[2:-2], "|>"])
            i += len(special)
            continue
        if contraction:
            j = i + len(contraction)
        elif _is_letter(c):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
        elif _is_number(c):
            j = i + 1
        elif _is_space(c):
            i += 1
            continue
        else:
            j = i + 1
            while j < n and not (_is_space(text[j]) or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        words.append(text[i:j])
        i = j
    return words


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Every occurrence of the adjacent ``pair`` in ``symbols`` merged into one symbol, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """CLIP's byte-level BPE; ``tokenize(prompts)`` → ``[B, context_length]`` int32.

    Args:
      vocab: token → id (vocab.json).
      merges: the merge rules in priority order, each a pair of symbols (merges.txt).
      pad_token: the padding token (``<|endoftext|>`` in CLIP and SD 1.x, ``"!"`` in SD 2.x).
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 pad_token: str = EOS_TOKEN, context_length: int = CONTEXT_LENGTH):
        for name, token in (("start", BOS_TOKEN), ("end", EOS_TOKEN), ("pad", pad_token)):
            if token not in vocab:
                raise ValueError(f"the vocabulary has no {name} token {token!r}; a CLIP vocab.json must contain it")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}  # lower rank = merged first
        self.inverse_vocab = {i: t for t, i in self.vocab.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.context_length = context_length
        self.pad_token = pad_token
        self.bos_token_id: int = self.vocab[BOS_TOKEN]  # <|startoftext|>
        self.eos_token_id: int = self.vocab[EOS_TOKEN]  # <|endoftext|>; also the "unknown" token
        self.pad_token_id: int = self.vocab[pad_token]
        self.vocab_size: int = len(self.vocab)
        self._cache: dict[str, list[str]] = {}

    # -- BPE --------------------------------------------------------------------------------

    def bpe(self, word: str) -> list[str]:
        """One pre-tokenized word (already byte-mapped) → its BPE symbols (step 5).

        ``"dogs"`` starts as ``d o g s</w>``; while some adjacent pair has a merge rule, every
        occurrence of the best-ranked pair is merged (left to right), e.g. → ``do g s</w>`` →
        ``dog s</w>`` → ``dogs</w>``.
        """
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            symbols = merge_pair(symbols, best)
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Text → BPE token ids, without start/end tokens and without truncation."""
        ids: list[int] = []
        for k, segment in enumerate(text.split(EOS_TOKEN)):  # step 1: literal special tokens
            if k:
                ids.append(self.eos_token_id)
            for j, part in enumerate(segment.split(BOS_TOKEN)):
                if j:
                    ids.append(self.bos_token_id)
                for word in pre_tokenize(clean_text(part)):
                    spelled = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))  # step 4
                    ids.extend(self.vocab.get(s, self.eos_token_id) for s in self.bpe(spelled))
        return ids

    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts → token ids ``[B, context_length]`` int32, with start/end tokens and padding.

        A prompt longer than ``context_length − 2`` BPE tokens is truncated (its end-of-text token
        kept last) with a warning naming it. An empty prompt is ``[SOS, EOS, pad, …]``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.context_length
        out = np.full((len(prompts), length), self.pad_token_id, dtype=np.int32)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a str")
            ids = [self.bos_token_id, *self.encode(prompt), self.eos_token_id]
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

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids → text, without the special tokens (``</w>`` becomes a space)."""
        special = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        text = "".join(self.inverse_vocab[int(i)] for i in ids if int(i) not in special)
        raw = bytes(self.byte_decoder[c] for c in text)  # "</w>" is plain ASCII: it maps to itself
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    # -- files ------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Writes vocab.json, merges.txt and special_tokens_map.json (the folder format it was read from)."""
        return save_tokenizer_files(folder, self.vocab, self.merges, pad_token=self.pad_token)


def save_tokenizer_files(folder: str | Path, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                         pad_token: str = EOS_TOKEN) -> Path:
    """vocab.json + merges.txt (+ special_tokens_map.json) in CLIP's format, readable by
    :func:`load_tokenizer` and by transformers' ``CLIPTokenizer.from_pretrained``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = [MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return folder


def _read_pad_token(folder: Path) -> str:
    """pad_token from special_tokens_map.json, else tokenizer_config.json, else <|endoftext|>."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):  # {"content": "!", "lstrip": false, ...}
                pad = pad.get("content")
            if pad:
                return str(pad)
    return EOS_TOKEN


def load_tokenizer(folder: str | Path, context_length: int = CONTEXT_LENGTH) -> Tokenizer:
    """Load a CLIP tokenizer folder: ``vocab.json`` + ``merges.txt`` (as shipped inside SD checkpoints), or else
    ``tokenizer.json`` alone (the Hugging Face tokenizers file that transformers v5 writes: its ``model`` holds
    the same vocab and merges); the padding token from ``special_tokens_map.json`` / ``tokenizer_config.json``.

    Raises:
      FileNotFoundError naming the missing files (transformers would silently build a tokenizer
        without merges, i.e. one token per byte).
      ValueError for a malformed vocab.json, merges.txt or tokenizer.json (naming the file and line), or a
        vocabulary without the start/end/pad tokens.
    """
    folder = Path(folder)
    if not (folder / "vocab.json").is_file() and not (folder / "merges.txt").is_file() and (folder / "tokenizer.json").is_file():
        vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
        return Tokenizer(vocab, merges, pad_token=_read_pad_token(folder), context_length=context_length)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"tokenizer folder {folder} has no {name} (a CLIP tokenizer needs vocab.json and "
                                    f"merges.txt, or tokenizer.json)")
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / 'vocab.json'} is not valid JSON ({err})") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{folder / 'vocab.json'} must map tokens to integer ids")
    merges = []
    for number, line in enumerate((folder / "merges.txt").read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{folder / 'merges.txt'} line {number} is {line!r}; each rule must be two symbols")
        merges.append((pair[0], pair[1]))
    return Tokenizer(vocab, merges, pad_token=_read_pad_token(folder), context_length=context_length)


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tokenizers ``tokenizer.json`` of a BPE model → (vocab, merges); merges are written "a b" (older
    tokenizers) or ["a", "b"] (tokenizers ≥ 0.20)."""
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model") or {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
        raise ValueError(f"{path} holds no BPE model with a vocab and merges (model.type={model.get('type')!r})")
    pairs = []
    for number, merge in enumerate(merges):
        pair = merge.split() if isinstance(merge, str) else list(merge)
        if len(pair) != 2:
            raise ValueError(f"{path} model.merges[{number}] is {merge!r}; each rule must be two symbols")
        pairs.append((pair[0], pair[1]))
    return vocab, pairs


# --------------------------------------------------------------------------------------------
# Learning a small BPE (ddpm-jax train-tokenizer)
# --------------------------------------------------------------------------------------------


def learn_merges(words: Iterable[str], num_merges: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """BPE learning (Sennrich et al. 2016, Algorithm 1) on byte-mapped words, CLIP-style (``</w>``).

    Start from each word's symbols (``d o g s</w>``); repeatedly count every adjacent pair over the
    corpus (weighted by word frequency), merge the most frequent pair everywhere and record the rule;
    stop after ``num_merges`` rules or when the best pair occurs fewer than ``min_frequency`` times.
    Ties go to the alphabetically first pair, so the result is a function of the corpus alone.
    """
    corpus = Counter(words)
    spelled = {(*word[:-1], word[-1] + END_OF_WORD): count for word, count in corpus.items() if word}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in spelled.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        spelled = {tuple(merge_pair(list(symbols), best)): count for symbols, count in spelled.items()}
    return merges


def train_tokenizer(texts: Iterable[str], out: str | Path, vocab_size: int = 1000,
                    min_frequency: int = 2) -> Tokenizer:
    """Fits a BPE on ``texts`` with CLIP's conventions and saves it to ``out`` in CLIP's folder format.

    The texts are cleaned and pre-tokenized exactly as :meth:`Tokenizer.encode` does, the merges are
    learned by :func:`learn_merges`, and the vocabulary is laid out as OpenAI's: the 256 byte
    symbols, the same with ``</w>``, one token per merge, then ``<|startoftext|>`` and
    ``<|endoftext|>``. Every byte is thus spelled, so any text tokenizes. The folder loads with
    :func:`load_tokenizer` and with transformers' ``CLIPTokenizer`` (same ids, tested).

    (Why not the ``tokenizers`` library's ``BpeTrainer``? It breaks ties between equally frequent
    pairs in hash-map order, so two runs on the same captions can learn different merges — a
    resumed or repeated training run would then see different token ids. The captions' vocabulary
    is tiny, so the plain loop above takes well under a second.)

    Args:
      texts: the training corpus (e.g. the digit captions).
      out: the folder to write vocab.json, merges.txt and special_tokens_map.json to.
      vocab_size: at most this many tokens in all (≥ 514 = 512 byte symbols + 2 special tokens).
      min_frequency: a pair must occur this often to be merged.
    Returns the loaded tokenizer (``load_tokenizer(out)``).
    """
    if vocab_size < 514:
        raise ValueError(f"vocab_size must be >= 514 (256 bytes, 256 bytes + '</w>', 2 special tokens), got {vocab_size}")
    byte_encoder = bytes_to_unicode()
    words = [
        "".join(byte_encoder[b] for b in word.encode("utf-8"))
        for text in texts
        for part in text.replace(BOS_TOKEN, " ").split(EOS_TOKEN)
        for word in pre_tokenize(clean_text(part))
    ]
    if not words:
        raise ValueError("train_tokenizer got no text to learn from (empty captions)")
    merges = learn_merges(words, vocab_size - 514, min_frequency)
    alphabet = list(byte_encoder.values())
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    save_tokenizer_files(out, vocab, merges)
    return load_tokenizer(out)
