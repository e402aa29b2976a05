"""Layerwise reading of detached Jacobians (the paper's Figure 6): spectra, dimensionality, overlap.

Given the Jacobians of many targets of one prompt (:func:`toolkit.jacobian.all_layers.all_layer_jacobians`),
each target ``t`` contributes one matrix ``M_t``: the whole-prompt map ``[J_1 ... J_T]``
(``d_out x T*d``, ``block="all"``) or one position's block ``J_i`` (``block=i``). For each:

* the **singular spectrum** ``σ_1 >= σ_2 >= ...`` of ``M_t``;
* the **stable rank** ``Σσ² / σ_1²`` and the **energy rank**: how many singular values carry
  ``energy`` (e.g. 90%) of ``Σσ²`` — two dimensionality curves across depth;
* the **subspace overlap** with a reference target (by default the final-norm output): for the
  top-``k`` left singular vectors ``U_t`` (output space, the residual stream) and ``U_ref``,
  ``||U_ref^T U_t||_F² / k`` in ``[0, 1]`` (1: the same ``k``-dimensional subspace; a random
  one scores about ``k/d``), and the same for the right singular vectors (input space ``h_0``).

Kinds: ``"resid"`` (boundaries), ``"attn"``, ``"mlp"``, ``"output"``; :meth:`LayerwiseSpectra.curve`
returns one curve per kind.

Example:
    >>> import torch
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> from toolkit.jacobian.all_layers import all_layer_jacobians
    >>> layers = all_layer_jacobians(tiny_hf_model("llama", n_layers=3), torch.tensor([1, 2, 3]),
    ...                              components=("resid", "attn", "mlp"))
    >>> spectra = layerwise_spectra(layers, k=4)
    >>> spectra.curve("mlp", "stable_rank")[0]                    # block indices
    [0, 1, 2]
    >>> float(spectra.overlap_left[spectra.names.index("output")])   # the reference with itself
    1.0
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union

import torch
from torch import Tensor

from toolkit.jacobian.result import DetachedJacobian
from toolkit.persist import Parts, SavedResult

Block = Union[str, int]


@dataclass
class LayerwiseSpectra(SavedResult):
    """Per-target spectra and their summaries; see the module docstring.

    Fields:
        names: target names (``"resid.l"``, ``"attn.l"``, ``"mlp.l"``, ``"output"``).
        kinds: ``"resid"``, ``"attn"``, ``"mlp"`` or ``"output"`` per target.
        layers: depth per target (boundary ``l``; block ``l`` for attn/mlp; ``L`` for output).
        singular_values: ``[n_targets, r]`` descending (float64).
        stable_rank / energy_rank: ``[n_targets]``.
        overlap_left / overlap_right: ``[n_targets]`` subspace overlap with the reference's top-``k``.
        settings: block, k, energy, reference, position.
    """

    names: list
    kinds: list[str]
    layers: list[int]
    singular_values: Tensor
    stable_rank: Tensor
    energy_rank: Tensor
    overlap_left: Tensor
    overlap_right: Tensor
    settings: dict[str, Any] = field(default_factory=dict)

    def curve(self, kind: str, quantity: str) -> tuple[list[int], list[float]]:
        """``(layers, values)`` of ``quantity`` (a field name, e.g. ``"stable_rank"``) for one kind.

        Example:
            >>> layers, overlaps = spectra.curve("resid", "overlap_left")
            >>> layers, all(0 <= v <= 1 + 1e-6 for v in overlaps)
            ([1, 2], True)
        """
        values = getattr(self, quantity)
        idx = [i for i, k in enumerate(self.kinds) if k == kind]
        if not idx:
            raise ValueError(f"no targets of kind {kind!r}; kinds here: {sorted(set(self.kinds))}.")
        return [self.layers[i] for i in idx], [float(values[i]) for i in idx]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: names, kinds, layers, the summaries and the top singular values.

        Example:
            >>> import json; json.dumps(spectra.to_dict())[:1]
            '{'
        """
        k = int(self.settings.get("k", 8))
        return {"settings": dict(self.settings), "names": [str(n) for n in self.names], "kinds": list(self.kinds),
                "layers": list(self.layers), "stable_rank": self.stable_rank.tolist(),
                "energy_rank": self.energy_rank.tolist(), "overlap_left": self.overlap_left.tolist(),
                "overlap_right": self.overlap_right.tolist(),
                "top_singular_values": self.singular_values[:, :k].tolist()}

    def to_frame(self):
        """One row per target: name, kind, layer, stable and energy rank, overlaps, top singular value.

        Example:
            >>> spectra.to_frame().columns.tolist()[:3]
            ['name', 'kind', 'layer']
        """
        import pandas as pd
        return pd.DataFrame({"name": [str(n) for n in self.names], "kind": list(self.kinds),
                             "layer": list(self.layers), "stable_rank": self.stable_rank.tolist(),
                             "energy_rank": self.energy_rank.tolist(), "overlap_left": self.overlap_left.tolist(),
                             "overlap_right": self.overlap_right.tolist(),
                             "sigma_1": self.singular_values[:, 0].tolist()})

    def report(self, path, title: str = "Layerwise spectra of the detached Jacobian"):
        """Figure 6 and the per-target table as one self-contained HTML page.

        Example:
            >>> spectra.report(tmp / "layers.html").exists()
            True
        """
        from toolkit.jacobian.report import write_figure_report
        return write_figure_report(path, title, "Stable rank, energy rank and overlap with the reference, per "
                                   "target.", self.figure(), self.to_frame().to_dict("records"))

    def figure(self, max_rank: int | None = 64):
        """Figure 6: stable rank and overlap with the reference layer per depth, and the spectra.

        Example:
            >>> len(spectra.figure().data) > 0
            True
        """
        from toolkit.plots.jacobian import layerwise_figure
        return layerwise_figure(self, max_rank=max_rank)

    # ----- persistence (toolkit.persist: .save(path), LayerwiseSpectra.load(path)) ------------
    KIND = "toolkit.jacobian.LayerwiseSpectra"
    NOUN = "LayerwiseSpectra"
    _TENSORS = ("singular_values", "stable_rank", "energy_rank", "overlap_left", "overlap_right")
    _FIELDS = ("names", "kinds", "layers")

    def _to_parts(self) -> Parts:
        return Parts(fields={n: getattr(self, n) for n in self._FIELDS},
                     tensors={n: getattr(self, n) for n in self._TENSORS})

    @classmethod
    def _from_parts(cls, parts: Parts) -> "LayerwiseSpectra":
        return cls(**{n: parts.tensors[n] for n in cls._TENSORS}, **{n: parts.fields[n] for n in cls._FIELDS},
                   settings=parts.fields["settings"])

    def __repr__(self) -> str:
        return (f"LayerwiseSpectra(n_targets={len(self.names)}, kinds={sorted(set(self.kinds))}, "
                f"block={self.settings.get('block')!r}, k={self.settings.get('k')})")


