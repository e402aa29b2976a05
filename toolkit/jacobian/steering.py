"""Steering with the detached Jacobian (Golden 2025, "LLMs are Locally Linear Mappings", eq. 16).

The detached Jacobian of a middle layer, taken for a *concept prompt*, is a linear operator
that carries the concept (its frozen norm scales, gates and attention patterns); applied to
the input embeddings of *another* text and added into that layer's residual stream while
generating, it steers the continuation toward the concept.

What is computed
----------------
1. The concept prompt ``x* = (x*_0 .. x*_{N-1})`` (input embeddings ``h_0``) is run once with
   the freeze on (:func:`toolkit.jacobian.freeze.detached`) and its detached factors are
   recorded. Replaying them makes ``F(X) = h_l[p]`` an exactly affine map of any input
   ``X`` (``[N, d]``): ``F(X) = sum_i J_i X_i + c`` with ``J_i = J_{l,i}(x*)`` the detached
   Jacobian of the residual stream ``h_l`` at the concept's position ``p`` (default the last)
   with respect to ``h_0``. ``J x = F(X) - F(0)`` is one replayed forward pass: ``J`` is
   never formed (a ``d x d`` block per position would cost ``d`` backward passes).
2. For the new sequence ``x'`` (the prompt, then every generated token), each position ``t``
   gets, at boundary ``l`` (the input of block ``l``)::

       h_l[t]  <-  h_l[t] + lam * A(x')_t                                       (eq. 16)

   where ``operator`` says which concept blocks act on which new embeddings:

   * ``"sum"`` (default): ``A(x')_t = (sum_i J_i) x'_t`` — the concept's whole linear
     system with the new token in every concept slot;
   * ``"last"``: ``A(x')_t = J_p x'_t`` — the token-local (diagonal) block of the
     concept's last position only;
   * ``"window"``: ``A(x')_t = sum_k J_{p-k} x'_{t-k}`` — the concept's linear system
     applied to the last ``N`` embeddings of the new text, aligned at its end.

   The paper's equation adds ``lam`` times the middle layer's detached Jacobian of the
   concept, applied to the new text's embeddings, into that layer's output; which concept
   blocks meet which new positions is a choice it leaves open, hence ``operator``. On
   SmolLM2-135M ``"sum"`` raises the concept's tokens (``"last"`` lowers them: its
   identity-like residual path mostly rescales the new token's own embedding).
3. Greedy decoding with a KV cache (:class:`transformers.DynamicCache`, filled in place
   through the backend's ``run_with_patches``): the prompt is prefilled with the edit at
   *all* its positions, then each generated token is fed with the edit at its own position.
   Keys and values above ``l`` are computed from the edited stream and cached, so this is
   exactly what the paper's loop does — re-run the whole sequence with every position
   edited at every step (``use_cache=False`` does that; tests check both agree). Mamba
   (recurrent state) always runs without a cache.

Edits go through :meth:`toolkit.backends.base.Backend.run_with_patches` with additive
patches, so steering runs through nnsight and TransformerLens alike; the concept's map
``F`` is the backend's own (:meth:`toolkit.backends.base.Backend.target_function`).

Example:
    >>> r = steer(model, "The bridge out of Marin is the Golden", "I'm going to Arizona to see the",
    ...           at="resid.20", lam=1.0, max_new_tokens=6)           # model = toolkit.load_model()
    >>> r.baseline.text != r.steered.text, r.delta_concept_logprob(r.steered) > 0
    (True, True)
    >>> sweep = steering_sweep(model, "The bridge out of Marin is the Golden", "Here is a painting of the",
    ...                        at=["resid.15", "resid.20"], lams=[1.0], max_new_tokens=3)
    >>> sweep.figure().write_html(tmp / "steering.html")
"""
from __future__ import annotations

import math
import numbers
import statistics
import time
from typing import Callable, Literal, Sequence, Union

import torch
from torch import Tensor

from toolkit.backends.base import Backend, Patch
from toolkit.jacobian.compute import input_embeddings, target_path
from toolkit.jacobian.targets import resolve_target
from toolkit.jacobian.factors import FactorStore
from toolkit.jacobian.freeze import detached
from toolkit.jacobian.guards import Checks
from toolkit.metrics import relative_error, require_eval_mode
from toolkit.jacobian.steering_result import SteeringResult, SteeringRun

