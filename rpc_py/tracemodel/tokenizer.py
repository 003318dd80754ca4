"""The word-level tokenizer of the trace model: one token per whitespace-separated word.

Built from ``task.VOCAB_WORDS`` with the ``tokenizers`` library and saved as a transformers fast
tokenizer, so ``AutoTokenizer.from_pretrained`` loads it like any other.
"""

from __future__ import annotations

from .task import VOCAB_WORDS

__all__ = ["build_tokenizer"]


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` over the task's words (``<s>`` prepended, left padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=8192,
    )