def kind_and_layer(name, n_layers: int) -> tuple[str, int]:
    """``("resid", l)``, ``("attn", l)``, ``("mlp", l)``, ``("block", l)`` or ``("output", L)`` for a target name.

    Example:
        >>> kind_and_layer("mlp.4", 30), kind_and_layer("resid.7", 30), kind_and_layer("output", 30)
        (('mlp', 4), ('resid', 7), ('output', 30))
    """
    if name == "output":
        return "output", n_layers
    if isinstance(name, int):
        return "resid", name
    kind, _, layer = str(name).partition(".")
    kind = {"layer": "block"}.get(kind, kind)
    if kind not in ("resid", "attn", "mlp", "block") or not layer.isdigit():
        raise ValueError(f"target name {name!r} is not 'output', 'resid.l', 'attn.l', 'mlp.l' or 'block.l'.")
    return kind, int(layer)


def prompt_matrix(result: DetachedJacobian, block: Block = "all") -> Tensor:
    """The matrix analysed for one target: ``[J_1 ... J_T]`` (``d_out x T*d``) or ``J_block``.

    Example:
        >>> r = DetachedJacobian.random(T=3, d_out=4, d_in=5)
        >>> prompt_matrix(r).shape, prompt_matrix(r, block=-1).shape
        (torch.Size([4, 15]), torch.Size([4, 5]))
    """
    J = result.jacobian
    if block == "all":
        return J.permute(1, 0, 2).reshape(J.shape[1], -1)
    if isinstance(block, int) and not isinstance(block, bool) and -J.shape[0] <= block < J.shape[0]:
        return J[block]
    raise ValueError(f"block must be 'all' (the whole prompt) or a position in -{J.shape[0]}..{J.shape[0] - 1}, "
                     f"got {block!r}.")


