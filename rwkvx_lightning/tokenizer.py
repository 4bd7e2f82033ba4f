"""The RWKV World tokenizer (vocab `rwkv_vocab_v20230424`) that every RWKV-X model is trained with.

Encoding goes through `pyrwkv_tokenizer` (Rust, tens of MB/s per core) because shard building
tokenises whole corpora. Decoding goes through a byte table read from the same vocab file: the
Rust `decode` panics on ids that end mid-character, which a model's samples routinely do.
"""

from __future__ import annotations

import ast
import functools

from pyrwkv_tokenizer import RWKVTokenizer


@functools.cache
def _token_bytes(vocab_path: str) -> dict[int, bytes]:
    """id -> raw bytes; vocab lines read `<id> <python literal> <byte length>`."""
    table = {}
    with open(vocab_path, encoding="utf-8") as f:
        for line in f:
            idx, rest = line.split(" ", 1)
            literal, length = rest.rsplit(" ", 1)
            token = ast.literal_eval(literal)
            token = token.encode("utf-8") if isinstance(token, str) else token
            if len(token) != int(length):
                raise ValueError(f"{vocab_path}: token {idx} is {len(token)} bytes, the file says {length}")
            table[int(idx)] = token
    return table


class Tokenizer:
    """RWKV World tokenizer; id 0 is the end-of-document token, which no text encodes to."""

    name = "rwkv_vocab_v20230424"
    # The vocab file holds ids 1..65529; models pad the embedding to 65536 so ids fit uint16.
    vocab_size = 65536
    eod_token_id = 0

    def __init__(self) -> None:
        self._rust = RWKVTokenizer()

    def encode(self, text: str) -> list[int]:
        return self._rust.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts on a Rust thread pool (don't call it in a process forked after the
        parent used it: the pool's threads do not survive fork)."""
        return self._rust.encode_batch(list(texts))

    def decode(self, ids, errors: str = "replace") -> str:
        """Text of `ids`; a character cut at either end becomes U+FFFD (with errors="replace"),
        and the end-of-document token decodes to nothing."""
        table = _token_bytes(self._rust.vocab_filepath)
        try:
            raw = b"".join(table[i] for i in map(int, ids) if i != self.eod_token_id)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in vocab {self.name}") from None
        return raw.decode("utf-8", errors=errors)
