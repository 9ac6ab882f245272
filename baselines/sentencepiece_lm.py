"""SentencePiece Transformer: a SentencePiece tokenizer (unigram by default, BPE
selectable) trained on the training split with byte fallback, and the shared
Transformer over its tokens (baselines/token_lm.py: byte accounting, FLOPs, cache).

SentencePiece takes text and by default rewrites it (NFKC, collapsing spaces, a
leading space). Here it is made exact: normalization_rule_name "identity",
remove_extra_whitespaces and add_dummy_prefix off, byte_fallback on (a character
outside the vocabulary becomes its UTF-8 bytes as <0xXX> pieces). One character
cannot round-trip through the library: U+2581, its own whitespace symbol, which
decodes to a space; the harness writes that character (like invalid UTF-8) as
<0xXX> byte pieces itself, so every byte string round-trips.

Ids: 0 <unk> (never produced: byte fallback covers every character), 1 BOS (<s>),
2..257 the byte pieces <0x00>..<0xFF>, then the learned pieces. The module is not
called sentencepiece.py, which would shadow the library.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Literal

import sentencepiece as spm
from pydantic import Field

from baselines.token_lm import TokenLM, TokenLMConfig, Vocabulary
from harness.errors import HarnessError
from harness.api import BYTE_VOCAB, register

WHITESPACE_SYMBOL = "\u2581"


class SentencePieceConfig(TokenLMConfig):
    model_type: Literal["unigram", "bpe"] = Field("unigram", description="SentencePiece algorithm")
    character_coverage: float = Field(0.9995, gt=0, le=1, description="share of the training split's characters "
                                      "given their own piece; the rest fall back to bytes")


@register
class SentencePieceTransformer(TokenLM):
    name = "sentencepiece"
    description = ("SentencePiece tokenizer (unigram or BPE, byte fallback) trained on the train split "
                   "+ decoder-only Transformer over its tokens")
    Config = SentencePieceConfig
    min_vocab = BYTE_VOCAB + 2  # the byte pieces + <unk> + BOS

    def tokenizer_settings(self) -> dict:
        c = self.config
        return {"vocab_size": c.vocab_size, "model_type": c.model_type, "character_coverage": c.character_coverage,
                "library": f"sentencepiece {spm.__version__}"}

    def reserved_characters(self) -> str:
        return WHITESPACE_SYMBOL

    def fit_tokenizer(self, texts: list[str]) -> str:
        c = self.config
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=model, vocab_size=c.vocab_size, model_type=c.model_type,
                character_coverage=c.character_coverage, byte_fallback=True, normalization_rule_name="identity",
                add_dummy_prefix=False, remove_extra_whitespaces=False, max_sentence_length=1 << 16,
                unk_id=0, bos_id=1, eos_id=-1, pad_id=-1, num_threads=os.cpu_count() or 1, minloglevel=2,
                hard_vocab_limit=True)
        except (RuntimeError, OSError) as e:
            # e.g. "INTERNAL: src/trainer_interface.cc(744) [check] Vocabulary size too high (5000). ..."
            lines = str(e).strip().splitlines()
            reason = lines[-1].split("] ", 1)[-1] if lines else type(e).__name__
            raise HarnessError(f"sentencepiece could not train a {c.model_type} tokenizer of vocab_size "
                               f"{c.vocab_size} on the training split: {reason}") from None
        return base64.b64encode(model.getvalue()).decode("ascii")

    def load_tokenizer(self, serialized: str) -> Vocabulary:
        processor = spm.SentencePieceProcessor(model_proto=base64.b64decode(serialized))
        pieces = []
        for i in range(processor.get_piece_size()):
            if processor.is_byte(i):
                pieces.append(bytes([int(processor.id_to_piece(i)[3:5], 16)]))
            elif processor.is_control(i) or processor.is_unknown(i):
                pieces.append(b"")
            else:
                pieces.append(processor.id_to_piece(i).replace(WHITESPACE_SYMBOL, " ").encode("utf-8"))
        byte_ids = [processor.piece_to_id(f"<0x{b:02X}>") for b in range(BYTE_VOCAB)]

        def encode_texts(texts: list[str]) -> list[list[int]]:
            return processor.encode(texts, out_type=int)

        return Vocabulary(encode_texts, pieces, byte_ids, processor.bos_id(), WHITESPACE_SYMBOL)
