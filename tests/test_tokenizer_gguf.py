"""The tokenizer rebuilt from GGUF metadata: same ids as SentencePiece, round trips, and a model that understands it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer

from ecoquant.data.corpus import load_corpus
from ecoquant.fixtures.gemma3_gguf import gguf_metadata
from ecoquant.fixtures.sp_tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    SPACE,
    USER_DEFINED,
    SpVocab,
    bpe_merges,
    build_tokenizer,
    sentencepiece_model_proto,
    sp_vocab_from_gguf_fields,
)

PARAGRAPH = (
    "Größe: 3,141.59 m² — naïve café in Zürich; 東京 is 9,226 km away 🙂.\n"
    "Line two\tends with a tab, then  two spaces and 1234567890 digits.\n\n"
    "«Quotes», ‘curly’ and “double”; ∑ x² ≤ ∞ and Ω ≈ 42 % of € 7,50."
)


@pytest.fixture(scope="module")
def vocab(gemma3_gguf: tuple[Path, object]) -> SpVocab:
    _, reader = gemma3_gguf
    meta = gguf_metadata(reader)
    return sp_vocab_from_gguf_fields({k: v for k, v in meta.items() if k.startswith("tokenizer.ggml.")})


@pytest.fixture(scope="module")
def tok(gemma3_270m: Path) -> Tokenizer:
    return Tokenizer.from_file(str(gemma3_270m / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf(gemma3_270m: Path) -> Any:
    """The folder's tokenizer as transformers loads it (GemmaTokenizer over our tokenizer.json)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma3_270m)


@pytest.fixture(scope="module")
def sp(vocab: SpVocab) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=sentencepiece_model_proto(vocab))


# --- tiny vocabulary: the merge rule itself, in milliseconds -------------------------------------------------


def _tiny_vocab() -> SpVocab:
    specials = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", CONTROL)]
    user = [(SPACE * 2, USER_DEFINED), ("\n", USER_DEFINED)]
    byte_pieces = [(f"<0x{b:02X}>", BYTE) for b in range(256)]
    # Scores decide the merge order; "▁th" + "e" and "▁t" + "he" both make "▁the".
    normal = ["▁t", "he", "▁the", "▁a", "in", "▁th", "er", "▁in", "▁", "t", "h", "e", "a", "i", "n", "r", "s", "x"]
    pieces = specials + user + byte_pieces + [(p, NORMAL) for p in normal]
    scores = [0.0] * (len(specials) + len(user) + len(byte_pieces)) + [-float(i) for i in range(len(normal))]
    return SpVocab(
        pieces=tuple(p for p, _ in pieces),
        scores=tuple(scores),
        types=tuple(t for _, t in pieces),
        bos_id=2,
        eos_id=1,
        unk_id=3,
        pad_id=0,
        add_bos=True,
        add_eos=False,
        add_space_prefix=False,
    )


def test_merges_are_ranked_by_score_of_the_merged_piece() -> None:
    merges = bpe_merges(_tiny_vocab())
    # "▁t" (score 0) is made before "he" (-1) before "▁the" (-2); both splits of "▁the" are listed.
    assert merges[0] == ("▁", "t")
    assert merges[1] == ("h", "e")
    assert set(merges[2:4]) == {("▁t", "he"), ("▁th", "e")}


def test_tiny_vocabulary_matches_sentencepiece_on_random_text() -> None:
    v = _tiny_vocab()
    tok = build_tokenizer(v)
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model_proto(v))
    rng = random.Random(0)
    alphabet = list("thearinsx ") + ["\n", "é", "🙂", "  "]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        assert tok.encode(text).ids == [v.bos_id] + sp.encode(text), repr(text)
        assert tok.decode(tok.encode(text).ids) == text


# --- the real Gemma-3 vocabulary ------------------------------------------------------------------------------


def test_common_english_words_are_single_tokens(tok: Tokenizer) -> None:
    for word in ["The", " the", " house", " because", " people", " water", " Monday", " capital", " France"]:
        ids = tok.encode(word).ids
        assert len(ids) == 2, (word, tok.encode(word).tokens)


def test_bos_comes_first_once(tok: Tokenizer, vocab: SpVocab) -> None:
    ids = tok.encode("The capital of France is").ids
    assert ids[0] == vocab.bos_id == 2
    assert ids.count(vocab.bos_id) == 1
    assert tok.encode("The capital of France is").tokens[1:] == ["The", "▁capital", "▁of", "▁France", "▁is"]


def test_decode_encode_round_trips_unicode_and_digits(tok: Tokenizer, hf: Any) -> None:
    assert tok.decode(tok.encode(PARAGRAPH).ids, skip_special_tokens=True) == PARAGRAPH
    assert hf.decode(hf(PARAGRAPH)["input_ids"], skip_special_tokens=True) == PARAGRAPH
    # Digits are single tokens, as Gemma's SentencePiece model splits them.
    assert tok.encode("1234567890").tokens[1:] == list("1234567890")


def test_ids_equal_sentencepiece_built_from_the_same_metadata(
    tok: Tokenizer, sp: spm.SentencePieceProcessor, vocab: SpVocab
) -> None:
    chapter = load_corpus().evaluation[0]
    texts = [
        PARAGRAPH,
        chapter,
        "def f(x):\n    return x  # two spaces\n\n\n        deep indent\t\ttabs",
        "<table><tr><td>1</td></tr></table> and </div>",
        "   leading spaces, trailing   ",
        "\x00\x01 control bytes",
    ]
    # Runs of a repeated unit are where BPE tie-breaking could differ (see bpe_merges).
    texts += [unit * k for unit in ("a", "=", "-", ".", "ha", "aa", "0", "—", "ー", " ", "\t", "ab ") for k in range(1, 40)]
    for text in texts:
        assert tok.encode(text).ids == [vocab.bos_id] + sp.encode(text), text[:60]


def test_runs_of_spaces_use_gemmas_whitespace_pieces(tok: Tokenizer) -> None:
    # llama.cpp stores these user-defined pieces with plain spaces; restored to "▁" they match again.
    assert tok.encode("    return x").tokens == ["<bos>", SPACE * 4, "return", "▁x"]


def test_transformers_loads_the_same_tokenizer(tok: Tokenizer, hf: Any) -> None:
    for text in (PARAGRAPH, "    return x", "Monday, Tuesday, Wednesday,"):
        assert hf(text)["input_ids"] == tok.encode(text).ids


def test_chat_template_marks_turns_with_control_tokens(hf: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [2, hf.convert_tokens_to_ids("<start_of_turn>")]
    assert ids.count(hf.convert_tokens_to_ids("<end_of_turn>")) == 3


def test_greedy_continuation_names_the_next_days(gemma3_270m: Path, hf: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma3_270m, dtype=torch.bfloat16).eval()
    inputs = hf("Monday, Tuesday, Wednesday,", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    continuation = hf.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert continuation.startswith(" Thursday, Friday, Saturday"), continuation
