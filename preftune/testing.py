"""Tiny random models and tokenizers built in code, for tests and examples.

Nothing here touches the network or the disk: a byte-level tokenizer with a ChatML
chat template, and a 2-layer Llama with a few thousand parameters.
"""

from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ bos_token if loop.first and add_bos_in_template else '' }}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def tiny_tokenizer(*, bos: bool = False, chat_template: bool = True, pad_token: str | None = "<|im_end|>"):
    """A byte-level tokenizer (one token per byte, no merges) plus ChatML special tokens.

    bos: prepend ``<|im_start|>`` as BOS to every encoding (to test double-BOS handling).
    chat_template: attach a ChatML template (False to test the missing-template error).
    pad_token: the pad token, or None for a tokenizer without one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", 1)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>" if bos else None,
        unk_token=None,
        pad_token=pad_token,
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE.replace("add_bos_in_template", "false")
    return tok


def tiny_config(vocab_size: int = 300, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        pad_token_id=None,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(vocab_size: int = 300, seed: int = 0, **overrides):
    """A 2-layer random Llama in float32, eval mode off (training mode), SDPA attention."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size, **overrides))
    model.config._attn_implementation = "sdpa"
    return model
