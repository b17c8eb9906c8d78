"""The CLIP tokenizer path (tokenizer.py) against transformers' CLIPTokenizer on a tiny CLIP-format folder."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from ddpm_jax.tokenizer import load_tokenizer  # noqa: E402

MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "o n</w>", "i n", "in g</w>", "d o", "do g</w>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny tokenizer in CLIP's format: 256 byte tokens, their '</w>' forms, the merges, the specials."""
    path = tmp_path_factory.mktemp("tokenizer")
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    return path


PROMPTS = [
    "the cat",
    "A dog, on the mat! (really?) -- 100% sure...",
    "café naïve Zürich 東京 😀 — ‘quotes’",
    "   Mixed   CASE\tand\nwhitespace  ",
    "the cat " * 60,  # 120 BPE tokens: over the context length
]


def test_token_ids_equal_clip_tokenizer(folder):
    tokenizer = load_tokenizer(folder)
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder))
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    with pytest.warns(UserWarning, match="prompt 4 .* truncated to CLIP's context length 77"):
        ids = tokenizer.tokenize(PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, np.asarray(expected))

    vocab = json.loads((folder / "vocab.json").read_text())
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert ids[0, :4].tolist() == [bos, vocab["the</w>"], vocab["cat</w>"], eos]  # the merges are applied
    assert (ids[0, 4:] == tokenizer.pad_token_id).all()
    assert ids[4, 0] == bos and ids[4, 76] == eos and ids[4, 75] != eos  # truncated, end token kept
    assert tokenizer.decode(ids[0]) == "the cat"


def test_empty_prompt_and_single_string(folder):
    tokenizer = load_tokenizer(folder)
    ids = tokenizer("")
    assert ids.shape == (1, 77)
    assert ids[0, :2].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert (ids[0, 2:] == tokenizer.pad_token_id).all()


def test_no_warning_at_exactly_the_context_length(folder, recwarn):
    tokenizer = load_tokenizer(folder)
    ids = tokenizer("the " * 75)  # 75 tokens + start + end = 77
    assert ids[0, 76] == tokenizer.eos_token_id and ids[0, 75] != tokenizer.eos_token_id
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_missing_files(folder, tmp_path):
    (tmp_path / "vocab.json").write_text((folder / "vocab.json").read_text())
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path / "nowhere")


def test_without_transformers_says_how_to_install(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match="pip install transformers"):
        load_tokenizer(folder)