def energy_rank(singular_values: Tensor, energy: float = 0.9) -> Tensor:
    """Per row of ``[..., r]`` singular values: how many carry ``energy`` of ``Σσ²`` (0 for all-zero rows).

    Example:
        >>> energy_rank(torch.tensor([[3.0, 1.0, 1.0], [1.0, 1.0, 1.0]]), 0.9).tolist()
        [2, 3]
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}.")
    s2 = singular_values.double().pow(2)
    total = s2.sum(-1, keepdim=True)
    frac = s2.cumsum(-1) / total.clamp_min(1e-300)
    rank = (frac < energy - 1e-12).sum(-1) + 1
    return torch.where(total[..., 0] > 0, rank, torch.zeros_like(rank))


def subspace_overlap(A: Tensor, B: Tensor) -> float:
    """``||A^T B||_F² / k`` for orthonormal ``A``, ``B`` ``[d, k]``: 1 for the same subspace, ~k/d at random.

    Example:
        >>> I = torch.eye(4)
        >>> subspace_overlap(I[:, :2], I[:, :2]), subspace_overlap(I[:, :2], I[:, 2:])
        (1.0, 0.0)
    """
    if A.shape != B.shape:
        raise ValueError(f"subspace bases must have the same shape, got {tuple(A.shape)} and {tuple(B.shape)}.")
    return float((A.double().T @ B.double()).pow(2).sum() / A.shape[1])


def layerwise_spectra(jacobians: Any, *, block: Block = "all", k: int = 8, energy: float = 0.9,
                      reference: Any = "output") -> LayerwiseSpectra:
    """Spectra, stable and energy ranks, and overlap with ``reference``'s top-``k`` subspaces, per target.

    Args:
        jacobians: a :class:`~toolkit.jacobian.all_layers.LayerJacobians` or a mapping
            ``name -> DetachedJacobian`` (all of one prompt, w.r.t. the same input).
        block: ``"all"`` for the whole-prompt map ``[J_1..J_T]``, or a position ``i`` for ``J_i``.
        k: singular vectors compared with the reference's.
        energy: the fraction of ``Σσ²`` for the energy rank.
        reference: the target whose subspaces the others are projected onto (default the output;
            falls back to the deepest boundary when there is no output).

    Example:
        >>> from toolkit.jacobian.all_layers import all_layer_jacobians
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> spectra = layerwise_spectra(all_layer_jacobians(tiny_hf_model("gpt2"), torch.tensor([3, 1, 4])), k=2)
        >>> spectra.names, spectra.settings["reference"]
        (['resid.1', 'resid.2', 'output'], 'output')
    """
    results: Mapping[Any, DetachedJacobian] = getattr(jacobians, "results", jacobians)
    if not results:
        raise ValueError("no Jacobians to analyse.")
    names = list(results)
    n_layers = int(next(iter(results.values())).settings.get("n_layers", 0))
    if reference not in results:
        boundaries = [n for n in names if kind_and_layer(n, n_layers)[0] == "resid"]
        if reference == "output" and boundaries:
            reference = max(boundaries, key=lambda n: kind_and_layer(n, n_layers)[1])
        else:
            raise ValueError(f"reference {reference!r} is not among the targets {names[:6]}...")
    svds = {}
    for name in names:
        U, S, Vh = torch.linalg.svd(prompt_matrix(results[name], block).double(), full_matrices=False)
        svds[name] = (U, S, Vh)
    r = min(S.shape[0] for _, S, _ in svds.values())
    k = min(k, r)
    U_ref, _, Vh_ref = svds[reference]
    S_all = torch.stack([svds[n][1][:r] for n in names])
    stable = S_all.pow(2).sum(-1) / S_all[:, 0].pow(2).clamp_min(1e-300)
    overlap_left = torch.tensor([subspace_overlap(U_ref[:, :k], svds[n][0][:, :k]) for n in names])
    overlap_right = torch.tensor([subspace_overlap(Vh_ref[:k].T, svds[n][2][:k].T) for n in names])
    kinds, layers = zip(*(kind_and_layer(n, n_layers) for n in names))
    first = next(iter(results.values())).settings
    settings = {"block": block, "k": k, "energy": energy, "reference": reference,
                "position": first.get("position"), "model_id": first.get("model_id"), "n_layers": n_layers}
    return LayerwiseSpectra(names=names, kinds=list(kinds), layers=list(layers), singular_values=S_all,
                            stable_rank=stable, energy_rank=energy_rank(S_all, energy), overlap_left=overlap_left,
                            overlap_right=overlap_right, settings=settings)
