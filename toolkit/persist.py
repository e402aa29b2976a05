"""Saving and loading results: one checked folder format for every result type, and :func:`load`.

A saved result is a folder::

    result.json           kind, format_version, saved_by (toolkit, torch, transformers,
                          transformer_lens, nnsight, numpy, python versions), saved_at, settings,
                          the result's own JSON fields, and files: {name: {sha256, bytes}}
    tensors.safetensors   the result's tensors (types that hold tensors)
    ...                   a type's own files (the decomposition: anchors.npz, anchors.csv)
    report.html           optional, written later by reports; not part of the result

The whole folder is written as a hidden sibling temporary and swapped in at the end
(:func:`toolkit.atomic.atomic_folder`), so a run killed while saving leaves the previous result
(or nothing) at the path, never a mix. Loading checks the kind and the format version and
verifies every file against the checksums in ``result.json``: a folder whose files do not all
belong to the same save, or a damaged or truncated file, is refused with the file's name and
what to do.

Example:
    >>> import tempfile, torch, toolkit
    >>> from toolkit.jacobian.result import DetachedJacobian
    >>> r = DetachedJacobian(torch.eye(2)[None], torch.ones(2), torch.ones(1, 2), torch.zeros(2),
    ...                      torch.tensor([7]), settings={"target": "output"})
    >>> path = r.save(tempfile.mkdtemp() + "/jac")
    >>> back = toolkit.load(path)                # by the kind recorded in result.json
    >>> type(back).__name__, torch.equal(back.jacobian, r.jacobian), back.settings
    ('DetachedJacobian', True, {'target': 'output'})
"""
from __future__ import annotations

import datetime
import glob
import hashlib
import importlib
import json
import platform
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from toolkit.atomic import atomic_folder

FORMAT_VERSION = 2  # 1: the single-file (.pt, .json) and unchecked folder formats before this module
RESULT_FILE = "result.json"
TENSOR_FILE = "tensors.safetensors"
_RESERVED = ("kind", "format_version", "saved_by", "saved_at", "files")

# kind -> "module:class"; imported only when a folder of that kind is loaded.
KINDS: dict[str, str] = {
    "toolkit.decompose.DecompositionResult": "toolkit.decompose.result:DecompositionResult",
    "toolkit.jacobian.DetachedJacobian": "toolkit.jacobian.result:DetachedJacobian",
    "toolkit.jacobian.SteeringResult": "toolkit.jacobian.steering_result:SteeringResult",
    "toolkit.jacobian.JacobianSVD": "toolkit.jacobian.analysis:JacobianSVD",
    "toolkit.jacobian.LayerwiseSpectra": "toolkit.jacobian.layerwise:LayerwiseSpectra",
    "toolkit.jacobian.TopSVD": "toolkit.jacobian.matrix_free:TopSVD",
    "toolkit.jacobian.LayerJacobians": "toolkit.jacobian.all_layers:LayerJacobians",
}
_PACKAGES = {"toolkit": "layerlens-toolkit", "torch": "torch", "transformers": "transformers",
             "transformer_lens": "transformer-lens", "nnsight": "nnsight", "numpy": "numpy"}


class DamagedResultError(ValueError):
    """A saved result's file is missing, damaged, or belongs to another save."""


@dataclass
class Parts:
    """What a result is made of on disk.

    Fields:
        fields: JSON-able values (tuples and non-string dict keys survive, see :func:`to_json`).
        tensors: name -> tensor, stored together in ``tensors.safetensors``.
        files: the type's own files, name -> bytes (saving) or name -> Path (loading).
    """

    fields: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)


R = TypeVar("R", bound="SavedResult")


