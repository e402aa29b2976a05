"""``load_model``: one entry point from a name, a folder or a model object to a :class:`Backend`.

Precision: ``dtype="bfloat16"`` / ``"float16"`` runs the model (forwards, patches, steering edits,
Jacobian rows) in that dtype; the steps that need more stay upcast whatever it is: stored
states float32, local fits on them with float64 SVDs, KL with float64 accumulation,
reconstruction errors and Jacobian SVDs in float64. Placement: ``device_map`` / ``max_memory`` /
``offload_folder`` go to ``from_pretrained`` (accelerate); see :mod:`toolkit.models.placement`.

Example:
    >>> import toolkit
    >>> model = toolkit.load_model()                       # SmolLM2-135M, offline
    >>> model.name, model.n_layers, model.d_model
    ('nnsight', 30, 576)
    >>> model = toolkit.load_model("gpt2")                 # hub, TransformerLens   # doctest: +SKIP
    >>> model = toolkit.load_model("./my-llama", backend="tl")                     # doctest: +SKIP
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from toolkit.backends import Backend, make_backend, resolve_backend_name
from toolkit.backends.base import no_remote_error
from toolkit.backends.remote import check_remote
from toolkit.models.registry import DEFAULT_MODEL, find_entry, known_ids
from toolkit.models.weights import converted_folder

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}.")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> str:
    """``device`` checked against this torch build (default ``cuda`` when available, else ``cpu``).

    Example:
        >>> resolve_device("cpu")
        'cpu'
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (--device); use cpu or cuda (cuda:0, cuda:1, ...).") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) was built without CUDA" if torch.version.cuda is None
               else "torch sees no CUDA GPU on this machine")
        raise ValueError(f"device {str(device)!r} (--device) is not available: {why}. Use --device cpu "
                         f"(Python: device='cpu'), or install a CUDA build of torch on a machine with a GPU.")
    return str(device)


def _check_model_folder(folder: Path) -> None:
    """A folder must hold a saved model (``config.json``); say so before transformers tries its tokenizers."""
    if not (folder / "config.json").is_file():
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise ValueError(f"{folder} is not a model folder: it has no config.json (it holds "
                         f"{', '.join(found) if found else 'nothing'}). Give a folder written by "
                         f"save_pretrained (config.json, weights, tokenizer files), a registry name "
                         f"(python -m toolkit models lists them) or a hub id (org/name).")


def _from_folder(folder: Path, dtype: torch.dtype, device: str, placement: dict | None = None):
    _check_model_folder(folder)
    return _from_folder_or_hub(str(folder), dtype, device, local_only=True, placement=placement)


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host does not answer within ``timeout`` s."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(hub_id: str, dtype: torch.dtype, device: str, placement: dict | None = None):
    # Without a hub, read only the local cache: transformers would otherwise retry for ~45 s.
    local_only = not hub_reachable()
    try:
        return _from_folder_or_hub(hub_id, dtype, device, local_only, placement)
    except OSError as err:
        raise OSError(f"could not load {hub_id!r} from the Hugging Face hub: it is not in the local cache and "
                      f"the hub cannot be reached (or HF_HUB_OFFLINE=1 is set). Download it where you have a "
                      f"network (`huggingface-cli download {hub_id} --local-dir DIR`) and pass the folder: "
                      f"load_model('DIR'). Offline models here: smollm2-135m, gemma-3-270m.") from err


def _from_folder_or_hub(name: str, dtype: torch.dtype, device: str, local_only: bool = False,
                        placement: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    if placement:  # accelerate places (and offloads) the modules itself: no .to() afterwards
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only, **placement)
        if set(getattr(hf_model, "hf_device_map", {}).values()) == {"disk"}:
            # accelerate then writes no offload index and the first forward fails with a KeyError
            raise ValueError(f"max_memory={placement.get('max_memory')} leaves no room for any module of {name}: the "
                             f"whole model was placed on disk, which accelerate cannot run. Give the CPU (or GPU) "
                             f"at least the largest module (often the embedding, with its tied unembedding) plus "
                             f"one block.")
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only).to(device)
    return hf_model.eval(), tokenizer


