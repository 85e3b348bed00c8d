"""The project's own transformers implementation of InternLM2 (tests/fixtures/internlm2_hf/), on this CPU.

It exists for the GPU work (LMDeploy's AWQ calibration, the benchmark's transformers row, a third
opinion on the engines' logits on InternLM2 shapes), where no hub code can be downloaded. Here it
is checked against independent parts: transformers' own Llama, fed the same weights with `wqkv`
unpacked as LMDeploy unpacks it (layout "hgd": per KV head, its query heads, then key, then value);
its cached decode against full forwards; and the kit's transformers engine serving it in a batch.
Random weights from tools/make_random_internlm2.py (tiny shapes: GQA 4/2 heads), with the bundled
SmolLM2's tokenizer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from deploy.engines import GenerationParams
from deploy.engines.transformers_engine import TransformersEngine

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tiny_internlm2) -> Path:
    return tiny_internlm2


@pytest.fixture(scope="module")
def model(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True,
                                                dtype=torch.float32).eval()


def as_llama(model) -> LlamaForCausalLM:
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=heads, num_key_value_heads=kv,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False, attention_bias=False)).eval()
    src = model.state_dict()
    dst = {"model.embed_tokens.weight": src["model.tok_embeddings.weight"],
           "model.norm.weight": src["model.norm.weight"], "lm_head.weight": src["output.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        packed = src[p + "attention.wqkv.weight"].unflatten(0, (kv, -1, head_dim))
        dst[q + "self_attn.q_proj.weight"] = packed[:, :-2].flatten(0, 2)
        dst[q + "self_attn.k_proj.weight"] = packed[:, -2].flatten(0, 1)
        dst[q + "self_attn.v_proj.weight"] = packed[:, -1].flatten(0, 1)
        dst[q + "self_attn.o_proj.weight"] = src[p + "attention.wo.weight"]
        dst[q + "mlp.gate_proj.weight"] = src[p + "feed_forward.w1.weight"]
        dst[q + "mlp.up_proj.weight"] = src[p + "feed_forward.w3.weight"]
        dst[q + "mlp.down_proj.weight"] = src[p + "feed_forward.w2.weight"]
        dst[q + "input_layernorm.weight"] = src[p + "attention_norm.weight"]
        dst[q + "post_attention_layernorm.weight"] = src[p + "ffn_norm.weight"]
    missing, unexpected = llama.load_state_dict(dst, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return llama


def test_module_names_are_those_lmdeploy_calibration_maps(model):
    # lmdeploy/lite/apis/calibrate.py and lite/quantization/awq.py look these up by name.
    names = {type(m).__name__ for m in model.modules()}
    assert {"InternLM2ForCausalLM", "InternLM2DecoderLayer", "InternLM2RMSNorm"} <= names
    layer = model.model.layers[0]
    for sub in ("attention_norm", "attention.wqkv", "attention.wo", "ffn_norm", "feed_forward.w1",
                "feed_forward.w2", "feed_forward.w3"):
        assert isinstance(layer.get_submodule(sub), torch.nn.Module)
    assert model.get_output_embeddings() is model.output


def test_logits_match_transformers_llama_with_wqkv_unpacked(model):
    llama = as_llama(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids, use_cache=False).logits, llama(ids).logits
    assert ours.shape == theirs.shape == (2, 40, model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # The comparison can tell layouts apart: unpacking wqkv as plain [q; k; v] gives other logits.
    wrong = as_llama(model)
    wqkv = model.model.layers[0].attention.wqkv.weight
    kv_dim = (wqkv.shape[0] - model.config.hidden_size) // 2
    q, k, v = wqkv.split([model.config.hidden_size, kv_dim, kv_dim])
    attn = wrong.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight.copy_(q)
        attn.k_proj.weight.copy_(k)
        attn.v_proj.weight.copy_(v)
        assert not torch.allclose(wrong(ids).logits, ours, atol=1e-3)


def test_cached_greedy_decode_equals_full_forwards_and_padding_changes_nothing(model, checkpoint):
    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids = tok("Hello there, how are you", return_tensors="pt").input_ids
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False)
        full = ids
        for _ in range(8):
            full = torch.cat([full, model(full, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert cached.tolist() == full.tolist()
        tok.padding_side = "left"
        batch = tok(["Hello there, how are you", "Hi"], return_tensors="pt", padding=True)
        both = model.generate(**batch, max_new_tokens=8, do_sample=False)
        alone = model.generate(tok("Hi", return_tensors="pt").input_ids, max_new_tokens=8, do_sample=False)
    assert both[0, -8:].tolist() == cached[0, -8:].tolist()
    assert both[1, -8:].tolist() == alone[0, -8:].tolist()


def test_the_kit_transformers_engine_serves_it_in_a_batch(checkpoint):
    engine = TransformersEngine(checkpoint, dtype="float32", max_batch_size=4, trust_remote_code=True)
    try:
        params = GenerationParams(max_tokens=12)
        prompts = [[{"role": "user", "content": q}] for q in ("Hi", "What is 2 + 2?", "Name a colour.")]
        alone = [asyncio.run(engine.chat(p, params)) for p in prompts]

        async def together():
            return await asyncio.gather(*(engine.chat(p, params) for p in prompts))

        batched = asyncio.run(together())
    finally:
        engine.close()
    assert all(a.completion_tokens > 0 for a in alone)
    assert [a.text for a in batched] == [a.text for a in alone]
    assert [a.completion_tokens for a in batched] == [a.completion_tokens for a in alone]


def test_the_pad_token_embedding_is_read_as_stored(model, checkpoint):
    """The reference reads every embedding row as the file holds it, pad_token_id's included.
    LMDeploy 0.18's PyTorch engine zeroes that row on load, which is why it disagreed with this
    implementation and TurboMind on chat prompts holding the pad token (docs/benchmarks.md)."""
    from safetensors.torch import load_file

    stored = {}
    for shard in checkpoint.glob("*.safetensors"):
        stored.update(load_file(shard))
    pad = model.config.pad_token_id
    row = stored["model.tok_embeddings.weight"][pad]
    assert pad is not None and row.abs().sum() > 0  # the file's row is not zero to begin with
    assert torch.equal(model.get_input_embeddings().weight[pad].detach().cpu().to(row.dtype), row)