Operator = Literal["sum", "last", "window"]
OPERATORS: tuple[str, ...] = ("sum", "last", "window")
TextOrIds = Union[str, Sequence[int], Tensor]
EQUATION = "h_l[t] <- h_l[t] + lam * A(x')_t, A from the detached Jacobian J_{l,i}(x*) of the concept prompt"

__all__ = ["steer", "steering_sweep", "ConceptOperator", "greedy_continuation", "OPERATORS", "SteeringResult",
           "SteeringRun"]


# ----- the concept's operator ---------------------------------------------------------------
class ConceptOperator:
    """``x' -> A(x')_t``: the concept prompt's detached Jacobian at boundary ``layer``, matrix-free.

    Built once per (concept, layer): records the concept's detached factors through the
    backend, then evaluates ``J X = F(X) - F(0)`` by replaying them (one forward pass per new
    position, memoised on the input, so prompt tokens shared across a λ sweep cost once).

    Args:
        model: a :class:`~toolkit.backends.base.Backend` (nnsight or TransformerLens).
        concept_ids: ``[N]`` token ids of the concept prompt.
        layer: boundary ``1..n_layers`` whose residual stream ``h_l`` is the map's output.
        operator: ``"sum"``, ``"last"`` or ``"window"`` (see the module docstring).
        position: the concept position ``p`` whose ``h_l`` the Jacobian is of (default last).

    Example:
        >>> import torch
        >>> from toolkit.backends import make_backend
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = make_backend(tiny_hf_model("llama"), backend="nnsight")
        >>> op = ConceptOperator(model, torch.tensor([5, 6, 7]), layer=1)
        >>> op.apply(torch.randn(4, 64), range(4)).shape, op.replay_error < 1e-5
        (torch.Size([4, 64]), True)
    """

    def __init__(self, model: Backend, concept_ids: Tensor, layer: int, operator: Operator = "sum",
                 position: int = -1):
        if operator not in OPERATORS:
            raise ValueError(f"unknown operator {operator!r}; choose one of {', '.join(OPERATORS)}.")
        (layer,) = _check_layers(model, [layer])
        ids = torch.as_tensor(concept_ids).long().reshape(-1).to(model.device)
        n = ids.numel()
        if not -n <= position < n:
            raise ValueError(f"concept position {position} is outside the concept prompt's {n} tokens; "
                             f"use -{n}..{n - 1} (default -1, the last token).")
        self.model, self.layer, self.operator, self.position = model, layer, operator, position % n
        self.concept_ids = ids
        # f: h_0 -> h_layer at the concept position, through the backend's own hooking; x* = h_0 read through it
        self._f, self.x_star, _, self._owner = target_path(model, ids, resolve_target(model.hf_model, layer),
                                                           self.position)
        self._store = FactorStore()
        with torch.no_grad():  # the live model's own h_l (hooks and overrides included), to check the freeze
            y_live = self._f(self.x_star).detach()
        with detached(self._owner, store=self._store) as freeze, freeze.recording(), torch.no_grad():
            self.y = self._f(self.x_star).detach()
        Checks(dtype=self.y.dtype).compare_live(self.y, y_live)
        self.c, at_x_star = self._replay([torch.zeros_like(self.x_star), self.x_star])
        #: ``||F(x*) - h_l(x*)|| / ||h_l(x*)||``: the replayed map reproduces the concept's state.
        self.replay_error = relative_error(at_x_star, self.y)
        self._memo: dict[bytes, Tensor] = {}

    def _replay(self, inputs: list[Tensor]) -> list[Tensor]:
        with detached(self._owner, store=self._store) as freeze, freeze.replaying(), torch.no_grad():
            return [self._f(X).detach() for X in inputs]

    def concept_input(self, x_new: Tensor, t: int) -> Tensor:
        """The ``[N, d]`` input ``X`` with ``J X = A(x')_t`` for new position ``t`` (``x_new``: ``[>t, d]``).

        Example:
            >>> from toolkit.backends import make_backend
            >>> op = ConceptOperator(make_backend(tiny, backend="nnsight"), torch.tensor([5, 6, 7]), layer=1)
            >>> op.concept_input(torch.ones(3, 64), 2).shape
            torch.Size([3, 64])
        """
        X = torch.zeros_like(self.x_star)
        v = x_new[t].to(X.dtype)
        if self.operator == "sum":
            X[:] = v
        elif self.operator == "last":
            X[self.position] = v
        else:  # window: x'_{t-k} in concept slot p-k
            k = min(self.position, t) + 1
            X[self.position + 1 - k:self.position + 1] = x_new[t + 1 - k:t + 1].to(X.dtype)
        return X

    def apply(self, x_new: Tensor, positions: Sequence[int]) -> Tensor:
        """``A(x')_t`` for each ``t`` in ``positions``: ``[len(positions), d]`` (``x_new``: ``h_0`` of the new text).

        Example:
            >>> from toolkit.backends import make_backend
            >>> op = ConceptOperator(make_backend(tiny, backend="nnsight"), torch.tensor([5, 6, 7]), layer=1)
            >>> op.apply(input_embeddings(tiny, torch.tensor([4, 5])), range(2)).shape
            torch.Size([2, 64])
        """
        inputs = [self.concept_input(x_new, t) for t in positions]
        keys = [X.detach().float().cpu().numpy().tobytes() for X in inputs]
        todo = {k: X for k, X in zip(keys, inputs) if k not in self._memo}
        for k, out in zip(todo, self._replay(list(todo.values()))):
            self._memo[k] = out - self.c
        if not keys:
            return self.x_star.new_zeros(0, self.x_star.shape[-1])
        return torch.stack([self._memo[k] for k in keys])


