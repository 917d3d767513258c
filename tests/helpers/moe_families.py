"""The MoE conformance matrix's table: a tiny random config per Mixture-of-Experts family (fp32).

Every causal LM family transformers 5.24 ships with a router load-balancing loss
(`load_balancing_loss_func` in its modeling file, called by its forward) is here, 4 experts,
top-2, 2 layers (hidden 16), with the fields each family needs to build that small. Adding a
family is one line. `ROUTER_WITHOUT_AUX` lists families whose config has a router
(`output_router_logits`) but whose transformers forward computes no auxiliary loss.
"""

from __future__ import annotations

import torch

from helpers.families import WINDOW

_BASE = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 128, "initializer_range": 0.5}
_TOP2 = {"num_experts": 4, "num_experts_per_tok": 2}
_LOCAL = {"num_local_experts": 4, "num_experts_per_tok": 2}
_HYBRID = ["linear_attention", "full_attention"]  # a linear-attention layer, then a full one
_QWEN = {**_BASE, **_TOP2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}

# name -> (model_type, config fields)
MOE_FAMILIES: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", {**_BASE, **_LOCAL}),
    "qwen2-moe": ("qwen2_moe", _QWEN),
    "qwen3-moe": ("qwen3_moe", _QWEN),
    "qwen3-next": ("qwen3_next", {**_QWEN, "layer_types": _HYBRID}),
    "qwen3.5-moe": ("qwen3_5_moe_text", {**_QWEN, "layer_types": _HYBRID}),
    "qwen4-exp": ("qwen4_exp_text", {**_QWEN, "layer_types": _HYBRID, "indexer_n_heads": 2, "indexer_kv_heads": 1,
                                     "indexer_head_dim": 8, "indexer_budget": 8, "indexer_compress_ratio": 2}),
    "olmoe": ("olmoe", {**_BASE, **_TOP2}),
    "flex-olmo": ("flex_olmo", {**_BASE, **_TOP2, "num_key_value_heads": 2}),
    "gpt-oss": ("gpt_oss", {**_BASE, **_LOCAL}),
    "granitemoe": ("granitemoe", {**_BASE, **_LOCAL}),
    "granitemoe-shared": ("granitemoeshared", {**_BASE, **_LOCAL, "shared_intermediate_size": 16}),
    "granitemoe-swa": ("granitemoe_swa", {**_BASE, **_LOCAL}),
    "granitemoe-hybrid": ("granitemoehybrid", {**_BASE, **_LOCAL, "shared_intermediate_size": 16,
                                               "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8,
                                               "mamba_n_groups": 1, "mamba_expand": 2, "mamba_chunk_size": 8,
                                               "layer_types": ["mamba", "attention"]}),
    "jamba": ("jamba", {**_BASE, **_LOCAL, "attn_layer_period": 2, "attn_layer_offset": 1,
                        "expert_layer_period": 1, "expert_layer_offset": 0}),
    "jetmoe": ("jetmoe", {**_BASE, "num_local_experts": 4, "num_experts_per_tok": 2, "kv_channels": 8}),
    "dbrx": ("dbrx", {"d_model": 16, "n_heads": 2, "n_layers": 2, "max_seq_len": 128,
                      "attn_config": {"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0},
                      "ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2}}),
    "deepseek-v4": ("deepseek_v4", {**_BASE, "moe_intermediate_size": 16, "n_routed_experts": 4,
                                    "num_experts_per_tok": 2, "n_shared_experts": 1, "q_lora_rank": 8,
                                    "o_lora_rank": 8, "o_groups": 1, "index_n_heads": 2, "index_head_dim": 8,
                                    "index_topk": 4, "qk_rope_head_dim": 4, "sliding_window": WINDOW,
                                    "layer_types": ["heavily_compressed_attention", "compressed_sparse_attention"],
                                    "mlp_layer_types": ["moe", "moe"], "num_nextn_predict_layers": 0}),
    "ernie4.5-moe": ("ernie4_5_moe", {**_BASE, **_TOP2, "moe_intermediate_size": 16}),
    "flint": ("flint", {**_QWEN, "mlp_only_layers": [], "sliding_window": WINDOW,
                        "layer_types": ["full_attention", "sliding_attention"]}),
    "laguna": ("laguna", {**_QWEN}),
    "lara-mini": ("lara_mini", {**_QWEN}),
    "mellum": ("mellum", {**_QWEN}),
    "minimax": ("minimax", {**_BASE, **_LOCAL}),
    "minimax-m2": ("minimax_m2", {**_BASE, **_LOCAL}),
    "minimax-m3": ("minimax_m3_vl_text", {**_BASE, **_LOCAL}),
    "phimoe": ("phimoe", {**_BASE, **_LOCAL}),
}

# Families with a router whose transformers 5.24 forward computes no load-balancing loss.
ROUTER_WITHOUT_AUX: dict[str, tuple[str, dict]] = {
    "deepseek-v2": ("deepseek_v2", {**_BASE, "moe_intermediate_size": 16, "n_routed_experts": 4,
                                    "num_experts_per_tok": 2, "n_shared_experts": 1}),
    "deepseek-v3": ("deepseek_v3", {**_BASE, "moe_intermediate_size": 16, "n_routed_experts": 4,
                                    "num_experts_per_tok": 2, "n_shared_experts": 1}),
}


def moe_config(name: str, tokenizer, attn: str = "eager"):
    from transformers import AutoConfig

    model_type, fields = {**MOE_FAMILIES, **ROUTER_WITHOUT_AUX}[name]
    ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **ids, **fields)
    config._attn_implementation = attn
    return config


def build_moe(name: str, tokenizer, attn: str = "eager", seed: int = 0):
    """A randomly initialised tiny MoE model of family `name`, fp32, from its config."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(moe_config(name, tokenizer, attn), dtype=torch.float32)
