"""Character-level tokenizer: one id per distinct character of the training text (in sorted
order), then two special ids, BOS (begin of sequence) and EOS (end of sequence).
`tokenizer_from_dict` rebuilds a tokenizer, char, BPE or GPT-2's (gpt/bpe.py), from its saved
dict.
"""

from __future__ import annotations

from collections.abc import Iterable


class CharTokenizer:
    """Characters <-> ids.  ids 0..n-1 are the characters, n is BOS, n+1 is EOS.

    >>> tok = CharTokenizer.from_text("hello")
    >>> tok.encode("hole")
    [1, 3, 2, 0]
    >>> tok.decode([tok.bos_id, 1, 0, 2, 2, 3, tok.eos_id])
    'hello'
    """

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer: no characters; train it on non-empty text")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer: every vocabulary entry must be a single character")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: the character list has duplicates")
        self.chars = chars  # id -> character
        self.stoi = {c: i for i, c in enumerate(chars)}  # character -> id
        self.bos_id = len(chars)
        self.eos_id = len(chars) + 1

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """A tokenizer whose vocabulary is the sorted set of characters in `text`."""
        if not text:
            raise ValueError("CharTokenizer.from_text: the text is empty; give it training text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 2  # the characters, BOS and EOS

    def encode(self, text: str) -> list[int]:
        """The id of each character of `text`; ValueError naming any unknown characters."""
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - stoi.keys())
            shown = ", ".join(repr(c) for c in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise ValueError(
                f"text has {len(unknown)} character(s) the tokenizer does not know: {shown}{more} "
                "(use text made of the training characters, or retrain on text that has them)"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; BOS and EOS are skipped."""
        chars, n = self.chars, len(self.chars)
        out = []
        for i in ids:
            i = int(i)
            if 0 <= i < n:
                out.append(chars[i])
            elif i not in (self.bos_id, self.eos_id):
                raise ValueError(f"token id {i} is outside this tokenizer's [0, {self.vocab_size})")
        return "".join(out)

    def to_dict(self) -> dict:
        """A JSON-able description; tokenizer_from_dict() rebuilds the same tokenizer."""
        return {"kind": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        if d.get("kind") != "char" or not isinstance(d.get("chars"), str):
            raise ValueError("not a char tokenizer dict (need kind 'char' and a 'chars' string)")
        return cls(d["chars"])


def tokenizer_from_dict(d: dict):
    """Rebuild a tokenizer from its to_dict(): "char" -> CharTokenizer, "bpe" -> BPETokenizer."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "char":
        return CharTokenizer.from_dict(d)
    if kind == "bpe":
        from .bpe import BPETokenizer  # imported only when needed

        return BPETokenizer.from_dict(d)
    if kind == "gpt2":
        from .bpe import GPT2Tokenizer

        return GPT2Tokenizer.from_dict(d)
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'char', 'bpe' or 'gpt2')")