class SavedResult:
    """Mixin giving a result type ``.save(path)`` and ``Type.load(path)`` in the checked folder format.

    A type sets ``KIND`` (a key of :data:`KINDS`) and ``NOUN`` (for messages) and implements
    ``_to_parts`` / ``_from_parts``; ``settings`` (a dict attribute) is recorded on its own.
    """

    KIND: ClassVar[str]
    NOUN: ClassVar[str] = "result"

    def _to_parts(self) -> Parts:
        raise NotImplementedError

    @classmethod
    def _from_parts(cls: type[R], parts: Parts) -> R:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write this result as a folder at ``path`` (replacing an earlier saved result there); returns the path.

        Example:
            >>> jac.save(tmp / "jac").name
            'jac'
        """
        return save_result(self, path)

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a folder written by ``save``; refuses other kinds, newer formats and damaged folders.

        Example:
            >>> from toolkit.jacobian.result import DetachedJacobian
            >>> DetachedJacobian.load(jac.save(tmp / "jac")).reconstruction_error == jac.reconstruction_error
            True
        """
        return load_result(path, cls)


# ----- JSON with tuples and non-string keys ---------------------------------------------------
def to_json(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON data; tuples and dicts with non-string keys are tagged so they come back.

    Numpy scalars become Python numbers, paths strings; anything else is refused, naming where.

    Example:
        >>> to_json({"layers": (1, 2), "err": {25: 0.5}})
        {'layers': {'__tuple__': [1, 2]}, 'err': {'__items__': [[25, 0.5]]}}
        >>> from_json(to_json({"layers": (1, 2), "err": {25: 0.5}}))
        {'layers': (1, 2), 'err': {25: 0.5}}
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return to_json(value.item(), where)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {"__tuple__", "__items__"} & set(value):
            return {k: to_json(v, f"{where}[{k!r}]") for k, v in value.items()}
        return {"__items__": [[to_json(k, where), to_json(v, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise TypeError(f"{where} holds a {type(value).__qualname__}, which a saved result cannot record; "
                    f"store it as a number, string, list or dict.")


def from_json(value: Any) -> Any:
    """Inverse of :func:`to_json`.

    Example:
        >>> from_json({"__items__": [[1, "a"]]})
        {1: 'a'}
    """
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(from_json(v) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {_hashable(from_json(k)): from_json(v) for k, v in value["__items__"]}
        return {k: from_json(v) for k, v in value.items()}
    return value


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


# ----- versions and checksums -----------------------------------------------------------------
def library_versions() -> dict[str, str | None]:
    """Versions of the toolkit and the libraries whose numerics a result depends on (None: not installed).

    Example:
        >>> sorted(library_versions())[:3]
        ['nnsight', 'numpy', 'python']
    """
    out: dict[str, str | None] = {}
    for name, dist in _PACKAGES.items():
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["toolkit"] is None:
        import toolkit
        out["toolkit"] = toolkit.__version__
    out["python"] = platform.python_version()
    return out


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"")
        >>> sha256_file(p)[:8]
        'e3b0c442'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unshared(tensors: dict[str, Any]) -> dict[str, Any]:
    """CPU, contiguous, and no two sharing storage (safetensors refuses shared tensors)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


# ----- writing ----------------------------------------------------------------------------------
def _check_replaceable(path: Path) -> None:
    """Refuse to replace anything but nothing, an empty folder or an earlier saved result."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise ValueError(f"{path} exists and is not a folder; results are saved as folders: choose another "
                         f"path or delete it first.")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    try:
        kind = json.loads((path / RESULT_FILE).read_text(encoding="utf-8")).get("kind", "")
    except FileNotFoundError:
        kind = None
    except (ValueError, AttributeError, UnicodeDecodeError):
        kind = "toolkit.damaged"  # an earlier save of ours that did not finish
    if not (isinstance(kind, str) and kind.startswith("toolkit.")):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(f"{path} already exists and is not a saved result (it holds {shown}); saving replaces "
                         f"the whole folder, so save into a new or empty folder, or delete it first.")


def save_result(result: SavedResult, path: str | Path) -> Path:
    """Write ``result`` as a checked folder at ``path``, atomically as a whole; returns the path.

    An earlier saved result at ``path`` (with its report) is replaced; any other non-empty folder
    or file there is refused before anything is written.

    Example:
        >>> import tempfile, torch
        >>> from toolkit.jacobian.matrix_free import TopSVD
        >>> top = TopSVD(torch.ones(1), torch.ones(3, 1), torch.ones(2, 1), 1, 1, 1, True, {"k": 1})
        >>> sorted(p.name for p in save_result(top, tempfile.mkdtemp() + "/top").iterdir())
        ['result.json', 'tensors.safetensors']
    """
    import torch  # noqa: F401  (safetensors.torch needs it)
    from safetensors.torch import save_file

    path = Path(path)
    if result.KIND not in KINDS:
        raise ValueError(f"{type(result).__qualname__} has kind {result.KIND!r}, which is not registered in "
                         f"toolkit.persist.KINDS.")
    _check_replaceable(path)
    parts = result._to_parts()
    settings = to_json(getattr(result, "settings", {}), "settings")
    fields = to_json(parts.fields, "the result")  # refuses unsavable values before anything is written
    bad = [n for n in [*parts.files, *fields] if n in (*_RESERVED, "settings", RESULT_FILE, TENSOR_FILE)]
    if bad:
        raise ValueError(f"{type(result).__qualname__} uses reserved names {bad}.")
    with atomic_folder(path) as tmp:
        names = []
        if parts.tensors:
            save_file(_unshared(parts.tensors), str(tmp / TENSOR_FILE))
            names.append(TENSOR_FILE)
        for name, data in parts.files.items():
            (tmp / name).write_bytes(data)
            names.append(name)
        files = {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in names}
        meta = {"kind": result.KIND, "format_version": FORMAT_VERSION, "saved_by": library_versions(),
                "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "settings": settings, **fields, "files": files}
        (tmp / RESULT_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")  # last
    return path


# ----- reading ----------------------------------------------------------------------------------
def _fix(folder: Path) -> str:
    return f"re-run the analysis that wrote it, or delete {folder} and save again"


def read_meta(path: str | Path, noun: str = "saved result") -> dict[str, Any]:
    """``result.json`` of a saved result folder, checked to be readable (not its kind or files).

    Example:
        >>> read_meta(jac.save(tmp / "jac"))["kind"]
        'toolkit.jacobian.DetachedJacobian'
    """
    path = Path(path)
    if path.is_file():
        raise ValueError(f"{path} is not a saved {noun}: it is a file, and results are saved as folders "
                         f"(a single .pt or .json file comes from an older toolkit: re-run the analysis to save it "
                         f"in the current format).")
    meta_path = path / RESULT_FILE
    if not meta_path.is_file():
        leftovers = sorted(p.name for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*")) if path.parent.is_dir() else []
        hint = (f"; {', '.join(leftovers)} beside it is an unfinished save (its run was interrupted): re-run it"
                if leftovers else "")
        what = "does not exist" if not path.exists() else f"holds no {noun} (no {RESULT_FILE})"
        raise FileNotFoundError(f"{path} {what}{hint}.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedResultError(f"{meta_path} is damaged (empty or cut short: {err}); {_fix(path)}.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str):
        raise DamagedResultError(f"{meta_path} is not a saved result's metadata (no 'kind'); {_fix(path)}.")
    return meta


def _check_version(meta: dict, path: Path, noun: str) -> None:
    version = meta.get("format_version", meta.get("version"))
    saved_by = (meta.get("saved_by") or {}).get("toolkit", "an older toolkit")
    if not isinstance(version, int) or version < FORMAT_VERSION:
        raise ValueError(f"{path} holds a {noun} in format version {version!r} (saved by {saved_by}), which this "
                         f"toolkit no longer reads (it has no checksums); re-run the analysis to save it again.")
    if version > FORMAT_VERSION:
        import toolkit
        raise ValueError(f"{path} holds a {noun} in format version {version}, saved by toolkit {saved_by}; this "
                         f"toolkit ({toolkit.__version__}) reads format version {FORMAT_VERSION}: upgrade the "
                         f"toolkit (pip install -U layerlens-toolkit) to load it.")


def _verify_files(meta: dict, path: Path) -> dict[str, Path]:
    files = meta.get("files")
    if not isinstance(files, dict):
        raise DamagedResultError(f"{path / RESULT_FILE} lists no files (no checksums); {_fix(path)}.")
    out = {}
    for name, entry in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise DamagedResultError(f"{path / RESULT_FILE} names a file outside its folder ({name!r}); {_fix(path)}.")
        file = path / name
        if not file.is_file():
            raise DamagedResultError(f"{file} is missing (result.json lists it); {_fix(path)}.")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise DamagedResultError(f"{file} does not match this result: {size} bytes where result.json recorded "
                                     f"{entry.get('bytes')} (cut short, damaged, or written by another save); "
                                     f"{_fix(path)}.")
        if sha256_file(file) != entry.get("sha256"):
            raise DamagedResultError(f"{file} does not belong to this result: its checksum differs from the one "
                                     f"result.json recorded (an interrupted save, or a file changed or copied in "
                                     f"from another run); {_fix(path)}.")
        out[name] = file
    return out


def class_for(kind: str) -> type:
    """The result class of a recorded kind.

    Example:
        >>> class_for("toolkit.jacobian.TopSVD").__name__
        'TopSVD'
    """
    if kind not in KINDS:
        raise ValueError(f"unknown result kind {kind!r}; this toolkit reads {', '.join(sorted(KINDS))} (a newer "
                         f"toolkit may know it: pip install -U layerlens-toolkit).")
    module, _, name = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def load_result(path: str | Path, expected: type | None = None) -> Any:
    """Read a saved result folder, checking kind (against ``expected`` if given), version and files.

    Example:
        >>> load_result(decomposition.save(tmp / "dec")).model_summary == decomposition.model_summary
        True
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    noun = getattr(expected, "NOUN", "result") if expected is not None else "result"
    meta = read_meta(path, noun if expected is not None else "saved result")
    kind = meta["kind"]
    if expected is not None and kind != expected.KIND:
        raise ValueError(f"{path} is not a saved {expected.__name__}: it holds a {kind!r}; load it with "
                         f"toolkit.load(path).")
    cls = expected or class_for(kind)
    _check_version(meta, path, getattr(cls, "NOUN", "result"))
    files = _verify_files(meta, path)
    tensors = {}
    if TENSOR_FILE in files:
        try:
            tensors = load_file(str(files.pop(TENSOR_FILE)))
        except (SafetensorError, OSError, ValueError) as err:
            raise DamagedResultError(f"{path / TENSOR_FILE} cannot be read ({err}); {_fix(path)}.") from None
    fields = {k: from_json(v) for k, v in meta.items() if k not in _RESERVED}
    try:
        return cls._from_parts(Parts(fields=fields, tensors=tensors, files=files))
    except (KeyError, TypeError) as err:
        raise DamagedResultError(f"{path / RESULT_FILE} lacks what a {kind} needs ({type(err).__name__}: {err}); "
                                 f"{_fix(path)}.") from None


def load(path: str | Path) -> Any:
    """Reload any saved result by the kind recorded in its folder (``toolkit.load``).

    Example:
        >>> import tempfile, torch, toolkit
        >>> from toolkit.jacobian.matrix_free import TopSVD
        >>> path = TopSVD(torch.ones(1), torch.ones(3, 1), torch.ones(2, 1), 1, 1, 1, True).save(tempfile.mkdtemp() + "/t")
        >>> toolkit.load(path).n_blocks
        1
    """
    return load_result(path)


def read_npz(file: Path, folder: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file of a saved result (no pickles), with a clear error if it is damaged.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "a.npz"; np.savez(f, x=np.arange(3))
        >>> read_npz(f, f.parent)["x"].tolist()
        [0, 1, 2]
    """
    try:
        with np.load(file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DamagedResultError(f"{file} cannot be read ({type(err).__name__}: {err}); {_fix(folder)}.") from None
