"""BPE Transformer: a byte-level BPE tokenizer (the `tokenizers` library, GPT-2 style:
ByteLevel pre-tokenizer with its regex split and 256-symbol byte alphabet, ByteLevel
decoder) trained on the training split, and the shared Transformer over its tokens
(baselines/token_lm.py: byte accounting, FLOPs, cache).

Ids: 0 is BOS (`<|bos|>`), 1..256 the byte alphabet, then the merges. Text that spells
`<|bos|>` is tokenized as ordinary text (encode_special_tokens), so no input byte
string can turn into a special token.
"""

from __future__ import annotations

from pathlib import Path

import tokenizers
from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from baselines.llama_export import write_llama
from baselines.token_lm import TokenLM, TokenLMConfig, Vocabulary
from harness.api import BYTE_VOCAB, register

BOS_TOKEN = "<|bos|>"


class BPEConfig(TokenLMConfig):
    min_frequency: int = Field(2, ge=1, description="a merge needs its pair at least this often in the training split")


def _gpt2_table() -> list[str]:
    """The ByteLevel symbol of each byte value 0..255 (GPT-2's table, which ByteLevel uses):
    printable Latin-1 bytes stand for themselves, the others move to U+0100 onwards."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    shifted = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(BYTE_VOCAB)]


BYTE_SYMBOLS = _gpt2_table()


def new_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


@register
class BPETransformer(TokenLM):
    name = "bpe"
    description = "byte-level BPE tokenizer (tokenizers) trained on the train split + decoder-only Transformer over its tokens"
    Config = BPEConfig
    min_vocab = BYTE_VOCAB + 1  # the byte alphabet + BOS

    def tokenizer_settings(self) -> dict:
        return {"vocab_size": self.config.vocab_size, "min_frequency": self.config.min_frequency,
                "library": f"tokenizers {tokenizers.__version__}"}

    def fit_tokenizer(self, texts: list[str]) -> str:
        tokenizer = new_tokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=self.config.vocab_size, min_frequency=self.config.min_frequency, special_tokens=[BOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        return tokenizer.to_str()

    def load_tokenizer(self, serialized: str) -> Vocabulary:
        tokenizer = Tokenizer.from_str(serialized)
        tokenizer.encode_special_tokens = True
        to_byte = {symbol: b for b, symbol in enumerate(BYTE_SYMBOLS)}
        bos = tokenizer.token_to_id(BOS_TOKEN)
        pieces = [b"" if i == bos else bytes(to_byte[ch] for ch in tokenizer.id_to_token(i))
                  for i in range(tokenizer.get_vocab_size())]

        encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets (tokenizers >= 0.20)

        def encode_texts(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in encode_batch(texts, add_special_tokens=False)]

        return Vocabulary(encode_texts, pieces, [tokenizer.token_to_id(s) for s in BYTE_SYMBOLS], bos)

    def export(self, out_dir: Path, record: dict) -> str:
        """A LlamaForCausalLM (MistralForCausalLM with a sliding window) and a PreTrainedTokenizerFast
        whose post-processor prepends BOS, as the harness does for every window. On valid UTF-8 it
        gives the harness's ids. Two differences, both outside what text input can express the same
        way: the harness writes invalid UTF-8 bytes as one-byte tokens (a str cannot hold them), and
        it tokenizes a literal `<|bos|>` in the data as text, while the exported tokenizer, like any
        transformers tokenizer, maps it to the special token."""
        from transformers import PreTrainedTokenizerFast

        tokenizer = Tokenizer.from_str(self.tokenizer_state["tokenizer"])
        bos = tokenizer.token_to_id(BOS_TOKEN)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, clean_up_tokenization_spaces=False)
        architecture = write_llama(self, fast, out_dir, record)
        return f"a transformers {architecture} and its tokenizer"