# ----- greedy decoding with the edit ---------------------------------------------------------
def greedy_continuation(model: Backend, prompt_ids: Tensor, max_new_tokens: int, *,
                        edit: Callable[[Tensor, Sequence[int]], Tensor] | None = None, layer: int | None = None,
                        lam: float = 0.0, use_cache: bool = True, tracked_ids: Sequence[int] = (),
                        resid_norm: float = math.nan) -> SteeringRun:
    """Greedy continuation of ``prompt_ids``; with ``edit``, ``lam * edit(x', positions)`` is added to ``h_layer``.

    ``edit(x_new, positions)`` returns ``[len(positions), d]`` for the new text's embeddings
    ``x_new`` (``[T, d]``); it is called for the whole prompt, then for each generated token.
    No early stop at EOS: exactly ``max_new_tokens`` tokens, as in the paper's comparisons.

    Example:
        >>> import torch
        >>> from toolkit.backends import make_backend
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = make_backend(tiny_hf_model("llama"), backend="nnsight")
        >>> greedy_continuation(model, torch.tensor([1, 2, 3]), 4).token_ids.__len__()
        4
    """
    from transformers import DynamicCache

    ids = torch.as_tensor(prompt_ids).long().reshape(-1).to(model.device)
    use_cache = use_cache and model.info.architecture != "mamba"
    cache = DynamicCache(config=model.hf_model.config) if use_cache else None
    tracked = torch.as_tensor(list(tracked_ids), dtype=torch.long, device=model.device)
    new, tracked_lp, chosen_lp, edit_norms = [], [], [], []
    for step in range(max_new_tokens):
        start = len(ids) - 1 if (use_cache and step > 0) else 0
        patches = []
        if edit is not None:
            positions = list(range(start, len(ids)))
            delta = lam * edit(input_embeddings(model.hf_model, ids), positions)
            first_new = 0 if step == 0 else len(ids) - 1  # without a cache, earlier positions recur
            edit_norms.extend(n for t, n in zip(positions, delta.double().norm(dim=-1).tolist()) if t >= first_new)
            patches = [Patch(layer, torch.zeros(len(positions), dtype=torch.long), torch.arange(len(positions)),
                             delta, add=True)]
        kwargs = {"past_key_values": cache, "use_cache": True} if use_cache else {"use_cache": False}
        logits = model.run_with_patches(ids[start:][None], patches, **kwargs)
        logprobs = logits[0, -1].double().log_softmax(-1)
        token = logprobs.argmax()
        new.append(int(token))
        chosen_lp.append(float(logprobs[token]))
        tracked_lp.append(logprobs[tracked].tolist() if tracked.numel() else [])
        ids = torch.cat([ids, token[None]])
    tracked_set = set(int(t) for t in tracked_ids)
    edit_norm = float(sum(edit_norms) / len(edit_norms)) if edit_norms else 0.0
    return SteeringRun(layer=layer if edit is not None else None, lam=float(lam) if edit is not None else 0.0,
                       token_ids=new, text=_decode(model, new), str_tokens=_str_tokens(model, new),
                       tracked_logprobs=tracked_lp, token_logprobs=chosen_lp,
                       hits=sum(t in tracked_set for t in new), edit_norm=edit_norm,
                       edit_ratio=edit_norm / resid_norm if resid_norm and math.isfinite(resid_norm) else 0.0)


