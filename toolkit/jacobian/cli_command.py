"""``python -m toolkit jacobian``: detached Jacobian of one prompt, its SVD, decoded tokens, a report.

:func:`add_jacobian_parser` registers the sub-command on an ``argparse`` sub-parser set;
:func:`run_jacobian` does the work and returns the JSON summary it writes.

Outputs in ``--out`` (default ``runs/jacobian``):

* ``jacobian.json`` — reconstruction errors (detached and ordinary), stable ranks, singular
  values and decoded tokens per position;
* ``detached_jacobian/`` — the :class:`~toolkit.jacobian.result.DetachedJacobian` (``toolkit.load``-able);
* ``report.html`` — one self-contained page with the figures.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers(dest="command")
    >>> _ = add_jacobian_parser(sub)
    >>> args = parser.parse_args(["jacobian", "--layer", "3"])
    >>> args.layer, args.top_k, args.prompt
    ('3', 5, 'The bridge out of Marin is the')
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "The bridge out of Marin is the"


def add_jacobian_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``jacobian`` (with its arguments) on ``subparsers``; returns the sub-parser.

    The sub-parser's default ``func`` is :func:`cmd_jacobian` (``args.func(args)`` runs it).

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers()
        >>> add_jacobian_parser(sub).prog.endswith("jacobian")
        True
    """
    p = subparsers.add_parser("jacobian", help="detached Jacobian of a prompt: reconstruction, SVD, decoded tokens",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="registry name, hub id or local folder")
    p.add_argument("--backend", default=None, help="transformer_lens (tl) or nnsight; default by architecture")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text whose last position is explained")
    p.add_argument("--layer", default="output",
                   help="target: 'output' (final-norm state), a layer boundary 0..n_layers, or a component: "
                        "'attn.l' / 'mlp.l' (block l's sublayer output), 'layer.l' (block l's own h_l -> h_{l+1})")
    p.add_argument("--top-k", type=int, default=5, help="decoded tokens per singular vector")
    p.add_argument("--n-vectors", type=int, default=3, help="singular vectors decoded per position")
    p.add_argument("--chunk-size", type=int, default=64, help="Jacobian rows per backward pass")
    route = p.add_mutually_exclusive_group()
    route.add_argument("--full", dest="route", action="store_const", const="full",
                       help="always form the dense Jacobian (refused if it would not fit in memory)")
    route.add_argument("--matrix-free", dest="route", action="store_const", const="matrix-free",
                       help="top-k SVD of the whole-prompt map without forming it (default for long prompts)")
    p.set_defaults(route="auto")
    p.add_argument("--out", default="runs/jacobian", help="output folder")
    p.set_defaults(func=cmd_jacobian)
    return p


_COMPONENTS = ("attn", "mlp", "layer")


def parse_target(layer: str | int) -> str | int:
    """``'output'``, an int boundary or a component (``'attn.l'``, ``'mlp.l'``, ``'layer.l'``) from ``--layer``.

    Range checks happen later, against the model (:func:`toolkit.jacobian.targets.resolve_target`).

    Example:
        >>> parse_target("output"), parse_target("12"), parse_target("MLP.3")
        ('output', 12, 'mlp.3')
    """
    if isinstance(layer, int) or str(layer).lstrip("-").isdigit():
        return int(layer)
    text = str(layer).strip().lower()
    if text in ("output", "out", "final"):
        return "output"
    kind, _, index = text.partition(".")
    if kind in _COMPONENTS and index.isdigit():
        return f"{kind}.{int(index)}"
    raise ValueError(f"--layer must be 'output', a layer boundary (an integer) or a component "
                     f"('attn.l', 'mlp.l', 'layer.l' with a block index l), got {layer!r}.")


def compute_pair(model, ids, target: str | int, chunk_size: int):
    """Detached and ordinary Jacobians of ``target``: through the backend's own hooks for ``"output"``
    and boundaries, on ``model.hf_model`` directly for components (the freeze is the same either way)."""
    from toolkit.jacobian.compute import detached_jacobian
    from toolkit.jacobian.through_backend import backend_jacobian
    if target == "output" or isinstance(target, int):
        return tuple(backend_jacobian(model, ids, target=target, detached=d, chunk_size=chunk_size)
                     for d in (True, False))
    return tuple(detached_jacobian(model.hf_model, ids, target=target, detached=d, chunk_size=chunk_size,
                                   model_id=model.info.model_id) for d in (True, False))


