"""The conformance matrix's one table: a tiny random config per architecture family (fp32).

Adding a family is one line: model_type -> the config fields that make it tiny. Every model is
hidden 16-32, 1-2 layers, with any local or sliding window (WINDOW) shorter than the test
sequences, so a layout that ignores the window shows up as a wrong log-prob.
"""

from __future__ import annotations

import torch

from dpokit.data.pairs import PreferencePair
from dpokit.data.tokenize import PairTokenizer
from dpokit.model.attention import PACKED_LAYOUTS
from dpokit.model.capability import configure_forward
from helpers.toy import make_pairs

WINDOW = 4
_LLAMA_LIKE = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "max_position_embeddings": 128}
_SW = {"sliding_window": WINDOW}
_GPT = {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 128}
# Encoder-decoder families' decoders as causal LMs (as many encoder layers: the cache is sized by them).
_SEQ2SEQ = {"d_model": 16, "decoder_layers": 2, "encoder_layers": 2, "decoder_attention_heads": 2,
            "encoder_attention_heads": 2, "decoder_ffn_dim": 32, "encoder_ffn_dim": 32, "max_position_embeddings": 128}

# name -> (model_type, config fields)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", _LLAMA_LIKE),
    "mistral": ("mistral", {**_LLAMA_LIKE, **_SW}),
    "qwen2": ("qwen2", _LLAMA_LIKE),
    "qwen2-sliding": ("qwen2", {**_LLAMA_LIKE, **_SW, "use_sliding_window": True, "max_window_layers": 1}),
    "qwen3": ("qwen3", {**_LLAMA_LIKE, "head_dim": 8}),
    "gemma": ("gemma", {**_LLAMA_LIKE, "head_dim": 8}),
    "gemma2": ("gemma2", {**_LLAMA_LIKE, **_SW, "head_dim": 8}),
    "gemma3": ("gemma3_text", {**_LLAMA_LIKE, **_SW, "head_dim": 8, "sliding_window_pattern": 2}),
    "phi": ("phi", {**_LLAMA_LIKE, "num_key_value_heads": 2}),
    "phi3": ("phi3", {**_LLAMA_LIKE, **_SW, "num_key_value_heads": 2}),
    "gpt2": ("gpt2", _GPT),
    "gpt-neox": ("gpt_neox", {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "max_position_embeddings": 128}),
    "gptj": ("gptj", {**_GPT, "rotary_dim": 4}),
    "gpt-neo": ("gpt_neo", {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 128,
                            "attention_types": [[["global", "local"], 1]], "window_size": WINDOW}),
    "opt": ("opt", {"hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "word_embed_proj_dim": 16, "max_position_embeddings": 128}),
    "falcon": ("falcon", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}),
    "falcon-alibi": ("falcon", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                                "alibi": True}),
    "mpt": ("mpt", {"d_model": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 128}),
    "bloom": ("bloom", {"hidden_size": 16, "n_layer": 2, "n_head": 2}),
    "olmo2": ("olmo2", _LLAMA_LIKE),
    "persimmon": ("persimmon", {k: v for k, v in _LLAMA_LIKE.items() if k != "num_key_value_heads"}),
    "stablelm": ("stablelm", _LLAMA_LIKE),
    "starcoder2": ("starcoder2", {**_LLAMA_LIKE, **_SW}),
    "cohere": ("cohere", _LLAMA_LIKE),
    "granite": ("granite", _LLAMA_LIKE),
    "mixtral": ("mixtral", {**_LLAMA_LIKE, **_SW, "num_local_experts": 4, "num_experts_per_tok": 2}),
    # Its decoder layers call attention without the forward's keyword arguments (transformers 5.24).
    "nemotron": ("nemotron", _LLAMA_LIKE),
    # Learned (BART, mBART) or sinusoidal (Marian) positions counted by column, whatever position_ids says.
    "bart": ("bart", _SEQ2SEQ),
    "mbart": ("mbart", _SEQ2SEQ),
    "marian": ("marian", _SEQ2SEQ),
    # A sliding_window the model's forward never applies: Llama has none; Moshi's (default 3000) is stale.
    "llama-stale-window": ("llama", {**_LLAMA_LIKE, **_SW}),
    "moshi": ("moshi", {**_LLAMA_LIKE, **_SW}),
}


def family_config(name: str, tokenizer, attn: str = "sdpa", dropout: float = 0.0):
    """The tiny config of family `name`; `dropout` > 0 sets every float dropout/pdrop field to it."""
    from transformers import AutoConfig

    model_type, fields = FAMILIES[name]
    ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **ids, **fields)
    config._attn_implementation = attn
    if dropout:
        for key, value in vars(config).items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, dropout)
    return config


def attention_kinds(name: str) -> list[str]:
    """The attention kinds family `name` supports on CPU: eager, and sdpa and segments (dpokit's
    segment attention over sdpa; `auto` keeps sdpa where it is not exact) where it has sdpa."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.for_model(FAMILIES[name][0]))]
    return ["eager", "segments", "sdpa"] if model_class._supports_sdpa else ["eager"]


def build_family(name: str, tokenizer, attn: str = "eager", seed: int = 0, dropout: float = 0.0):
    """A randomly initialised tiny model of family `name`, fp32, from its config."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = family_config(name, tokenizer, "sdpa" if attn == "segments" else attn, dropout)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if attn == "segments":
        # As a run sets it up whose batches are large: segments on every packed row, where exact.
        configure_forward(model, choice="auto", layouts=PACKED_LAYOUTS, mask_cells=None, log=lambda line: None)
    return model


def family_pairs(tok, count: int = 4) -> list:
    """Toy pairs tokenized for the matrix: their sequences are longer than WINDOW."""
    rows = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], i) for i, r in enumerate(make_pairs(count, 5))]
    return PairTokenizer(tok, max_length=64).tokenize(rows)[0]
