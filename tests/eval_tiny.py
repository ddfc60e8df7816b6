"""A tiny real model for evaluation tests: a byte-level BPE tokenizer trained here on WikiText-2
text (like SmolLM2's and GPT-2's: spaces are part of the following token), and a random
Hugging Face LlamaForCausalLM with that vocabulary, saved together as a checkpoint folder."""

from __future__ import annotations

import os
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(data_dir: str, vocab_size: int = 384):
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(data_dir, "wikitext2", "wiki.train.subset.txt"), encoding="utf-8") as f:
        text = f.read(100_000)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.split("\n"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_folder(folder: str, data_dir: str, seed: int = 0, **config) -> tuple[str, object, object]:
    """Writes a tiny HF Llama + tokenizer into `folder`; returns (folder, hf_model, tokenizer)."""
    import torch
    import transformers

    tokenizer = train_tokenizer(data_dir)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id, **config})
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # a sharper output distribution than the default init, so scores differ
        model.lm_head.weight.mul_(20.0)
    model = model.float().eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


_BUILT: dict = {}


def tiny_model() -> tuple[str, object, object]:
    """The tiny model folder, built once per test session: (folder, hf_model, tokenizer)."""
    if "tiny" not in _BUILT:
        from jaxcompress.data.paths import data_dir

        _BUILT["tiny"] = build_folder(os.path.join(tempfile.mkdtemp(prefix="jaxcompress-eval-"), "tiny"),
                                      data_dir())
    return _BUILT["tiny"]
