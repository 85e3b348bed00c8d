"""Does transformers give an InternLM2 config `rope_parameters` when config.json has none?

Usage: python -m experiments.rope_parameters_check TOKDIR --out FILE

LMDeploy 0.18's PyTorch engine reads `config.rope_parameters` under transformers 5 and died on
published InternLM2 configs loaded without their hub code (docs/benchmarks.md). Published
checkpoints are meant to load with their own code (trust_remote_code), whose config class sets
`rope_theta` and `rope_scaling` as tests/fixtures/internlm2_hf/configuration_internlm2.py does. This
makes a tiny InternLM2 checkpoint with that code and without `rope_parameters` in config.json,
loads its config both ways, and writes what transformers made of it (JSON).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokdir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import transformers
    from transformers import AutoConfig, PretrainedConfig

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_random_internlm2.py"), str(model),
                        str(args.tokdir), "--size", "tiny", "--modeling", "--no-rope-parameters"],
                       check=True, capture_output=True)
        with_code = AutoConfig.from_pretrained(model, trust_remote_code=True)
        without = PretrainedConfig.from_pretrained(model)
        result = {"date": time.strftime("%Y-%m-%d"), "transformers": transformers.__version__,
                  "config_json_has_rope_parameters": "rope_parameters" in json.loads(
                      (model / "config.json").read_text()),
                  "with_model_code": {"class": type(with_code).__name__,
                                      "rope_parameters": getattr(with_code, "rope_parameters", None)},
                  "without_model_code": {"class": type(without).__name__,
                                         "rope_parameters": getattr(without, "rope_parameters", None)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
