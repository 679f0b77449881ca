"""The default model's architecture with random weights, for a GPU machine that cannot get the
real ones (they do not fit what a device call carries; bench/gpu_bundle.sh explains).

    python -m bench.gpu_model MODEL_FILES_DIR CACHE_DIR

Writes CACHE_DIR/models/SmolLM2-135M-Instruct/ (config, tokenizer, chat template, random bf16
weights, seed 0) where `resolve_model("default")` looks when PDROUTER_CACHE_DIR=CACHE_DIR. Shapes,
tokenizer and template are the real model's, so throughput and transfer sizes are too; greedy
text is not, and every check that compares against transformers loads the same random weights.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workers.model_files import DEFAULT_MODEL_NAME


def build(files: Path, cache: Path) -> Path:
    target = cache / "models" / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig.from_pretrained(files)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    for f in files.iterdir():
        shutil.copy(f, target / f.name)  # NOTE: the real config and tokenizer win over the saved copies
    return target


if __name__ == "__main__":
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))
