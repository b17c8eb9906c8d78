"""Our CLIP tokenizer (tokenizer.py, plain Python) against transformers' CLIPTokenizer, the reference.

Two tokenizer folders: a hand-made one (every byte, a few merges) and one fitted by train_tokenizer on
the digit captions; on both, ids must equal CLIPTokenizer's exactly, for prompts with punctuation,
unicode, numbers, whitespace, literal special tokens and more than 77 tokens.
"""

from __future__ import annotations

import json
import random
import sys
import warnings

import numpy as np
import pytest

from ddpm_jax import tokenizer as tok_lib
from ddpm_jax.tokenizer import load_tokenizer, train_tokenizer

MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "o n</w>", "i n", "in g</w>", "d o", "do g</w>"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny tokenizer in CLIP's format: 256 byte tokens, their '</w>' forms, the merges, the specials."""
    path = tmp_path_factory.mktemp("tokenizer")
    byte_tokens = list(tok_lib.bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    return path


CAPTIONS = [
    "a handwritten digit seven, thick and slanted",
    "the number 7, thin, written small in the top left",
    "a small, upright nine in the centre",
    "a handwritten digit three on the right, slanted to the left",
    "the digit 0, large, at the bottom",
] * 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    return out, train_tokenizer(CAPTIONS, out, vocab_size=600, min_frequency=2)


PROMPTS = [
    "the cat",
    "A dog, on the mat! (really?) -- 100% sure...",
    "café naïve Zürich 東京 😀 — ‘quotes’ e\u0301 İstanbul ß ½ ² ١٢ Ⅻ",
    "   Mixed   CASE\tand\nwhitespace \u00a0\u2003 and\x1cseparators  ",
    "it's they'll we'd I'M rock'n'roll !'s ''s",
    "the year 2024: $3.50, 1e-4, #7 & 42nd",
    "a<|endoftext|>b <|startoftext|> <|STARTOFTEXT|>! c",
    "the cat " * 60,  # 120 BPE tokens: over the context length
    "",
]


def _reference(path, prompts, length=77):
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(str(path))
    return reference, np.asarray(reference(prompts, padding="max_length", max_length=length, truncation=True)["input_ids"])


def test_token_ids_equal_clip_tokenizer(folder):
    tokenizer = load_tokenizer(folder)
    reference, expected = _reference(folder, PROMPTS)
    with pytest.warns(UserWarning, match="prompt 7 .* truncated to CLIP's context length 77"):
        ids = tokenizer.tokenize(PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, expected)
    assert tokenizer.pad_token_id == reference.pad_token_id and tokenizer.vocab_size == len(reference)

    vocab = json.loads((folder / "vocab.json").read_text())
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert ids[0, :4].tolist() == [bos, vocab["the</w>"], vocab["cat</w>"], eos]  # the merges are applied
    assert (ids[0, 4:] == tokenizer.pad_token_id).all()
    assert ids[7, 0] == bos and ids[7, 76] == eos and ids[7, 75] != eos  # truncated, end token kept
    for i, prompt in enumerate(PROMPTS[:6]):
        assert tokenizer.decode(ids[i]) == reference.decode(expected[i].tolist(), skip_special_tokens=True), prompt
    assert tokenizer.decode(ids[0]) == "the cat"


def test_token_ids_equal_clip_tokenizer_on_random_text(folder):
    """2,000 random strings over an alphabet of troublemakers: ids equal CLIPTokenizer's."""
    tokenizer = load_tokenizer(folder)
    rng = random.Random(0)
    alphabet = list("abcXYZ  \t\n'!?.,-0123456789") + [
        "é", "e\u0301", "İ", "ß", "東", "😀", "½", "²", "\x1c", "\x85", "\u00a0", "\u2003", "\u200b", "\u2028",
        "\u3000", "<|startoftext|>", "<|endoftext|>", "<|STARTOFTEXT|>", "'s", "'LL", "ǅ", "\u0301", "Ⅻ", "١",
        "\x00", "\ufeff", "ﬁ", "Ω"]
    prompts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(2000)]
    _, expected = _reference(folder, prompts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some are longer than 77 tokens
        ids = tokenizer.tokenize(prompts)
    mismatched = [p for p, a, b in zip(prompts, ids, expected, strict=True) if (a != b).any()]
    assert not mismatched, mismatched[:3]


def test_pre_tokenizer_equals_clips_regex():
    """The scanner splits like CLIP's regex (with the `regex` module, test-time only)."""
    regex = pytest.importorskip("regex")
    pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    texts = [tok_lib.clean_text(p) for p in PROMPTS[:7]] + ["!'s a'b 12ab! ''ll 東京😀!! x<|endoftext|>y"]
    for text in texts:
        expected = []
        for word in pattern.findall(text):
            expected += ["<|", word[2:-2], "|>"] if word in ("<|startoftext|>", "<|endoftext|>") else [word]
        assert tok_lib.pre_tokenize(text) == expected, text


def test_bytes_to_unicode_and_bpe_by_hand(folder):
    table = tok_lib.bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("a")] == "a" and table[0] == chr(256)
    tokenizer = load_tokenizer(folder)
    assert tokenizer.bpe("dog") == ["dog</w>"]                  # d o g</w> → do g</w> → dog</w>
    assert tokenizer.bpe("dogs") == ["do", "g", "s</w>"]        # "g s</w>" has no rule: stops at do g s</w>
    assert tokenizer.bpe("thing") == ["th", "ing</w>"]
    assert tokenizer.encode("Dogs!") == [tokenizer.vocab[t] for t in ["do", "g", "s</w>", "!</w>"]]


