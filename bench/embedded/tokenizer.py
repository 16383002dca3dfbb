"""The word-level tokenizer of the embedded model: one id per task word, saved as a `PreTrainedTokenizerFast`."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bench.embedded.scenes import vocabulary

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL = (PAD, BOS, EOS, UNK, IMAGE)
CHAT_WORDS = ("USER", "ASSISTANT", ":")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Special tokens first (<pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4), then the chat words and the task words.
    Words are split on whitespace and punctuation; decoding joins them with single spaces."""
    words = list(SPECIAL) + list(CHAT_WORDS) + vocabulary()
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[IMAGE],
        padding_side="right",
        model_max_length=512,
    )
    return tok
