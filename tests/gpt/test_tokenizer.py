"""The character tokenizer: round trip (property-tested), special ids, errors, to_dict."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpt.tokenizer import CharTokenizer, tokenizer_from_dict

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\tÉté — ünïcödé 🙂"
TOK = CharTokenizer.from_text(CORPUS)


@given(st.text(alphabet=sorted(set(CORPUS)), max_size=200))
def test_encode_decode_round_trip(text):
    ids = TOK.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < TOK.vocab_size - 2 for i in ids)
    assert TOK.decode(ids) == text
    assert TOK.decode([TOK.bos_id, *ids, TOK.eos_id]) == text  # specials are skipped


@given(st.text(min_size=1, max_size=100))
def test_round_trip_on_its_own_training_text(text):
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text)) + 2


def test_ids_are_sorted_characters_then_bos_eos():
    tok = CharTokenizer.from_text("banana")
    assert tok.chars == ["a", "b", "n"]
    assert tok.encode("nab") == [2, 0, 1]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (3, 4, 5)


def test_unknown_characters_raise_naming_them():
    with pytest.raises(ValueError, match=r"2 character\(s\).*'q', 'x'") as e:
        TOK.encode("hear qx")
    assert "\n" not in str(e.value)


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="outside"):
        TOK.decode([TOK.vocab_size])
    with pytest.raises(ValueError, match="outside"):
        TOK.decode([-1])


def test_empty_text_is_refused():
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")


def test_to_dict_is_json_and_rebuilds_the_same_tokenizer():
    d = json.loads(json.dumps(TOK.to_dict()))
    assert d["kind"] == "char"
    tok = tokenizer_from_dict(d)
    assert isinstance(tok, CharTokenizer)
    assert tok.chars == TOK.chars and tok.vocab_size == TOK.vocab_size
    assert tok.encode(CORPUS) == TOK.encode(CORPUS)


def test_tokenizer_from_dict_errors():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        tokenizer_from_dict({"kind": "wordpiece"})
    with pytest.raises(ValueError, match="unknown tokenizer kind None"):
        tokenizer_from_dict({})
    with pytest.raises(ValueError, match="duplicates"):
        tokenizer_from_dict({"kind": "char", "chars": "aba"})
