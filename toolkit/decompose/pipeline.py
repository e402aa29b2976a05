"""``decompose``: from a model and a corpus to a :class:`DecompositionResult`, in one call.

Stages: collect hidden-state pairs for train and test texts (cached), fit a local tokenwise
map around every test anchor at every chosen layer, measure the geometry of the residual,
replace ``h_{l+1}`` by ``T(h_l)`` at each anchor and measure the KL of the next-token
distribution (cached fast path), plus two controls: an equal-norm perturbation in a random
direction, and a global MLP as the nonlinear tokenwise comparison.

Example:
    >>> import toolkit
    >>> from toolkit.decompose.pipeline import decompose
    >>> model = toolkit.load_model()                                            # doctest: +SKIP
    >>> result = decompose(model, "wikitext-test", layers=[5, 15], n_train=200, n_test=50)  # doctest: +SKIP
    >>> result.model_summary["rho_pooled"]["rho"]                               # doctest: +SKIP
"""
from __future__ import annotations

import time
from typing import Any, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from toolkit.backends import as_backend
from toolkit.backends.base import Backend
from toolkit.collection.from_corpus import collect_from_corpus
from toolkit.collection.pairs import CollectedStates, kv_cache_bytes
from toolkit.data import Corpus
from toolkit.decompose.function_classes import (FORMS, FUNCTION_CLASSES, MLPMap, effective_rank, fit_mlps,
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


def _check_settings(model: Backend, function_class: str, form: str, k: int, rank: int | None, n_train_rows: int):
    if function_class not in FUNCTION_CLASSES:
        raise ValueError(f"unknown function class {function_class!r}; choose one of {', '.join(FUNCTION_CLASSES)}.")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}.")
    if k > n_train_rows:
        raise ValueError(f"k={k} is larger than the training set ({n_train_rows} anchors = n_train x per_text); "
                         f"lower k or collect more training texts.")
    if rank is not None and not 1 <= rank <= model.d_model:
        raise ValueError(f"rank={rank} must be between 1 and the model width {model.d_model}.")


def fit_layer(train: CollectedStates, test: CollectedStates, layer: int, function_class: str, form: str, k: int,
              rank: int | None):
    """Fit the tokenwise maps of block ``layer`` at the test anchors; return (fit, geometry, x, y)."""
    X, Y = train.pairs(layer)
    Xq, Yq = test.pairs(layer)
    fit = fit_tokenwise(X, Y, Xq, function_class, k=k, form=form, rank=rank)
    return fit, tokenwise_geometry(Xq, Yq, fit), Xq, Yq


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
              n_boot: int = 1000, progress: bool = True, use_cache: bool = True) -> DecompositionResult:
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
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = as_backend(model)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    for l in layers:
        if not isinstance(l, int) or not 0 <= l < model.n_layers:
            raise ValueError(f"layer {l!r} is out of range: {model.info.model_id} has {model.n_layers} blocks, "
                             f"numbered 0..{model.n_layers - 1}.")
    _check_settings(model, function_class, form, k, rank, n_train * per_text)
    sweep_layer = layers[len(layers) // 2] if sweep_layer is None else sweep_layer
    need = sorted(set(layers) | ({sweep_layer} if (sweep_k or sweep_rank) else set()))
    # The test texts' attention caches serve the interventions when they fit in memory (1 GiB).
    keep_kv = kl_positions == "next" and kv_cache_bytes(model, n_test, seq_len) <= 2 ** 30
    train, test = collect_from_corpus(model, corpus, n_train=n_train, n_test=n_test, seq_len=seq_len,
                                      per_text=per_text, layers=need, seed=seed, batch_size=batch_size,
                                      progress=progress, use_cache=use_cache, keep_test_kv_cache=keep_kv)
    timings["collect_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    columns: dict[str, list] = {}
    values: dict[tuple, torch.Tensor] = {}
    base = _token_columns(model, test)
    mlps = _fit_layer_mlps(train, layers, mlp_steps, seed, progress) if compare_mlp else {}
    for layer in tqdm(layers, desc="fit tokenwise maps", disable=not progress, unit="layer"):
        fit, geom, x, y = fit_layer(train, test, layer, function_class, form, k, rank)
        values[("linear", layer + 1)] = fit.predictions
        if random_control:
            values[("random", layer + 1)] = _random_same_norm(y, y - fit.predictions, seed + layer)
        row = {"layer": np.full(len(x), layer)} | base | {_column(n): v.numpy() for n, v in geom.as_dict().items()}
        if compare_mlp:
            X, Y = train.pairs(layer)
            mlp = fit_tokenwise(X, Y, x, "mlp", form="update", keep_singular=0, mlp=mlps[layer])
            values[("mlp", layer + 1)] = mlp.predictions
            row["rel_err_mlp"] = ((y - mlp.predictions).norm(dim=1) / y.norm(dim=1)).numpy()
        for name, col in row.items():
            columns.setdefault(name, []).append(col)
    timings["fit_s"] = time.perf_counter() - t1

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
    anchors = {name: np.concatenate(parts) for name, parts in columns.items()}

    settings = {"model_id": model.info.model_id, "backend": model.name, "architecture": model.info.architecture,
                "d_model": model.d_model, "n_layers": model.n_layers, "dtype": str(model.dtype),
                "corpus": corpus if isinstance(corpus, str) else corpus.name, "layers": layers,
                "function_class": function_class, "form": form, "k": k, **_rank_settings(function_class, form, rank, k,
                                                                                         model.d_model),
                "n_train": n_train,
                "n_test": n_test, "seq_len": seq_len, "per_text": per_text, "seed": seed,
                "kl_positions": kl_positions, "compare_mlp": compare_mlp, "mlp_steps": mlp_steps}
    result = DecompositionResult.build(settings, anchors, n_boot=n_boot)
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
        _check_settings(model, function_class, form, kk, rr, train.positions.numel())
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
