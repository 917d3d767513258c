"""A tiny Llama written as a GGUF file (what llama.cpp's converter writes, in miniature), built
offline with the `gguf` package: a byte-level BPE tokenizer trained on the toy words with ChatML's
special tokens and template, and a random tiny Llama whose weights are known, so a test can check
that loading the file gives back exactly these weights.

Bad files for the one-line errors: `corrupt_gguf` writes a file with an unsupported architecture
or a tensor of a type nothing can dequantize.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from helpers.toy import build_tiny_llama, toy_words

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # unk, BOS, EOS (= PAD): SmolLM2's ids 0, 1, 2


def chatml_tokenizer():
    """Byte-level BPE on the toy words with SmolLM2's special tokens at ids 0-2 (no BOS added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(toy_words())] * 4 + ["user assistant system"], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[1], eos_token=SPECIALS[2],
                                   pad_token=SPECIALS[2], unk_token=SPECIALS[0])
    fast.chat_template = CHATML
    return fast


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary reordering of q/k rows (transformers' GGUF loader undoes it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, *, seed: int = 0, architecture: str = "llama",
                    raw_types: dict[str, str] | None = None) -> tuple[Path, torch.nn.Module]:
    """Write a tiny Llama (hidden 64, 2 layers) and its tokenizer as one GGUF file; returns the
    path and the model whose weights it holds. `raw_types` maps a GGUF tensor name to a ggml type
    name (e.g. {"token_embd.weight": "Q8_1"}) whose bytes are written raw instead of the weights."""
    import gguf

    tokenizer = chatml_tokenizer()
    model = build_tiny_llama(tokenizer, seed=seed, hidden=64, layers=2, heads=4)
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tokenizer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem) + "." + suffix
        weight = tensor.numpy()
        if stem.endswith("q_proj"):
            weight = _permute(weight, config.num_attention_heads)
        elif stem.endswith("k_proj"):
            weight = _permute(weight, config.num_key_value_heads)
        raw = (raw_types or {}).get(name)
        if raw:
            qtype = gguf.GGMLQuantizationType[raw]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw_bytes = np.zeros((weight.shape[0], weight.shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(name, raw_bytes, raw_shape=raw_bytes.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def _add_tokenizer(writer, tokenizer) -> None:
    """GGUF's "gpt2" (byte-level BPE) tokenizer record: tokens by id, their types, merges, ids."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(state["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