# ----- the public API -------------------------------------------------------------------------
def default_steering_boundary(n_layers: int) -> int:
    """The boundary ``steer`` edits by default: about two thirds of the depth, as in the paper.

    Example:
        >>> default_steering_boundary(30)
        20
    """
    return max(1, round(2 * n_layers / 3))


def _resolve_at(model: Backend, at, layer, name: str = "at") -> list:
    """Boundaries (ints ``1..L``) from ``at`` (``"resid.l"``, an int, a TL hook name, or a list), or the default."""
    if layer is not None:
        if at is not None:
            raise ValueError(f"give {name}= or layer=, not both (layer= is the older name of {name}=).")
        at = layer
    if at is None:
        return [default_steering_boundary(model.n_layers)]
    items = list(at) if isinstance(at, (list, tuple, range)) else [at]
    out = []
    for item in items:
        if not isinstance(item, (str, tuple)):  # numbers: _check_layers says what a valid boundary is
            out.append(item)
            continue
        try:
            spec = resolve_target(model.hf_model, item)
        except ValueError:
            spec = None
        if spec is None or spec.kind != "resid":
            raise ValueError(f"{name}={item!r} is not a residual-stream boundary: steering adds its edit to h_l; "
                             f"give 'resid.l' (or the int l) with l in 1..{model.n_layers}, e.g. "
                             f"'resid.{default_steering_boundary(model.n_layers)}' (the default).")
        out.append(spec.layer)
    return out


def steer(model, concept_prompt: TextOrIds, prompt: TextOrIds, at: int | str | None = None, lam: float = 1.0,
          max_new_tokens: int = 20, *, operator: Operator = "sum", concept_position: int = -1,
          concept_tokens: Sequence[int | str] | None = None, use_cache: bool = True,
          layer: int | None = None) -> SteeringResult:
    """Continue ``prompt`` greedily with and without the concept's detached-Jacobian edit (eq. 16).

    Args:
        model: the loaded model (any backend), or anything :func:`toolkit.backends.as_backend`
            accepts, in eval mode.
        concept_prompt: text (or token ids) whose detached Jacobian carries the concept, e.g.
            ``"The bridge out of Marin is the Golden"`` (the operator pushes toward what the
            concept prompt predicts, so a prompt whose next token *is* the concept works best).
        prompt: the new text to continue.
        at: the residual-stream boundary the edit is added to: ``"resid.l"`` (or the int ``l``,
            or ``"blocks.{l-1}.hook_resid_post"``) with ``l`` in ``1..n_layers``, i.e. ``h_l``, the
            input of block ``l``. Default: :func:`default_steering_boundary` (two thirds of the
            depth, as in the paper). ``layer=`` is the older name.
        lam: the weight λ (finite; 0 reproduces plain greedy decoding exactly).
        max_new_tokens: tokens to generate (both continuations).
        operator: ``"sum"``, ``"last"`` or ``"window"`` (module docstring).
        concept_position: the concept position whose ``h_l`` the Jacobian is of (default last).
        concept_tokens: tokens whose probabilities are tracked at each step (ids or strings);
            default: the concept prompt's tokens (function words and punctuation left out)
            and its greedy next token.
        use_cache: KV-cached decoding (``False``: re-run the whole sequence each step).

    Returns:
        a :class:`~toolkit.jacobian.steering_result.SteeringResult` with ``baseline`` and one run.

    Example:
        >>> import torch
        >>> from toolkit.backends import make_backend
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = make_backend(tiny_hf_model("llama"), backend="nnsight")
        >>> r = steer(model, [5, 6, 7], [9, 10], at="resid.1", lam=0.0, max_new_tokens=3)
        >>> r.steered.token_ids == r.baseline.token_ids
        True
    """
    if isinstance(at, (list, tuple)) or isinstance(layer, (list, tuple)) or isinstance(lam, (list, tuple)):
        raise ValueError("steer takes one boundary and one lam; use steering_sweep for lists.")
    return steering_sweep(model, concept_prompt, prompt, at, [lam], max_new_tokens, operator=operator,
                          concept_position=concept_position, concept_tokens=concept_tokens, use_cache=use_cache,
                          layers=layer)