def run_jacobian(model, prompt: str = DEFAULT_PROMPT, target: str | int = "output", top_k: int = 5,
                 n_vectors: int = 3, chunk_size: int = 64, out: str | Path = "runs/jacobian",
                 route: str = "auto") -> dict[str, Any]:
    """Compute, analyse and write everything for one prompt on a loaded backend; returns the summary.

    ``route``: ``"auto"`` takes the matrix-free top-k route for prompts whose dense Jacobian would
    not fit or take long (:func:`toolkit.jacobian.long_prompt.choose_route`), ``"full"`` /
    ``"matrix-free"`` force one; the matrix-free route writes ``jacobian.json`` only.

    Example:
        >>> summary = run_jacobian(toolkit.load_model(), "The capital of France is", out="/tmp/jac")  # doctest: +SKIP
        >>> summary["detached"]["reconstruction_error"] < 1e-5                                         # doctest: +SKIP
        True
    """
    from toolkit.jacobian.analysis import analyze_with_model
    from toolkit.jacobian.long_prompt import choose_route, matrix_free_summary
    from toolkit.jacobian.targets import resolve_target
    from toolkit.plots.jacobian import decoded_tokens_table, reconstruction_scatter, singular_spectra
    from toolkit.report import Section, write_report

    out = Path(out)
    target = resolve_target(model.hf_model, parse_target(target)).name  # bad targets fail before any work
    out.mkdir(parents=True, exist_ok=True)
    ids = model.to_tokens(prompt)[0]
    choice = choose_route(model.hf_model, len(ids), route=route, chunk_size=chunk_size)
    print(f"{len(ids)} tokens: {choice.route} route ({choice.reason})", file=sys.stderr)
    if choice.route == "matrix-free":
        summary = {"model": model.info.model_id, "backend": model.name, "prompt": prompt, "reason": choice.reason,
                   "estimate": choice.estimate.to_dict(),
                   **matrix_free_summary(model, ids, target=target, k=n_vectors, top_k=top_k, chunk_size=chunk_size)}
        (out / "jacobian.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        return summary
    t0 = time.perf_counter()
    det, ordinary = compute_pair(model, ids, target, chunk_size)
    timings = {"detached_and_ordinary_s": time.perf_counter() - t0}
    analysis = analyze_with_model(det, model, top_k=top_k, n_vectors=n_vectors)
    det.save(out / "detached_jacobian")

    summary = {"model": model.info.model_id, "backend": model.name, "prompt": prompt,
               "str_tokens": analysis.str_tokens, "target": target,
               "detached": {"reconstruction_error": det.reconstruction_error,
                            "c_relative_norm": float(det.c.norm() / det.y.norm())},
               "ordinary": {"reconstruction_error": ordinary.reconstruction_error},
               "timings_s": timings, "analysis": analysis.to_dict()}
    (out / "jacobian.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")

    rank_rows = [{"position": i, "token": repr(t), "stable rank": float(analysis.stable_rank[i]),
                  "sigma_1": float(analysis.singular_values[i, 0]),
                  "top left token": analysis.left[i][0]["tokens"][0],
                  "top right token": analysis.right[i][0]["tokens"][0]}
                 for i, t in enumerate(analysis.str_tokens)]
    sections = [
        Section("Reconstruction", text=(f"y = sum_i J_i x_i + c. Detached relative error "
                                        f"{det.reconstruction_error:.2e}; ordinary Jacobian "
                                        f"{ordinary.reconstruction_error:.2e}."),
                figure=reconstruction_scatter(det, ordinary)),
        Section("Singular spectra", text="Singular values of the detached J_i for each input token.",
                figure=singular_spectra(analysis)),
        Section("Decoded singular vectors", text=("Left singular vectors decoded through W_U (sign: u·y > 0), "
                                                  "right ones by cosine with W_E rows; hover the grid for scores."),
                figure=decoded_tokens_table(analysis), table=rank_rows),
    ]
    write_report(out / "report.html", f"Detached Jacobian — {model.info.model_id}: {prompt!r}", sections)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: errors, stable ranks and top decoded tokens per position.

    Example:
        >>> print(format_summary(summary))                                     # doctest: +SKIP
    """
    if summary.get("route") == "matrix-free":
        lines = [f"{summary['model']} via {summary['backend']}, target {summary['target']!r}, {summary['n_tokens']} "
                 f"tokens, matrix-free top-{len(summary['singular_values'])} ({summary['reason']})"]
        lines += [f"  sigma {v['sigma']:.3g}  out: {' | '.join(v['output_tokens'][:3])!r}  from: "
                  f"{', '.join(repr(p['token']) for p in v['top_positions'][:3])}" for v in summary["vectors"]]
        return "\n".join(lines)
    a = summary["analysis"]
    lines = [f"{summary['model']} via {summary['backend']}, target {summary['target']!r}: {summary['prompt']!r}",
             f"reconstruction error: detached {summary['detached']['reconstruction_error']:.2e}, "
             f"ordinary {summary['ordinary']['reconstruction_error']:.2e}"]
    for i, tok in enumerate(a["str_tokens"]):
        left = " | ".join(e["tokens"][0] for e in a["left"][i])
        right = " | ".join(e["tokens"][0] for e in a["right"][i])
        lines.append(f"  {i:>2} {tok!r:<14} stable rank {a['stable_rank'][i]:6.2f}  out: {left!r:<32} in: {right!r}")
    return "\n".join(lines)


def cmd_jacobian(args: argparse.Namespace) -> int:
    """The ``jacobian`` command: load the model, :func:`run_jacobian`, print the summary.

    Example:
        >>> cmd_jacobian(parser.parse_args(["jacobian", "--out", "/tmp/j"]))   # doctest: +SKIP
        0
    """
    import toolkit
    model = toolkit.load_model(args.model, backend=args.backend)
    summary = run_jacobian(model, prompt=args.prompt, target=parse_target(args.layer), top_k=args.top_k,
                           n_vectors=args.n_vectors, chunk_size=args.chunk_size, out=args.out, route=args.route)
    print(format_summary(summary))
    written = ["jacobian.json"] + ([] if summary.get("route") == "matrix-free" else ["report.html"])
    print("wrote " + ", ".join(str(Path(args.out) / name) for name in written))
    return 0
