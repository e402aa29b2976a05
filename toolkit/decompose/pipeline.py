"""``decompose``: from a model and a corpus to a :class:`DecompositionResult`, in one call.

Stages: collect hidden-state pairs for train and test texts (cached), fit a local tokenwise
map around every test anchor at every chosen layer, measure the geometry of the residual,
replace ``h_{l+1}`` by ``T(h_l)`` at each anchor and measure the KL of the next-token
distribution (cached fast path), plus two controls: an equal-norm perturbation in a random
direction, and a global MLP as the nonlinear tokenwise comparison. With ``controls`` (default) every
result also carries the null models (:mod:`toolkit.decompose.baselines`: identity, with its KL from
the same intervention pass, mean update, global ridge map, random neighbourhoods), the size
controls (:mod:`toolkit.decompose.controls`) and the verdict table (:mod:`toolkit.decompose.verdicts`).

Example:
    >>> import toolkit                                    # model = toolkit.load_model(): SmolLM2-135M, offline
    >>> result = toolkit.decompose_layers(model, "embedded", layers=[5], n_train=24, n_test=6, seq_len=32,
    ...                                   per_text=4, k=16, rank=4, compare_mlp=False, progress=False)
    >>> -1 <= result.model_summary["rho_pooled"]["rho"] <= 1
    True
"""
from __future__ import annotations

import time
from typing import Any, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from toolkit.backends import as_backend
from toolkit.backends.base import Backend
from toolkit.checks import positive_int
from toolkit.collection.from_corpus import check_collection_settings, collect_from_corpus
from toolkit.collection.pairs import CollectedStates, kv_cache_bytes
from toolkit.data import Corpus
from toolkit.decompose.baselines import MASSIVE_FACTOR, baseline_columns
from toolkit.decompose.function_classes import (FORMS, FUNCTION_CLASSES, LocalFit, MLPMap, effective_rank, fit_mlps,
                                              fit_tokenwise)
from toolkit.decompose.geometry import tokenwise_geometry
from toolkit.decompose.interventions import patched_kl
from toolkit.decompose.result import DecompositionResult

# geometry's names -> the result's column names
_COLUMNS = {"rel_err": "rel_err", "cos_u_t": "cos_full_tok", "abs_cos_u_t": "abs_cos_full_tok",
            "angle_u_t": "angle_full_tok", "cos_r_t": "cos_res_tok", "abs_cos_r_t": "abs_cos_res_tok",
            "angle_r_t": "angle_res_tok"}
_KINDS = {"u": "full", "t": "tokenwise", "r": "residual"}


def _column(name: str) -> str:
    if name in _COLUMNS:
        return _COLUMNS[name]
    kind, top = name.removeprefix("frac_").split("_top")        # frac_u_top4 -> proj_full_4
    return f"proj_{_KINDS[kind]}_{top}"