def steering_sweep(model, concept_prompt: TextOrIds, prompt: TextOrIds, at: Sequence[int | str] | None = None,
                   lams: Sequence[float] = (0.5, 1.0, 2.0), max_new_tokens: int = 20, *, operator: Operator = "sum",
                   concept_position: int = -1, concept_tokens: Sequence[int | str] | None = None,
                   use_cache: bool = True, layers: Sequence[int] | None = None) -> SteeringResult:
    """:func:`steer` over every ``(layer, lam)``: one baseline, one concept operator per layer.

    Example:
        >>> import torch
        >>> from toolkit.backends import make_backend
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = make_backend(tiny_hf_model("llama"), backend="nnsight")
        >>> r = steering_sweep(model, [5, 6], [9], at=["resid.1", "resid.2"], lams=[0.5, 4.0], max_new_tokens=2)
        >>> [(run.layer, run.lam) for run in r.runs]
        [(1, 0.5), (1, 4.0), (2, 0.5), (2, 4.0)]
    """
    from toolkit.backends import as_backend

    t_start = time.perf_counter()
    model = as_backend(model)
    require_eval_mode(model.hf_model)
    if operator not in OPERATORS:
        raise ValueError(f"unknown operator {operator!r}; choose one of {', '.join(OPERATORS)}.")
    layers = _check_layers(model, _resolve_at(model, at, layers))
    lams = _check_lams(lams)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    concept_ids = _token_ids(model, concept_prompt, "concept_prompt")
    prompt_ids = _token_ids(model, prompt, "prompt")
    if concept_ids.numel() > model.n_ctx:
        raise ValueError(f"the concept prompt has {concept_ids.numel()} tokens, more than the context of "
                         f"{model.info.model_id} ({model.n_ctx}); shorten it.")
    if prompt_ids.numel() + max_new_tokens > model.n_ctx:
        raise ValueError(f"the prompt ({prompt_ids.numel()} tokens) plus max_new_tokens ({max_new_tokens}) is "
                         f"longer than the context of {model.info.model_id} ({model.n_ctx}); shorten the prompt "
                         f"or lower max_new_tokens.")
    tracked = _tracked_ids(model, concept_ids, concept_tokens)
    with torch.no_grad():
        hs = model.hidden_states(prompt_ids[None], layers=layers)[:, 0]  # [len(layers), T, d]
    resid = {l: statistics.median(hs[i].double().norm(dim=-1).tolist()) for i, l in enumerate(layers)}

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    baseline = greedy_continuation(model, prompt_ids, max_new_tokens, use_cache=use_cache, tracked_ids=tracked)
    timings["baseline_s"] = time.perf_counter() - t0
    runs, checks = [], {}
    for layer in layers:
        t0 = time.perf_counter()
        op = ConceptOperator(model, concept_ids, layer, operator=operator, position=concept_position)
        checks[str(layer)] = op.replay_error
        timings[f"operator_{layer}_s"] = time.perf_counter() - t0
        for lam in lams:
            t0 = time.perf_counter()
            runs.append(greedy_continuation(model, prompt_ids, max_new_tokens, edit=op.apply, layer=layer, lam=lam,
                                            use_cache=use_cache, tracked_ids=tracked, resid_norm=resid[layer]))
            timings[f"run_{layer}_{lam}_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    settings = {"model_id": model.info.model_id, "backend": model.name, "architecture": model.info.architecture,
                "n_layers": model.n_layers, "d_model": model.d_model, "dtype": str(model.dtype),
                "operator": operator, "concept_position": int(concept_position % concept_ids.numel()),
                "max_new_tokens": int(max_new_tokens),
                "use_cache": bool(use_cache and model.info.architecture != "mamba"),
                "equation": EQUATION, "edited_positions": "every prompt position and every generated token",
                "resid_median_norm": {str(l): v for l, v in resid.items()},
                "operator_replay_error": checks, "timings_s": timings}
    return SteeringResult(concept_prompt=_as_text(model, concept_prompt, concept_ids),
                          prompt=_as_text(model, prompt, prompt_ids), concept_ids=concept_ids.tolist(),
                          prompt_ids=prompt_ids.tolist(), tracked_ids=tracked,
                          tracked_tokens=_str_tokens(model, tracked), baseline=baseline, runs=runs, settings=settings)


