"""The detached Jacobian of every layer at once: one forward-mode sweep, or one reverse pass per layer.

For one prompt and one position, the layerwise picture needs ``J^{(t)} = dy_t/dh_0`` for many
targets ``t``: every boundary ``h_1 .. h_L``, the final-norm output, and (optionally) every
block's attention and MLP output. Two ways to get them all:

* **reverse** (VJPs): ``d`` rows per target, each a backward pass through the target's depth
  — ``d x Σ_t depth(t)`` layer passes;
* **forward** (JVPs): one sweep over the ``T*d`` input directions ``e_{i,k}`` through the
  frozen model; a single forward-mode pass carries each direction to *every* target at once
  — ``T*d x depth_max`` layer passes, whatever the number of targets. For a bias-free model
  the frozen map is linear and the sweep is the replayed model run on the directions as a
  batch of sequences (see :mod:`toolkit.jacobian.operator`).

``mode="auto"`` picks the cheaper by that count, with one JVP weighted as
:data:`JVP_COST` VJPs (measured in ``benchmarks/jacobian.py``; forward-mode AD also runs the
primal per batch, a batched replay does not). Forward wins for short prompts and many targets. Both are exact for the frozen map and agree to float rounding.

Memory: the result holds ``n_targets x T x d x d`` floats (31 boundaries of SmolLM2 at
``T = 8``: 330 MB); pick ``components`` accordingly.

Example:
    >>> import torch
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> layers = all_layer_jacobians(tiny_hf_model("llama"), torch.tensor([1, 2, 3]), components=("resid", "mlp"))
    >>> layers.names
    ['resid.1', 'resid.2', 'mlp.0', 'mlp.1', 'output']
    >>> max(r.reconstruction_error for r in layers.results.values()) < 1e-5
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Literal

import torch
from torch import Tensor, nn

from toolkit.backends import hf_model_of
from toolkit.jacobian.budget import check_fits
from toolkit.jacobian.compute import build_result
from toolkit.jacobian.guards import Checks
from toolkit.jacobian.freeze import detached as frozen
from toolkit.jacobian.freeze import eager_attention
from toolkit.jacobian.operator import basis, batched_jvp, batched_replay, batched_vjp, jacobian_by_rows
from toolkit.jacobian.result import DetachedJacobian
from toolkit.jacobian.targets import (SUBLAYER_OUTPUTS, TargetSpec, input_embeddings, resolve_target,
                                      states_function)
from toolkit.metrics import require_eval_mode
from toolkit.models.architectures import spec_for
from toolkit.persist import Parts, SavedResult
from toolkit.prompts import Prompt, single_sequence

if TYPE_CHECKING:
    from toolkit.jacobian.layerwise import LayerwiseSpectra

AllMode = Literal["auto", "forward", "reverse"]
COMPONENTS = ("resid", "attn", "mlp")
# One JVP costs about this many VJPs (CPU, SmolLM2, measured with benchmarks/jacobian.py): a batched
# replay of the linear frozen map (bias-free models), or forward-mode AD (with a constant term).
JVP_COST = {"replay": 1.1, "ad": 2.2}


@dataclass
class LayerJacobians(SavedResult):
    """Detached Jacobians of many targets of one prompt, w.r.t. ``h_0``, at one position.

    Fields:
        results: target name -> :class:`DetachedJacobian` (names as in
            :mod:`toolkit.jacobian.targets`: ``"resid.l"``, ``"attn.l"``, ``"mlp.l"``, ``"output"``).
        mode: ``"forward"`` or ``"reverse"``, the route taken.
        settings: position, components, the cost counts behind ``mode``.
    """

    results: dict[Any, DetachedJacobian]
    mode: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list:
        return list(self.results)

    def __getitem__(self, name) -> DetachedJacobian:
        """By target name; an int ``l`` means ``"resid.l"`` as everywhere else."""
        key = f"resid.{name}" if isinstance(name, int) and not isinstance(name, bool) else name
        if key not in self.results:
            raise KeyError(f"no target {name!r} here; targets: {self.names}.")
        return self.results[key]

    def spectra(self, **kwargs) -> "LayerwiseSpectra":
        """:func:`toolkit.jacobian.layerwise.layerwise_spectra` of these Jacobians (stable rank, overlaps).

        Example:
            >>> import torch
            >>> from toolkit.models.tiny import tiny_hf_model
            >>> all_layer_jacobians(tiny_hf_model("llama"), [1, 2, 3]).spectra(k=2).names
            ['resid.1', 'resid.2', 'output']
        """
        from toolkit.jacobian.layerwise import layerwise_spectra
        return layerwise_spectra(self, **kwargs)

    def figure(self, **kwargs):
        """The layerwise figure of :meth:`spectra` (Figure 6)."""
        return self.spectra(**kwargs).figure()

    def report(self, path, **kwargs):
        """The report of :meth:`spectra` (Figure 6 and its table)."""
        return self.spectra(**kwargs).report(path)

    # ----- persistence (toolkit.persist: .save(path), LayerJacobians.load(path)) --------------
    KIND = "toolkit.jacobian.LayerJacobians"
    NOUN = "LayerJacobians"

    def _to_parts(self) -> Parts:
        targets, tensors = [], {}
        for i, (name, r) in enumerate(self.results.items()):
            part = r._to_parts()
            targets.append({"name": name, "settings": r.settings, **part.fields})
            tensors.update({f"{i}.{k}": t for k, t in part.tensors.items()})
        return Parts(fields={"mode": self.mode, "targets": targets}, tensors=tensors)

    @classmethod
    def _from_parts(cls, parts: Parts) -> "LayerJacobians":
        results = {}
        for i, target in enumerate(parts.fields["targets"]):
            own = {k[len(f"{i}."):]: t for k, t in parts.tensors.items() if k.startswith(f"{i}.")}
            results[target["name"]] = DetachedJacobian._from_parts(Parts(fields=target, tensors=own))
        return cls(results=results, mode=parts.fields["mode"], settings=parts.fields["settings"])

    def __repr__(self) -> str:
        return f"LayerJacobians(mode={self.mode!r}, n_targets={len(self.results)}, names={self.names[:4]}...)"


def layer_targets(hf_model: nn.Module, components: Iterable[str] = ("resid",), output: bool = True) -> list:
    """Target names for the layerwise sweep: boundaries ``"resid.1".."resid.L"``, ``"attn.l"``, ``"mlp.l"``, ``"output"``.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> layer_targets(tiny_hf_model("gpt2"), ("resid", "attn"))
        ['resid.1', 'resid.2', 'attn.0', 'attn.1', 'output']
    """
    spec = spec_for(hf_model)
    n_layers = len(spec.blocks(hf_model))
    components = tuple(components)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; choose from {COMPONENTS}.")
    missing = [c for c in components if c != "resid" and c not in SUBLAYER_OUTPUTS.get(spec.family, {})]
    if missing:
        raise ValueError(f"{spec.family} blocks have no {missing} sublayer(s); use components=('resid',).")
    names: list = []
    if "resid" in components:
        names += [f"resid.{l}" for l in range(1, n_layers + 1)]
    for kind in ("attn", "mlp"):
        if kind in components:
            names += [f"{kind}.{l}" for l in range(n_layers)]
    return names + (["output"] if output else [])


def _depth(t: TargetSpec, n_layers: int) -> float:
    """Blocks a pass must run to reach the target (attention: half a block)."""
    if t.kind == "output":
        return float(n_layers)
    if t.kind == "resid":
        return float(t.layer)
    return t.layer + (0.5 if t.kind == "attn" else 1.0)


def choose_mode(n_positions: int, depths: list[float],
                jvp_cost: float = JVP_COST["replay"]) -> tuple[str, dict[str, float]]:
    """``"forward"`` when ``T*d*depth_max*jvp_cost < d*Σ depth`` (``d`` cancels), else ``"reverse"``.

    Example:
        >>> depths = list(range(1, 31))      # boundaries of a 30-layer model
        >>> choose_mode(4, depths)[0], choose_mode(40, depths)[0]
        ('forward', 'reverse')
    """
    forward = n_positions * max(depths) * jvp_cost
    reverse = float(sum(depths))
    return ("forward" if forward < reverse else "reverse"), {"forward_cost": forward, "reverse_cost": reverse}


def all_layer_jacobians(model: Any, prompt: Prompt, *, position: int = -1,
                        components: Iterable[str] = ("resid",), output: bool = True, mode: AllMode = "auto",
                        detached: bool = True, chunk_size: int = 64, model_id: str | None = None,
                        strict: bool = True, memory_budget: int | None = None) -> LayerJacobians:
    """Jacobians ``dy_t/dh_0`` of every layer target ``t`` at ``position``, by one forward sweep or per-layer VJPs.

    Args:
        model: the loaded model (any backend) or a plain HF causal LM, in eval mode.
        prompt: one sequence, as text or token ids ``[T]`` / ``[1, T]``.
        position: which position's states.
        components: any of ``"resid"`` (boundaries ``resid.1 .. resid.L``), ``"attn"``, ``"mlp"`` (block outputs).
        output: also the final-norm output (the usual reference layer).
        mode: ``"forward"`` (``T*d`` JVPs reach all targets), ``"reverse"`` (``d`` VJPs per
            target) or ``"auto"`` (the cheaper by :func:`choose_mode`).
        detached: ``False`` for ordinary Jacobians (then ``c`` is the plain model at zero).
        chunk_size: JVPs or VJPs per batched pass.
        strict: as in :func:`~toolkit.jacobian.compute.detached_jacobian`: the model must run nothing
            the freeze cannot see, every frozen target must equal the live model's, and every
            reconstruction must meet the dtype's bound; ``False`` records warnings instead.
        memory_budget: bytes allowed (default: available now); all the Jacobians that would not fit
            are refused before any work (:func:`toolkit.jacobian.budget.check_fits`).

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("gpt2")
        >>> fwd = all_layer_jacobians(model, torch.tensor([1, 2]), mode="forward")
        >>> rev = all_layer_jacobians(model, torch.tensor([1, 2]), mode="reverse")
        >>> torch.allclose(fwd["resid.2"].jacobian, rev["resid.2"].jacobian, atol=1e-5)
        True
    """
    hf_model = hf_model_of(model)
    require_eval_mode(hf_model)
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"mode must be 'auto', 'forward' or 'reverse', got {mode!r}.")
    ids = single_sequence(model, prompt)
    components = tuple(components)
    names = layer_targets(hf_model, components, output)
    if not names:
        raise ValueError("no targets: give at least one component or output=True.")
    n_layers = len(spec_for(hf_model).blocks(hf_model))
    specs = [resolve_target(hf_model, n) for n in names]
    check_fits(hf_model, ids.numel(), chunk_size=chunk_size, n_targets=len(names), memory_budget=memory_budget)
    x = input_embeddings(hf_model, ids)
    T, d = x.shape
    has_bias = any(name.endswith("bias") for name, _ in hf_model.named_parameters())
    route = "ad" if has_bias or not detached else "replay"  # bias-free: the frozen map is linear
    chosen, costs = choose_mode(T, [_depth(s, n_layers) for s in specs], JVP_COST[route])
    mode = chosen if mode == "auto" else mode
    f = states_function(hf_model, names, position=position)
    checks = Checks(strict=strict, dtype=x.dtype)
    if detached:
        with torch.no_grad():  # every target as the live model computes it (hooks and overrides included)
            ys_live = f(x)

    undo_eager = [] if detached else eager_attention(hf_model)
    try:
        with (frozen(hf_model, checks=checks) if detached else _null()) as freeze:
            xg = x.clone().requires_grad_(mode == "reverse")
            with freeze.recording(), torch.set_grad_enabled(mode == "reverse"):
                ys = f(xg)
            if detached:
                checks.compare_live(torch.cat([y.reshape(-1) for y in ys]),
                                    torch.cat([y.reshape(-1) for y in ys_live]))
            with freeze.replaying():
                with torch.no_grad():
                    cs = f(torch.zeros_like(x))
                linear = detached and not any(bool(c.any()) for c in cs)  # no constant: J v = F(v)
                jacs = []  # each [T, d_out, d], written in place
                if mode == "reverse":  # d_out rows per target, from its own graph (its own depth)
                    for y in ys:
                        jacs.append(jacobian_by_rows(lambda u, y=y: batched_vjp(y, xg, u, chunk_size), y.shape[0],
                                                     (T, d), chunk_size, dtype=y.dtype, device=x.device))
                else:  # column (i, k) of every target's J from one JVP of e_{i,k}
                    n = T * d
                    cols = [x.new_empty(n, y.shape[0]) for y in ys]  # [T*d, d_out] each
                    for start in range(0, n, chunk_size):
                        e = basis(n, start, min(start + chunk_size, n), dtype=x.dtype, device=x.device)
                        e = e.reshape(-1, T, d)
                        outs = batched_replay(f, e, chunk_size) if linear else batched_jvp(f, x, e, chunk_size)
                        for col, out in zip(cols, outs):
                            col[start:start + out.shape[0]] = out
                    while cols:  # one transpose copy at a time
                        jacs.append(cols.pop(0).T.reshape(-1, T, d).movedim(0, 1).contiguous())
    finally:
        for undo in reversed(undo_eager):
            undo()
    results = {}
    for name, spec, y, jac, c in zip(names, specs, ys, jacs, cs):
        results[name] = build_result(hf_model, ids, x, y.detach(), jac, c.detach(),
                                     target=spec.name, position=position, detached=detached,
                                     chunk_size=chunk_size, model_id=model_id, checks=checks.copy(),
                                     input="h_0", mode=mode)
    settings = {"position": results[names[0]].settings["position"], "components": list(components),
                "output": output, "mode": mode, "auto_choice": chosen,
                "n_tangents": T * d, "n_rows": d * len(names),
                "jvp_route": ("replay" if linear else "ad") if mode == "forward" else None, **costs}
    return LayerJacobians(results=results, mode=mode, settings=settings)


class _null:
    """No freeze (ordinary Jacobians): a no-op context with the freeze session's mode switches."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def recording(self):
        return _null()

    def replaying(self):
        return _null()