def _random_same_norm(y: torch.Tensor, residual: torch.Tensor, seed: int) -> torch.Tensor:
    """``y + ||r|| * u`` with ``u`` a random unit direction per row: the control replacement."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(y.shape, generator=g, dtype=y.dtype)
    return y + residual.norm(dim=1, keepdim=True) * u / u.norm(dim=1, keepdim=True)


def _token_columns(model: Backend, states: CollectedStates, context: int = 8) -> dict[str, np.ndarray]:
    tokens, text, pos = states.tokens, states.text_index, states.position
    decode = model.tokenizer.decode
    tok = [decode([int(t)]) for t in states.token]
    ctx = [decode(tokens[t, max(0, p - context):p + 1].tolist()) for t, p in zip(text.tolist(), pos.tolist())]
    return {"text": text.numpy(), "position": pos.numpy(), "token_id": states.token.numpy(),
            "token": np.array(tok, dtype=str), "context": np.array(ctx, dtype=str)}


def check_decompose_settings(*, function_class: str = "lowrank", form: str = "update", k: int = 64,
                             rank: int | None = 64, n_train: int = 2000, n_test: int = 500, seq_len: int = 192,
                             per_text: int = 8, batch_size: int = 8, layers: Sequence[int] | None = None,
                             sweep_k: Sequence[int] = (), sweep_rank: Sequence[int] = ()) -> None:
    """Refuse bad :func:`decompose` settings that need no model, before any work (the CLI calls this
    before loading the model; :func:`decompose` calls it first thing).

    Example:
        >>> check_decompose_settings(batch_size=0)
        Traceback (most recent call last):
        ...
        ValueError: batch_size (--batch-size) must be a positive integer (texts per forward pass), got 0; use 1 or more.
    """
    check_collection_settings(n_train=n_train, n_test=n_test, seq_len=seq_len, per_text=per_text,
                              batch_size=batch_size, layers=layers)
    if function_class not in FUNCTION_CLASSES:
        raise ValueError(f"unknown function class {function_class!r}; choose one of {', '.join(FUNCTION_CLASSES)}.")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}.")
    positive_int("k", k, "nearest neighbours per anchor")
    if rank is not None:
        positive_int("rank", rank, "rank of the local map")
    for value in sweep_k:
        positive_int("sweep_k", value, "k values of the sweep")
    for value in sweep_rank:
        positive_int("sweep_rank", value, "ranks of the sweep")
    for kk in (k, *sweep_k):
        _check_k(kk, n_train * per_text)


def _check_k(k: int, n_train_rows: int) -> None:
    if k > n_train_rows:
        raise ValueError(f"k={k} is larger than the training set ({n_train_rows} anchors = n_train x per_text); "
                         f"lower k or collect more training texts.")


def _check_rank(model: Backend, rank: int | None) -> None:
    if rank is not None and not 1 <= rank <= model.d_model:
        raise ValueError(f"rank={rank} must be between 1 and the model width {model.d_model}.")


def fit_layer(train: CollectedStates, test: CollectedStates, layer: int, function_class: str, form: str, k: int,
              rank: int | None):
    """Fit the tokenwise maps of block ``layer`` at the test anchors; return (fit, geometry, x, y)."""
    X, Y = train.pairs(layer)
    Xq, Yq = test.pairs(layer)
    fit = fit_tokenwise(X, Y, Xq, function_class, k=k, form=form, rank=rank)
    return fit, tokenwise_geometry(Xq, Yq, fit), Xq, Yq


def anchor_columns(train_X: torch.Tensor, train_Y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   function_class: str, form: str, k: int, rank: int | None, *, controls: bool = True,
                   train_groups: torch.Tensor | None = None, massive_factor: float = MASSIVE_FACTOR,
                   seed: int = 0) -> tuple[dict[str, np.ndarray], LocalFit, dict]:
    """One layer's per-anchor columns from tensors (no model): the fit's geometry and, with ``controls``,
    the baselines (:func:`toolkit.decompose.baselines.baseline_columns`).

    Args: training pairs ``[N, d]``, test anchors ``x, y`` ``[M, d]``; the rest as in :func:`decompose`.
    Returns: ``(columns, fit, ridge info)``; the columns are named as in :mod:`toolkit.decompose.result`.

    Example:
        >>> X = torch.randn(300, 8, dtype=torch.float64); Y = X + 0.1 * torch.tanh(X)
        >>> cols, fit, _ = anchor_columns(X[:250], Y[:250], X[250:], Y[250:], "lowrank", "update", 32, 8)
        >>> cols["rel_err"].shape, "rel_err_global" in cols
        ((50,), True)
    """
    fit = fit_tokenwise(train_X, train_Y, x, function_class, k=k, form=form, rank=rank)
    cols = {_column(n): v.numpy() for n, v in tokenwise_geometry(x, y, fit).as_dict().items()}
    info: dict = {}
    if controls:
        t0 = time.perf_counter()
        extra, info = baseline_columns(train_X, train_Y, x, y, fit.predictions, function_class=function_class,
                                       form=form, k=k, rank=rank, train_groups=train_groups,
                                       massive_factor=massive_factor, seed=seed)
        cols |= extra
        info["seconds"] = time.perf_counter() - t0
    return cols, fit, info


def _kept_caches(model: Backend, test: CollectedStates) -> dict:
    """patched_kl's arguments that reuse the test texts' caches from the collection, if it kept them."""
    if test.kv_caches is None:
        return {}
    return {"kv_caches": test.kv_caches, "final_states": test.hidden(model.n_layers)}


def _fit_layer_mlps(train: CollectedStates, layers: Sequence[int], steps: int, seed: int, progress: bool,
                    max_floats: int = 2 ** 26) -> dict[int, MLPMap]:
    """The global MLP of every layer, trained in batches of layers (each stacked input <= ``max_floats``,
    256 MiB in float32), the layers shared out evenly between the batches (small batches run slower)."""
    per_layer = max(1, train.pairs(layers[0])[0].numel())
    n_groups = -(-len(layers) * per_layer // max_floats)
    per_group = max(1, -(-len(layers) // n_groups))
    out: dict[int, MLPMap] = {}
    groups = [layers[i:i + per_group] for i in range(0, len(layers), per_group)]
    for group in groups:
        pairs = [train.pairs(l) for l in group]
        for layer, mlp in zip(group, fit_mlps(pairs, "update", steps=steps, seed=seed, progress=progress)):
            out[layer] = mlp
    return out


def decompose(model: Any, corpus: str | Corpus = "embedded", *, layers: Sequence[int] | None = None,
              function_class: str = "lowrank", form: Literal["plain", "update"] = "update", k: int = 64,
              rank: int | None = 64, n_train: int = 2000, n_test: int = 500, seq_len: int = 192, per_text: int = 8,
              seed: int = 0, compare_mlp: bool = True, mlp_steps: int = 300, random_control: bool = True,
              kl_positions: Literal["next", "later"] = "next", sweep_layer: int | None = None,
              sweep_k: Sequence[int] = (), sweep_rank: Sequence[int] = (), batch_size: int = 8,
              n_boot: int = 1000, progress: bool = True, use_cache: bool = True, controls: bool = True,
              split: Literal["document", "text"] = "document", min_position: int = 1,
              massive_factor: float = MASSIVE_FACTOR, remote: bool | str = False) -> DecompositionResult:
    """Run the tokenwise decomposition of layer updates (defaults: the paper's setup, appendix A.2).

    Exported as ``toolkit.decompose_layers``.

    Args:
        model: the loaded model (any backend), or a HF model / nnsight wrapper / TransformerBridge
            with its tokenizer (:func:`toolkit.backends.as_backend`).
        corpus: a corpus name (``"embedded"``, ``"wikitext-test"``, ...), a text file path or a
            :class:`~toolkit.data.Corpus`.
        layers: blocks ``l`` (transition ``h_l -> h_{l+1}``); default all.
        function_class, form, k, rank: the local map (see :mod:`toolkit.decompose.function_classes`).
        compare_mlp: also fit a global MLP per layer (Table 2's comparison); ``mlp_steps`` Adam steps.
        random_control: also measure KL for an equal-norm random perturbation of ``h_{l+1}``.
        sweep_layer, sweep_k, sweep_rank: Figure 5's sweeps at one layer (default: the middle one).
        use_cache: reuse (and write) the on-disk cache of collected states.
        controls: also compute the baselines, size controls and the verdict table (see the module docstring).
        split: ``"document"`` (default: no corpus document feeds both train and test) or ``"text"``
            (by chunk: windows of one article can land on both sides, which flatters the test errors).
        min_position: first sampled position; the default 1 leaves out the first token (an attention
            sink); raise it to leave out more of each text's first positions.
        massive_factor: anchors whose ``max(||h_l||, ||h_{l+1}||)`` exceeds this multiple of the layer's
            median are flagged ``massive`` (summaries are reported with and without them).
        remote: run the collection and the interventions on NDIF (``True``; needs ``NDIF_API_KEY``)
            or in nnsight's simulation of a remote run (``"local"``), a few requests for many texts;
            the fits stay local. nnsight models only (see :mod:`toolkit.backends.remote`).
    """
    check_decompose_settings(function_class=function_class, form=form, k=k, rank=rank, n_train=n_train,
                             n_test=n_test, seq_len=seq_len, per_text=per_text, batch_size=batch_size,
                             layers=layers, sweep_k=sweep_k, sweep_rank=sweep_rank)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = as_backend(model)
    model = model.with_remote(remote) if remote else model   # key and service checked before any work
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    for l in layers:
        if not isinstance(l, int) or not 0 <= l < model.n_layers:
            raise ValueError(f"layer {l!r} is out of range: {model.info.model_id} has {model.n_layers} blocks, "
                             f"numbered 0..{model.n_layers - 1}.")
    for rr in (rank, *sweep_rank):
        _check_rank(model, rr)
    sweep_layer = layers[len(layers) // 2] if sweep_layer is None else sweep_layer
    need = sorted(set(layers) | ({sweep_layer} if (sweep_k or sweep_rank) else set()))
    # The test texts' attention caches serve the interventions when they fit in memory (1 GiB).
    keep_kv = kl_positions == "next" and kv_cache_bytes(model, n_test, seq_len) <= 2 ** 30
    train, test = collect_from_corpus(model, corpus, n_train=n_train, n_test=n_test, seq_len=seq_len,
                                      per_text=per_text, layers=need, seed=seed, batch_size=batch_size,
                                      progress=progress, use_cache=use_cache, keep_test_kv_cache=keep_kv,
                                      split=split, min_position=min_position)
    timings["collect_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    columns: dict[str, list] = {}
    values: dict[tuple, torch.Tensor] = {}
    ridge: dict[int, dict] = {}
    base = _token_columns(model, test)
    mlps = _fit_layer_mlps(train, layers, mlp_steps, seed, progress) if compare_mlp else {}
    for layer in tqdm(layers, desc="fit tokenwise maps", disable=not progress, unit="layer"):
        (X, Y), (x, y) = train.pairs(layer), test.pairs(layer)
        cols, fit, ridge[layer] = anchor_columns(X, Y, x, y, function_class, form, k, rank, controls=controls,
                                                 train_groups=train.text_index, massive_factor=massive_factor,
                                                 seed=seed + layer)
        values[("linear", layer + 1)] = fit.predictions
        if random_control:
            values[("random", layer + 1)] = _random_same_norm(y, y - fit.predictions, seed + layer)
        if controls:
            values[("identity", layer + 1)] = x          # skip the block's update at the anchor
        row = {"layer": np.full(len(x), layer)} | base | cols
        if compare_mlp:
            X, Y = train.pairs(layer)
            mlp = fit_tokenwise(X, Y, x, "mlp", form="update", keep_singular=0, mlp=mlps[layer])
            values[("mlp", layer + 1)] = mlp.predictions
            row["rel_err_mlp"] = ((y - mlp.predictions).norm(dim=1) / y.norm(dim=1)).numpy()
        for name, col in row.items():
            columns.setdefault(name, []).append(col)
    timings["fit_s"] = time.perf_counter() - t1
    timings["controls_fit_s"] = sum(r.pop("seconds", 0.0) for r in ridge.values())   # part of fit_s

    t2 = time.perf_counter()
    kl = patched_kl(model, test.tokens, test.positions, values, kl_positions=kl_positions, batch_size=batch_size,
                    progress=progress, **_kept_caches(model, test))
    timings["interventions_s"] = time.perf_counter() - t2
    columns["kl"] = [kl[("linear", l + 1)].numpy() for l in layers]
    if random_control:
        columns["kl_random"] = [kl[("random", l + 1)].numpy() for l in layers]
    else:
        columns["kl_random"] = [np.full(test.positions.numel(), np.nan) for _ in layers]
    if compare_mlp:
        columns["kl_mlp"] = [kl[("mlp", l + 1)].numpy() for l in layers]
    if controls:
        columns["kl_identity"] = [kl[("identity", l + 1)].numpy() for l in layers]
    anchors = {name: np.concatenate(parts) for name, parts in columns.items()}

    settings = {"model_id": model.info.model_id, "backend": model.name, "architecture": model.info.architecture,
                "d_model": model.d_model, "n_layers": model.n_layers, "dtype": str(model.dtype),
                "corpus": corpus if isinstance(corpus, str) else corpus.name, "layers": layers,
                "function_class": function_class, "form": form, "k": k, **_rank_settings(function_class, form, rank, k,
                                                                                         model.d_model),
                "n_train": n_train,
                "n_test": n_test, "seq_len": seq_len, "per_text": per_text, "seed": seed,
                "kl_positions": kl_positions, "compare_mlp": compare_mlp, "mlp_steps": mlp_steps,
                "split": split, "min_position": min_position, "controls": controls, "remote": model.remote}
    if controls:
        settings["baselines"] = {"massive_factor": massive_factor, "random_neighbourhoods": "same class, k random "
                                 "training rows", "global_map": "ridge affine map of the update, penalty chosen on "
                                 "20% held-out training texts", "ridge": {str(l): r for l, r in ridge.items()}}
    t_sum = time.perf_counter()
    result = DecompositionResult.build(settings, anchors, n_boot=n_boot)
    timings["summaries_s"] = time.perf_counter() - t_sum          # bootstraps, permutations, verdicts
    t3 = time.perf_counter()
    if sweep_k or sweep_rank:
        result.sweeps = run_sweeps(model, train, test, sweep_layer, function_class, form, k, rank, sweep_k,
                                   sweep_rank, n_boot, progress)
    timings["sweeps_s"] = time.perf_counter() - t3
    test.kv_caches = None  # free them
    timings["total_s"] = time.perf_counter() - t0
    result.settings["timings"] = {k_: round(v, 2) for k_, v in timings.items()}
    return result


def _rank_settings(function_class: str, form: str, rank: int | None, k: int, d: int) -> dict:
    """``{"rank": the rank the maps really have}``, plus ``"rank_requested"`` when the request did not apply."""
    used = effective_rank(function_class, form, rank, k, d)
    return {"rank": used} if used == rank else {"rank": used, "rank_requested": rank}


def run_sweeps(model: Backend, train: CollectedStates, test: CollectedStates, layer: int, function_class: str,
               form: str, k: int, rank: int | None, ks: Sequence[int], ranks: Sequence[int], n_boot: int,
               progress: bool) -> dict[str, list[dict]]:
    """Figure 5: RelErr and rho(RelErr, KL) at one layer as ``k`` and ``rank`` vary."""
    from toolkit.decompose.statistics import spearman_with_ci
    variants = [("k", kk, kk, rank) for kk in ks] + [("rank", r, k, r) for r in ranks]
    values, errors = {}, {}
    for name, v, kk, rr in variants:
        _check_k(kk, train.positions.numel())
        _check_rank(model, rr)
        fit, geom, _, _ = fit_layer(train, test, layer, function_class, form, kk, rr)
        values[(name, v, layer + 1)] = fit.predictions
        errors[(name, v)] = geom.rel_err.numpy()
    kl = patched_kl(model, test.tokens, test.positions, values, progress=progress, **_kept_caches(model, test))
    out: dict[str, list[dict]] = {}
    for name, v, _, _ in variants:
        rel = errors[(name, v)]
        rho = spearman_with_ci(rel, kl[(name, v, layer + 1)].numpy(), n_boot=n_boot)
        kk, rr = (v, rank) if name == "k" else (k, v)
        ranks = _rank_settings(function_class, form, rr, kk, model.d_model)
        row = {"k": v, **ranks} if name == "k" else ranks   # a rank sweep's "rank" is the rank the maps have
        out.setdefault(name, []).append({**row, "layer": layer, "rel_err_mean": float(np.nanmean(rel)),
                                         "kl_mean": float(kl[(name, v, layer + 1)].mean()), "rho": rho.rho,
                                         "rho_ci_low": rho.ci_low, "rho_ci_high": rho.ci_high})
    return out
