"""Blocked FP8 weights (quantization.weights: fp8): the layout TurboMind reads, written by the kit,
and the quality gate passing and failing on it, on the bundled model on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from deploy.engines.fp8_format import BLOCK, dequantize, quantize
from tests.helpers import ROOT


def test_blocks_keep_their_largest_value_and_fp8_precision():
    torch.manual_seed(0)
    weight = torch.randn(300, 576) * torch.logspace(-3, 1, 576)  # columns of very different sizes
    q, scale_inv = quantize(weight)
    assert q.dtype == torch.float8_e4m3fn and q.shape == weight.shape
    assert scale_inv.shape == (3, 5)  # ceil(300/128) x ceil(576/128): edge blocks are partial
    back = dequantize(q, scale_inv)
    blocks = [(r, c) for r in range(3) for c in range(5)]
    for r, c in blocks:
        rows, cols = slice(r * BLOCK, (r + 1) * BLOCK), slice(c * BLOCK, (c + 1) * BLOCK)
        amax = float(weight[rows, cols].abs().max())
        assert float(back[rows, cols].abs().max()) == pytest.approx(amax, rel=1e-6)  # 448 is exact
        # e4m3 keeps 3 mantissa bits: a normal value is within 1/16 of itself; values under the
        # smallest normal (2^-6 of the block's scale) are within half a subnormal step.
        err = (back[rows, cols] - weight[rows, cols]).abs()
        bound = torch.clamp(weight[rows, cols].abs() / 16, min=amax / 448 * 2**-10)
        assert (err <= bound * 1.0001).all()


def _recipe(tmp_path: Path, **verify) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "smollm2-cpu-fp8.yaml").read_text())
    data["quantization"]["verify"].update(verify)
    path = tmp_path / "fp8.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_fp8_build_writes_turbominds_layout_and_gates_both_ways(tmp_path, monkeypatch):
    from deploy.builder.manifest import GateRefusal, check_gate
    from deploy.builder.pipeline import QualityGateError, build
    from deploy.recipe import load_recipe

    monkeypatch.setenv("XLAB_DEPLOY_HOME", str(tmp_path / "home"))
    result = build(load_recipe(_recipe(tmp_path)))
    folder = result.model_dir
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3",
                                             "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    assert not list(folder.glob("*.gguf"))
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
        proj = sorted(n for n in names if n.endswith("_proj.weight"))
        assert len(proj) == 30 * 7  # q, k, v, o, gate, up, down in each of SmolLM2's 30 layers
        for name in proj[:7]:
            weight, scale = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
            assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
            assert scale.shape == (-(-weight.shape[0] // 128), -(-weight.shape[1] // 128))
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    verify = result.manifest["steps"]["verify"]["outputs"]
    assert verify["passed"] is True and 0.9 <= verify["top1_agreement"] < 1.0

    # FP8 is not lossless here: a gate that demands near-identity refuses it, exit code 4.
    strict = load_recipe(_recipe(tmp_path, min_top1_agreement=0.99))
    with pytest.raises(QualityGateError) as refused:
        build(strict)
    assert refused.value.exit_code == 4 and "top-1 agreement" in str(refused.value)
    # ... and the server refuses the refused weights (before, only AWQ and HQQ builds were checked).
    with pytest.raises(GateRefusal, match="failed the quality gate"):
        check_gate(strict)


def test_internlm2s_packed_linears_are_written_as_fp8_and_read_back(tiny_internlm2, tmp_path):
    """The flagship's family names its linears wqkv, wo, w1-w3 (not *_proj): every one of them is
    stored in blocks, the embeddings and the output head are not, and the folder read back through
    the project's own InternLM2 code gives nearly the unquantized model's next tokens."""
    from transformers import AutoModelForCausalLM

    from deploy.builder.fp8 import fp8_quantize
    from deploy.engines.fp8_format import load_dequantized

    out = fp8_quantize(tiny_internlm2, tmp_path / "fp8")
    quantized, kept = set(), {}
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                if f.get_tensor(name).dtype == torch.float8_e4m3fn:
                    quantized.add(name.split(".")[-2])  # wqkv, wo, w1, w2, w3
                    assert name + "_scale_inv" in f.keys()
                else:
                    kept[name] = f.get_tensor(name).dtype
    assert quantized == {"wqkv", "wo", "w1", "w2", "w3"}
    assert kept["model.tok_embeddings.weight"] != torch.float8_e4m3fn
    assert kept["output.weight"] != torch.float8_e4m3fn
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, 24))
    plain = AutoModelForCausalLM.from_pretrained(tiny_internlm2, trust_remote_code=True, dtype=torch.float32)
    back = load_dequantized(out, torch.float32, trust_remote_code=True)
    with torch.no_grad():
        a, b = plain(ids).logits, back(ids).logits
    assert not torch.equal(a, b)  # FP8 rounded something
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