def test_empty_prompt_and_single_string(folder):
    tokenizer = load_tokenizer(folder)
    ids = tokenizer("")
    assert ids.shape == (1, 77)
    assert ids[0, :2].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert (ids[0, 2:] == tokenizer.pad_token_id).all()
    assert tokenizer.decode(ids[0]) == ""
    with pytest.raises(TypeError, match="prompt 1 is a int, not a str"):
        tokenizer(["fine", 3])


def test_no_warning_at_exactly_the_context_length(folder, recwarn):
    tokenizer = load_tokenizer(folder)
    ids = tokenizer("the " * 75)  # 75 tokens + start + end = 77
    assert ids[0, 76] == tokenizer.eos_token_id and ids[0, 75] != tokenizer.eos_token_id
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    short = load_tokenizer(folder, context_length=8)
    with pytest.warns(UserWarning, match="truncated to CLIP's context length 8"):
        assert short("the " * 7).shape == (1, 8)


def test_pad_token_from_special_tokens_map(folder, tmp_path):
    """SD 2.x's tokenizer pads with "!" (special_tokens_map.json); so do we, as CLIPTokenizer does."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_text((folder / name).read_text())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "lstrip": False}}))
    tokenizer = load_tokenizer(tmp_path)
    reference, expected = _reference(tmp_path, ["the cat"])
    assert tokenizer.pad_token_id == reference.pad_token_id == tokenizer.vocab["!"]
    np.testing.assert_array_equal(tokenizer("the cat"), expected)


def test_train_tokenizer_round_trip(trained, tmp_path):
    """train → save → load with our loader AND with CLIPTokenizer: the same ids; save() round-trips."""
    out, tokenizer = trained
    assert {p.name for p in out.iterdir()} >= {"vocab.json", "merges.txt", "special_tokens_map.json"}
    vocab = json.loads((out / "vocab.json").read_text())
    assert len(vocab) <= 600 and len(tokenizer.merges) > 20
    assert sorted(vocab.values()) == list(range(len(vocab)))           # CLIP's layout: contiguous ids
    symbols = list(tok_lib.bytes_to_unicode().values())
    assert list(vocab)[:512] == symbols + [s + "</w>" for s in symbols]   # bytes, bytes + </w>, merges, specials
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert list(vocab)[512:-2] == ["".join(m) for m in tokenizer.merges]
    prompts = CAPTIONS[:5] + PROMPTS
    _, expected = _reference(out, prompts)
    with pytest.warns(UserWarning):
        np.testing.assert_array_equal(tokenizer(prompts), expected)
    assert len(tokenizer.encode("a handwritten digit seven")) == 4      # whole words after training

    tokenizer.save(tmp_path / "copy")
    np.testing.assert_array_equal(load_tokenizer(tmp_path / "copy")(prompts[:5]), tokenizer(prompts[:5]))


def test_learn_merges_by_hand_and_determinism(tmp_path):
    # "low"×5, "lower"×2, "newest"×6, "widest"×3 (Sennrich et al. 2016's example, with CLIP's </w>)
    words = ["low"] * 5 + ["lower"] * 2 + ["newest"] * 6 + ["widest"] * 3
    merges = tok_lib.learn_merges(words, 4)
    # counts: e s 9, s t</w> 9 (a tie: the alphabetically first wins), w e 8, l o 7, n e 6, e w 6, ...
    # after "e s" and "es t</w>" (9), "w e" only occurs in "lower" (2): l o (7), then the tie n e / e w (6)
    assert merges == [("e", "s"), ("es", "t</w>"), ("l", "o"), ("e", "w")]
    assert tok_lib.learn_merges(words, 100, min_frequency=7) == merges[:3]       # the next best pair occurs 6×
    first = train_tokenizer(CAPTIONS, tmp_path / "a", vocab_size=600)
    second = train_tokenizer(list(reversed(CAPTIONS)), tmp_path / "b", vocab_size=600)
    assert first.merges == second.merges                                         # order of the corpus is irrelevant
    assert (tmp_path / "a" / "vocab.json").read_text() == (tmp_path / "b" / "vocab.json").read_text()
    assert len(train_tokenizer(CAPTIONS, tmp_path / "c", vocab_size=520).merges) == 6  # capped by vocab_size


def test_train_tokenizer_bad_input(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be >= 514"):
        train_tokenizer(CAPTIONS, tmp_path, vocab_size=300)
    with pytest.raises(ValueError, match="no text to learn from"):
        train_tokenizer(["", "  "], tmp_path)


def test_missing_and_malformed_files(folder, tmp_path):
    (tmp_path / "vocab.json").write_text((folder / "vocab.json").read_text())
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nt h\nth e x\n")
    with pytest.raises(ValueError, match="merges.txt line 3 is 'th e x'; each rule must be two symbols"):
        load_tokenizer(tmp_path)
    (tmp_path / "merges.txt").write_text("t h\n")
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match="vocab.json is not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "<|startoftext|>": 1}))
    with pytest.raises(ValueError, match="no end token '<\\|endoftext\\|>'"):
        load_tokenizer(tmp_path)


def test_works_without_transformers(folder, monkeypatch):
    """The library's tokenizer needs neither transformers nor tokenizers nor regex at run time."""
    for name in ("transformers", "tokenizers", "regex", "ftfy"):
        monkeypatch.setitem(sys.modules, name, None)
    tokenizer = load_tokenizer(folder)
    assert tokenizer("the cat")[0, :4].tolist()[1:3] == [tokenizer.vocab["the</w>"], tokenizer.vocab["cat</w>"]]
