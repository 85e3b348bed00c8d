"""InternLM2 for transformers, written by xlab-deploy from the architecture (no hub code).

What it is for: LMDeploy's AWQ calibration (`lmdeploy lite`) loads a model through transformers
and finds its parts by class and module name (InternLM2DecoderLayer, InternLM2RMSNorm, the head
`output`, `attention.wqkv`, `feed_forward.w1/w2/w3`). Published InternLM2 checkpoints bring their
own modeling code from the hub; the kit's random-weight InternLM2 checkpoints carry this file
instead, so calibration, the benchmark's transformers row and a third opinion on the engines'
logits work with no hub. It also serves through the kit's transformers engine (its batcher passes
position_ids, a padded 2-D attention_mask and a DynamicCache).

The architecture: Llama's, with query, key and value packed in one `wqkv` matrix grouped per KV
head (for each KV head: its query heads, then its key, then its value), RMSNorm before attention
(`attention_norm`) and MLP (`ffn_norm`), SiLU-gated MLP (w1 gate, w3 up, w2 down), RoPE with
rotate-half pairs, untied embedding (`model.tok_embeddings`) and head (`output`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_internlm2 import InternLM2Config


class InternLM2RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rope_base(config, seq_len: int) -> float:
    """RoPE theta, grown past max_position_embeddings under `dynamic` (NTK) scaling."""
    base = float(config.rope_theta)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "dynamic" and seq_len > config.max_position_embeddings:
        factor, dim = float(scaling["factor"]), config.hidden_size // config.num_attention_heads
        base *= (factor * seq_len / config.max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
    elif kind not in (None, "default", "dynamic"):
        raise ValueError(f"rope_scaling type {kind!r} is not implemented here; use default or dynamic")
    return base


def rotary(config, position_ids: torch.Tensor, head_dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (batch, 1, seq, head_dim), computed in float32 where the positions are."""
    base = rope_base(config, int(position_ids.max()) + 1)
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                           dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # (batch, seq, head_dim / 2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class InternLM2Attention(nn.Module):
    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.wqkv = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                              bias=config.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                **kwargs):
        # Extra keywords are accepted and ignored: AWQ's scale search calls this module with the
        # decoder layer's own keywords.
        batch, seq, _ = hidden_states.shape
        qkv = self.wqkv(hidden_states).view(batch, seq, self.num_kv_heads, self.groups + 2, self.head_dim)
        q = qkv[:, :, :, :self.groups].reshape(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, self.groups].transpose(1, 2)
        v = qkv[:, :, :, self.groups + 1].transpose(1, 2)
        past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=hidden_states.device)[None].expand(batch, -1)
        cos, sin = rotary(self.config, position_ids, self.head_dim, q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        mask = attention_bias(attention_mask, batch, seq, k.shape[2], q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.groups > 1)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


def attention_bias(attention_mask, batch: int, seq: int, total: int, device) -> torch.Tensor | None:
    """A boolean (batch, 1, seq, total) mask: causal over the last `seq` positions, and the 2-D
    padding mask where one is given. None when nothing is masked (one new token, no padding)."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        return attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask
    padded = isinstance(attention_mask, torch.Tensor) and not bool(attention_mask.all())
    if seq == 1 and not padded:
        return None
    rows = torch.arange(total - seq, total, device=device)[:, None]
    mask = (torch.arange(total, device=device)[None] <= rows)[None, None].expand(batch, 1, seq, total)
    if padded:
        mask = mask & attention_mask[:, None, None, -total:].bool()
    return mask


class InternLM2MLP(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                **kwargs):
        hidden_states = hidden_states + self.attention(
            self.attention_norm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values)
        return hidden_states + self.feed_forward(self.ffn_norm(hidden_states))


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["InternLM2DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, InternLM2RMSNorm):
            nn.init.ones_(module.weight)


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, **kwargs):
        from transformers.cache_utils import DynamicCache

        # transformers 5.24 renamed `past_key_values` to `cache`; both are taken.
        past_key_values = cache if cache is not None else past_key_values
        hidden = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device)[None]
            position_ids = position_ids.expand(hidden.shape[0], -1)
        for layer in self.layers:
            # Keywords, not positions: LMDeploy's calibration splits and replays a layer's inputs.
            hidden = layer(hidden, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden),
                                       past_key_values=past_key_values if use_cache else None)


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, value):
        self.output = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None,
                **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache if cache is not None else past_key_values,
                         inputs_embeds=inputs_embeds,
                         use_cache=self.config.use_cache if use_cache is None else use_cache)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.output(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


__all__ = ["InternLM2ForCausalLM", "InternLM2Model", "InternLM2PreTrainedModel"]
