"""Steering's HTML report and side-by-side terminal summary, from a :class:`SteeringResult` (never a model)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from toolkit.report import Section, write_report


def write_steering_report(result, path: str | Path) -> Path:
    """One self-contained page: the λ × layer comparison figure, a table of runs and the settings.

    Example:
        >>> write_steering_report(steering, tmp / "steer.html").exists()
        True
    """
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
    return write_report(path, f"Detached-Jacobian steering — {s['model_id']}", sections)


def format_summary(result, width: int = 100) -> str:
    """Side-by-side text for the terminal: the unsteered continuation next to each steered one.

    Example:
        >>> print(format_summary(steering).splitlines()[0])                # doctest: +ELLIPSIS
        smollm2-135m via nnsight, operator 'sum': concept 'The bridge out of Marin is the Golden'...
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