def placement_kwargs(device_map, max_memory, offload_folder) -> dict:
    """The accelerate placement arguments for ``from_pretrained``, checked before anything loads.

    Example:
        >>> placement_kwargs("auto", {"cpu": "200MB"}, "/tmp/offload")["device_map"]
        'auto'
        >>> placement_kwargs(None, None, None)
        {}
    """
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder only apply with a device_map: pass device_map='auto' "
                             "(or a dict of module name -> 'cpu' / 'disk' / GPU index).")
        return {}
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential") \
            and not device_map.startswith(("cpu", "cuda", "mps", "xpu")):
        raise ValueError(f"unknown device_map {device_map!r}: use 'auto', 'balanced', 'sequential', a device "
                         f"('cuda:0') or a dict of module name -> device ('cpu', 'disk', 0, ...).")
    if isinstance(device_map, dict) and "disk" in device_map.values() and offload_folder is None:
        raise ValueError("device_map sends modules to 'disk': pass offload_folder=DIR for their weights.")
    import importlib.util
    if importlib.util.find_spec("accelerate") is None:
        raise ImportError("device_map needs HF accelerate: pip install accelerate.")
    kwargs = {"device_map": device_map}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def _remote_model(name: str, backend: str | None) -> Backend:
    """A model on NDIF: weights are not loaded here (nnsight builds the module tree on the meta device)."""
    from toolkit.backends.remote import remotable_from_hub
    if backend is not None and resolve_backend_name(backend, None) != "nnsight":
        raise no_remote_error(resolve_backend_name(backend, None), True)
    entry = find_entry(name)
    if entry is None and ("/" not in name or Path(name).expanduser().exists()):
        raise ValueError(f"NDIF runs checkpoints by their hub id; {name!r} is neither a known id "
                         f"({', '.join(known_ids())}) nor an org/name hub id.")
    hub_id = entry.hub_id if entry else name
    return make_backend(remotable_from_hub(hub_id), backend="nnsight", model_id=entry.name if entry else name,
                        remote=True)


def load_model(name_or_path=DEFAULT_MODEL, backend: str | None = None, dtype: str | torch.dtype | None = None,
               device: str | None = None, *, device_map: str | dict | None = None, max_memory: dict | None = None,
               offload_folder: str | Path | None = None, remote: bool | str = False) -> Backend:
    """Load a model and wrap it in the backend that serves it.

    Args:
        name_or_path: a registry name (``python -m toolkit models`` lists them), a hub id, a local
            folder saved with ``save_pretrained``, or a model object (HF, nnsight, TransformerBridge).
        backend: ``"transformer_lens"`` (alias ``"tl"``), ``"nnsight"``, or ``"hooked"`` (TransformerLens 3's
            ``HookedTransformer``, built with raw numerics; needs ``transformer-lens>=3.9,<4``, see
            :mod:`toolkit.backends.hooked_backend`); default by architecture.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
        device: default ``cuda`` when available, else ``cpu`` (ignored with ``device_map``).
        device_map, max_memory, offload_folder: passed to HuggingFace ``from_pretrained`` (accelerate):
            shard the blocks across GPUs (``device_map="auto"``), cap each device (``max_memory=
            {0: "20GiB", "cpu": "60GiB"}``) and offload the rest to CPU RAM or to ``offload_folder`` on
            disk. Both backends and both analyses run on the placed model (see the README's "Bigger
            models"); a module-name dict (``{"model.layers.1": "disk", ...}``) places by hand.
        remote: ``True`` runs the model on NDIF (needs ``NDIF_API_KEY``; a hub id or known name; no
            weights are loaded here), ``"local"`` loads it here and runs its remote-capable stages
            through nnsight's simulation of a remote run (see :mod:`toolkit.backends.remote`).

    Example:
        >>> tl = load_model("smollm2-135m", backend="tl")
        >>> tl.name, tl.n_layers, tl.d_model
        ('transformer_lens', 30, 576)
        >>> big = load_model("smollm2-135m", device_map="auto", max_memory={"cpu": "300MB"},
        ...                  offload_folder=tmp / "offload")          # the upper blocks live on disk
        >>> "disk" in set(big.hf_model.hf_device_map.values())
        True
    """
    remote = check_remote(remote)                     # key and service first, before any loading
    if not isinstance(name_or_path, (str, Path)):
        return make_backend(name_or_path, backend=backend, remote=remote)
    torch_dtype = resolve_dtype(dtype)
    if remote is True:
        return _remote_model(str(name_or_path), backend)
    placement = placement_kwargs(device_map, max_memory, offload_folder)
    device = resolve_device(device)
    name = str(name_or_path)
    entry = find_entry(name)
    if Path(name).expanduser().is_dir():
        hf_model, tokenizer = _from_folder(Path(name).expanduser(), torch_dtype, device, placement)
        model_id = str(Path(name).expanduser().resolve())
    elif entry is not None and entry.pip_source is not None:
        hf_model, tokenizer = _from_folder(converted_folder(entry.pip_source), torch_dtype, device, placement)
        model_id = entry.name
    elif entry is not None or "/" in name:
        hub_id = entry.hub_id if entry else name
        hf_model, tokenizer = _from_hub(hub_id, torch_dtype, device, placement)
        model_id = entry.name if entry else name
    else:
        raise ValueError(f"unknown model id {name!r}. Known ids: {', '.join(known_ids())}. "
                         f"Hub ids (org/name) and local folders are accepted too.")
    return make_backend(hf_model, tokenizer, backend=backend, model_id=model_id, remote=remote)