# ----- checks and token helpers --------------------------------------------------------------
def _check_layers(model: Backend, layers: Sequence[int]) -> list[int]:
    layers = list(layers) if isinstance(layers, (list, tuple, range)) else [layers]
    if not layers:
        raise ValueError(f"no layer given; pass at least one boundary 1..{model.n_layers}.")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 1 <= layer <= model.n_layers:
            raise ValueError(f"layer {layer!r} is not a boundary 1..{model.n_layers} of {model.info.model_id}: the "
                             f"edit is added to h_l, the input of block l (boundary 0 is the embeddings, where the "
                             f"Jacobian is the identity). The paper steers at about two thirds of the depth, "
                             f"e.g. {max(1, round(2 * model.n_layers / 3))}.")
    return [int(l) for l in layers]


def _check_lams(lams: Sequence[float]) -> list[float]:
    lams = list(lams) if isinstance(lams, (list, tuple, range)) else [lams]
    if not lams:
        raise ValueError("no lam given; pass at least one finite weight (e.g. 1.0).")
    out = []
    for lam in lams:
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(float(lam)):
            raise ValueError(f"lam must be a finite number, got {lam!r}; use e.g. 0.5, 1 or 2 "
                             f"(0 reproduces unsteered decoding).")
        out.append(float(lam))
    return out


def _token_ids(model: Backend, text_or_ids: TextOrIds, name: str) -> Tensor:
    if isinstance(text_or_ids, str):
        if not text_or_ids.strip():
            raise ValueError(f"{name} is empty; pass some text (or token ids).")
        if model.tokenizer is None:
            raise ValueError(f"{model.info.model_id} has no tokenizer, so {name} cannot be text; pass token ids "
                             f"or a backend made with a tokenizer.")
        ids = model.tokenizer(text_or_ids, return_tensors="pt")["input_ids"][0]
    else:
        ids = torch.as_tensor(text_or_ids).long().reshape(-1)
    if ids.numel() == 0:
        raise ValueError(f"{name} has no tokens; pass some text (or token ids).")
    if int(ids.min()) < 0 or int(ids.max()) >= model.info.vocab_size:
        raise ValueError(f"{name} holds token ids outside 0..{model.info.vocab_size - 1}.")
    return ids.to(model.device)


def _tracked_ids(model: Backend, concept_ids: Tensor, concept_tokens: Sequence[int | str] | None) -> list[int]:
    if concept_tokens is not None:
        out: list[int] = []
        for tok in ([concept_tokens] if isinstance(concept_tokens, (str, int)) else concept_tokens):
            if isinstance(tok, str):
                if model.tokenizer is None:
                    raise ValueError("concept_tokens as strings need a tokenizer; pass token ids instead.")
                out.extend(model.tokenizer.encode(tok, add_special_tokens=False))
            else:
                out.append(int(tok))
        if not out or min(out) < 0 or max(out) >= model.info.vocab_size:
            raise ValueError(f"concept_tokens must name at least one token in 0..{model.info.vocab_size - 1}, "
                             f"got {concept_tokens!r}.")
        return list(dict.fromkeys(out))
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    with torch.no_grad():
        predicted = int(model.logits(concept_ids[None])[0, -1].argmax())
    words = _str_tokens(model, concept_ids.tolist())
    ids = [int(t) for t, w in zip(concept_ids.tolist(), words)
           if int(t) not in special and _is_content(w)] + [predicted]
    return list(dict.fromkeys(ids))


# Function words left out of the default tracked tokens (they are not the concept, and common
# enough to turn up in any continuation).
FUNCTION_WORDS = frozenset("a an the of in on at to into is are was were be and or but out for with by from as it "
                           "its this that these those".split())


def _is_content(token: str) -> bool:
    word = token.strip().lower()
    return any(ch.isalnum() for ch in word) and word not in FUNCTION_WORDS


def _decode(model: Backend, ids: Sequence[int]) -> str:
    if model.tokenizer is None:
        return " ".join(f"<{i}>" for i in ids)
    return model.tokenizer.decode(list(ids))


def _str_tokens(model: Backend, ids: Sequence[int]) -> list[str]:
    if model.tokenizer is None:
        return [f"<{i}>" for i in ids]
    return model.to_str_tokens(list(ids))


def _as_text(model: Backend, original: TextOrIds, ids: Tensor) -> str:
    return original if isinstance(original, str) else _decode(model, ids.tolist())
