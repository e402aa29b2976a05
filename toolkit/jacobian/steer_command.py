"""``python -m toolkit steer``: steer a continuation with a concept prompt's detached Jacobian (eq. 16).

:func:`add_steer_parser` registers the sub-command on an ``argparse`` sub-parser set;
:func:`run_steer` does the work and returns the :class:`~toolkit.jacobian.steering_result.SteeringResult`.

Outputs in ``--out`` (default ``runs/steer``):

* ``steering/`` — the result (``toolkit.load``-able): both continuations per
  ``(layer, λ)``, token ids, tracked-token log-probabilities per step, settings;
* ``report.html`` — one self-contained page: the λ × layer comparison figure and a table.

Several ``--lam`` values (and several ``--layer`` values, e.g. ``20,25``) make a sweep.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers(dest="command")
    >>> _ = add_steer_parser(sub)
    >>> args = parser.parse_args(["steer", "--lam", "0.5", "1,2", "--layer", "20,25"])
    >>> parse_floats(args.lam), parse_ints(args.layer), args.max_new_tokens
    ([0.5, 1.0, 2.0], [20, 25], 20)
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Sequence

DEFAULT_CONCEPT = "The bridge out of Marin is the Golden"
DEFAULT_PROMPT = "I'm going to Arizona to see the"


def add_steer_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``steer`` (with its arguments) on ``subparsers``; returns the sub-parser.

    The sub-parser's default ``func`` is :func:`cmd_steer` (``args.func(args)`` runs it).

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers()
        >>> add_steer_parser(sub).prog.endswith("steer")
        True
    """
    p = subparsers.add_parser("steer", help="steer generation with a concept prompt's detached Jacobian (eq. 16)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="registry name, hub id or local folder")
    p.add_argument("--backend", default=None, help="transformer_lens (tl) or nnsight; default by architecture")
    p.add_argument("--concept", default=DEFAULT_CONCEPT,
                   help="concept prompt whose detached Jacobian steers (best: one whose next token is the concept)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to continue, with and without steering")
    p.add_argument("--layer", default=None,
                   help="boundary 1..n_layers where the edit is added, or a list '20,25' (default: 2/3 of depth)")
    p.add_argument("--lam", nargs="+", default=["1.0"], help="weight λ, or several for a sweep: --lam 0.5 1 2")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens generated per continuation")
    p.add_argument("--operator", default="sum", choices=["sum", "last", "window"],
                   help="which concept Jacobian blocks act on the new embeddings (see toolkit.jacobian.steering)")
    p.add_argument("--track", nargs="*", default=None,
                   help="tokens whose probability is tracked (default: the concept's content tokens and next token)")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence each step (reference)")
    p.add_argument("--out", default="runs/steer", help="output folder")
    p.set_defaults(func=cmd_steer)
    return p


def parse_floats(values: Sequence[str] | str) -> list[float]:
    """``["0.5", "1,2"]`` -> ``[0.5, 1.0, 2.0]``; a clear error for anything that is not a number.

    Example:
        >>> parse_floats(["-1", "0.5,2"])
        [-1.0, 0.5, 2.0]
    """
    values = [values] if isinstance(values, str) else list(values)
    out = []
    for part in (p.strip() for v in values for p in str(v).split(",")):
        if not part:
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise ValueError(f"--lam must be numbers (e.g. --lam 0.5 1 2), got {part!r}.") from None
    return out


def parse_ints(value: str | int | None) -> list[int] | None:
    """``"20,25"`` -> ``[20, 25]``; ``None`` stays ``None`` (the default layer).

    Example:
        >>> parse_ints("12"), parse_ints(None)
        ([12], None)
    """
    if value is None:
        return None
    try:
        return [int(p) for p in str(value).split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--layer must be an integer boundary or a list like '20,25', got {value!r}.") from None


def default_layer(n_layers: int) -> int:
    """About two thirds of the depth, as in the paper (Llama 3.1 8B: 22 of 32; Qwen 3 8B: 24 of 36).

    Example:
        >>> default_layer(30)
        20
    """
    return max(1, min(n_layers, round(2 * n_layers / 3)))


def run_steer(model, concept: str = DEFAULT_CONCEPT, prompt: str = DEFAULT_PROMPT, layers: Sequence[int] | None = None,
              lams: Sequence[float] = (1.0,), max_new_tokens: int = 20, operator: str = "sum",
              track: Sequence[str] | None = None, use_cache: bool = True, out: str | Path = "runs/steer"):
    """Steer, then write ``steering/`` (the saved result) and ``report.html`` into ``out``; returns the result.

    Example:
        >>> result = run_steer(toolkit.load_model(), lams=[0.5, 1], out="/tmp/steer")   # doctest: +SKIP
        >>> print(format_summary(result))                                              # doctest: +SKIP
    """
    from toolkit.jacobian.steering import steering_sweep
    from toolkit.report import Section, write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers = list(layers) if layers else [default_layer(model.n_layers)]
    result = steering_sweep(model, concept, prompt, layers, list(lams), max_new_tokens, operator=operator,
                            concept_tokens=track or None, use_cache=use_cache)
    result.save(out / "steering")
    s = result.settings
    rows = [{k: (f"{v:+.3f}" if k.startswith("d log") else v) for k, v in row.items()} for row in result.rows()]
    sections = [
        Section("Steered vs unsteered", text=(
            f"Concept prompt {result.concept_prompt!r}; prompt {result.prompt!r}. At boundary l every position t "
            f"of the prompt and of each generated token gets h_l[t] += λ·A(x')_t, A from the concept's detached "
            f"Jacobian (operator {s['operator']!r}); greedy decoding, {s['max_new_tokens']} tokens, "
            f"{'KV cache' if s['use_cache'] else 'no cache'}, backend {s['backend']}. Colour: rise of "
            f"log Σ p(tracked tokens) at the first generated step over the unsteered run. Tracked tokens: "
            f"{', '.join(repr(t) for t in result.tracked_tokens)}."), figure=result.figure(), table=rows),
        Section("Settings", table=[{"setting": k, "value": v} for k, v in s.items() if k != "timings_s"]),
    ]
    write_report(out / "report.html", f"Detached-Jacobian steering — {s['model_id']}", sections)
    return result


def format_summary(result, width: int = 100) -> str:
    """Side-by-side text for the terminal: the unsteered continuation next to each steered one.

    Example:
        >>> print(format_summary(result))                                               # doctest: +SKIP
    """
    s = result.settings
    lines = [f"{s['model_id']} via {s['backend']}, operator {s['operator']!r}: concept {result.concept_prompt!r}",
             f"prompt {result.prompt!r}; tracked {', '.join(repr(t) for t in result.tracked_tokens)}"]
    col = max(24, (width - 24) // 2)
    base = textwrap.wrap(repr(result.baseline.text), col) or [""]
    lines.append(f"{'layer':>5} {'lam':>6} {'dlogp':>6}  {'unsteered':<{col}}  steered")
    for r in result.runs:
        steered = textwrap.wrap(repr(r.text), col) or [""]
        for k in range(max(len(base), len(steered))):
            head = (f"{r.layer:>5} {r.lam:>6g} {result.delta_concept_logprob(r):>+6.2f}" if k == 0 else " " * 20)
            left = base[k] if k < len(base) else ""
            right = steered[k] if k < len(steered) else ""
            lines.append(f"{head}  {left:<{col}}  {right}")
    return "\n".join(lines)


def cmd_steer(args: argparse.Namespace) -> int:
    """The ``steer`` command: load the model, :func:`run_steer`, print the side-by-side summary.

    Example:
        >>> cmd_steer(parser.parse_args(["steer", "--out", "/tmp/s"]))        # doctest: +SKIP
        0
    """
    import toolkit
    lams = parse_floats(args.lam)
    layers = parse_ints(args.layer)
    model = toolkit.load_model(args.model, backend=args.backend)
    result = run_steer(model, concept=args.concept, prompt=args.prompt, layers=layers, lams=lams,
                       max_new_tokens=args.max_new_tokens, operator=args.operator, track=args.track,
                       use_cache=not args.no_cache, out=args.out)
    print(format_summary(result))
    print(f"wrote {Path(args.out) / 'steering'}, {Path(args.out) / 'report.html'}")
    return 0
