"""One prompt's detached Jacobian, end to end: both Jacobians, the SVD decoded to tokens, files.

:func:`run_jacobian` is what ``python -m toolkit jacobian`` and ``make demo`` call. It writes into
``out``:

* ``jacobian.json`` — reconstruction errors (detached and ordinary), stable ranks, singular
  values and decoded tokens per position;
* ``detached_jacobian/`` — the :class:`~toolkit.jacobian.result.DetachedJacobian` (``toolkit.load``-able);
* ``report.html`` — one self-contained page with the figures.

Example:
    >>> summary = run_jacobian(model, "Paris is", out=tmp / "jac")
    >>> summary["detached"]["reconstruction_error"] < 1e-5
    True
    >>> sorted(p.name for p in (tmp / "jac").iterdir())
    ['detached_jacobian', 'jacobian.json', 'report.html']
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from toolkit.atomic import atomic_write_text
from toolkit.checks import positive_int
from toolkit.jacobian.analysis import check_analysis_settings

DEFAULT_PROMPT = "The bridge out of Marin is the"


def check_jacobian_settings(*, top_k: int = 5, n_vectors: int = 3, chunk_size: int = 64) -> None:
    """Refuse bad settings of :func:`run_jacobian` before any model is loaded or anything is written.

    Example:
        >>> check_jacobian_settings(n_vectors=0)
        Traceback (most recent call last):
        ...
        ValueError: n_vectors (--n-vectors) must be a positive integer (singular vectors decoded per position), got 0; use 1 or more.
    """
    check_analysis_settings(top_k=top_k, n_vectors=n_vectors)
    positive_int("chunk_size", chunk_size, "Jacobian rows per backward pass")


def jacobian_pair(model, ids, target: str | int, chunk_size: int = 64):
    """Detached and ordinary Jacobians of ``target`` for one prompt (the path is chosen by target inside
    :func:`~toolkit.jacobian.compute.detached_jacobian`; the freeze is the same either way).

    Example:
        >>> det, ordinary = jacobian_pair(model, model.to_tokens("Hi there")[0], "mlp.3")
        >>> det.reconstruction_error < 1e-5 < ordinary.reconstruction_error
        True
    """
    from toolkit.jacobian.compute import detached_jacobian
    return tuple(detached_jacobian(model, ids, target=target, detached=d, chunk_size=chunk_size)
                 for d in (True, False))


def run_jacobian(model, prompt: str = DEFAULT_PROMPT, target: str | int = "output", top_k: int = 5,
                 n_vectors: int = 3, chunk_size: int = 64, out: str | Path = "runs/jacobian",
                 route: str = "auto") -> dict[str, Any]:
    """Compute, analyse and write everything for one prompt on a loaded backend; returns the summary.

    Bad settings and targets are refused before any work, and nothing is written then.
    ``route``: ``"auto"`` takes the matrix-free top-k route for prompts whose dense Jacobian would
    not fit or take long (:func:`toolkit.jacobian.long_prompt.choose_route`), ``"full"`` /
    ``"matrix-free"`` force one; the matrix-free route writes ``jacobian.json`` only.

    Example:
        >>> summary = run_jacobian(model, "Paris is", target="resid.3", out=tmp / "jac")
        >>> summary["target"], summary["detached"]["reconstruction_error"] < 1e-5
        ('resid.3', True)
    """
    from toolkit.jacobian.analysis import analyze_with_model
    from toolkit.jacobian.report import write_jacobian_report
    from toolkit.jacobian.targets import resolve_target

    check_jacobian_settings(top_k=top_k, n_vectors=n_vectors, chunk_size=chunk_size)
    out = Path(out)
    target = resolve_target(model.hf_model, target).name  # bad targets fail before any work
    ids = model.to_tokens(prompt)[0]
    from toolkit.jacobian.long_prompt import choose_route, matrix_free_summary
    choice = choose_route(model.hf_model, len(ids), route=route, chunk_size=chunk_size)
    print(f"{len(ids)} tokens: {choice.route} route ({choice.reason})", file=sys.stderr)
    if choice.route == "matrix-free":
        summary = {"model": model.info.model_id, "backend": model.name, "prompt": prompt, "reason": choice.reason,
                   "estimate": choice.estimate.to_dict(),
                   **matrix_free_summary(model, ids, target=target, k=n_vectors, top_k=top_k, chunk_size=chunk_size)}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "jacobian.json", json.dumps(summary, indent=1))
        return summary
    t0 = time.perf_counter()
    det, ordinary = jacobian_pair(model, ids, target, chunk_size)
    timings = {"detached_and_ordinary_s": time.perf_counter() - t0}
    analysis = analyze_with_model(det, model, top_k=top_k, n_vectors=n_vectors)
    out.mkdir(parents=True, exist_ok=True)
    det.save(out / "detached_jacobian")

    summary = {"model": model.info.model_id, "backend": model.name, "prompt": prompt,
               "str_tokens": analysis.str_tokens, "target": target,
               "detached": {"reconstruction_error": det.reconstruction_error,
                            "c_relative_norm": float(det.c.norm() / det.y.norm())},
               "ordinary": {"reconstruction_error": ordinary.reconstruction_error},
               "timings_s": timings, "analysis": analysis.to_dict()}
    atomic_write_text(out / "jacobian.json", json.dumps(summary, indent=1))
    write_jacobian_report(out / "report.html", f"Detached Jacobian — {model.info.model_id}: {prompt!r}",
                          det, ordinary, analysis)
    return summary
