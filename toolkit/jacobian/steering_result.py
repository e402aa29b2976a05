"""Results of steering with the detached Jacobian: plain dataclasses, saved and loaded as a checked
folder (:mod:`toolkit.persist`; everything in ``result.json``).

A :class:`SteeringResult` holds one concept prompt, one new prompt, the unsteered (baseline)
greedy continuation and one :class:`SteeringRun` per ``(layer, lam)``; each run keeps its
token ids, text, the log-probabilities of the *tracked* tokens (by default the concept
prompt's content tokens and its predicted next token) at every generated step, and the size
of the edit that was added to the residual stream.

Example:
    >>> base = SteeringRun(layer=None, lam=0.0, token_ids=[5], text=" a", str_tokens=[" a"],
    ...                    tracked_logprobs=[[-3.0]], token_logprobs=[-0.1])
    >>> steered = SteeringRun(layer=2, lam=1.0, token_ids=[7], text=" b", str_tokens=[" b"],
    ...                       tracked_logprobs=[[-1.0]], token_logprobs=[-0.2], hits=1)
    >>> r = SteeringResult("concept", "prompt", [1], [2], [7], [" b"], base, [steered])
    >>> r.steered.text, round(r.delta_concept_logprob(steered), 3)
    (' b', 2.0)
    >>> SteeringResult.from_dict(r.to_dict()).runs[0].lam
    1.0
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from toolkit.persist import Parts, SavedResult

KIND = "toolkit.jacobian.SteeringResult"
VERSION = 1


def logsumexp(values: list[float]) -> float:
    """``log(sum(exp(v)))`` of a list of log-probabilities (``-inf`` for an empty list).

    Example:
        >>> round(logsumexp([math.log(0.25), math.log(0.25)]), 6) == round(math.log(0.5), 6)
        True
    """
    if not values:
        return -math.inf
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


@dataclass
class SteeringRun:
    """One greedy continuation, steered at ``layer`` with weight ``lam`` (``layer=None``: unsteered).

    Fields:
        token_ids / str_tokens / text: the generated tokens (the prompt excluded).
        tracked_logprobs: ``[step][k]`` log-probability of tracked token ``k`` in the next-token
            distribution of each generated step (step 0 = the distribution after the prompt).
        token_logprobs: log-probability of the token actually chosen at each step.
        hits: how many generated tokens are tracked tokens.
        edit_norm: mean ``||lam * A x_t||`` over every steered position (prompt and generated).
        edit_ratio: ``edit_norm`` over the median ``||h_layer||`` of the unsteered prompt positions.
    """

    layer: int | None
    lam: float
    token_ids: list[int]
    text: str
    str_tokens: list[str]
    tracked_logprobs: list[list[float]]
    token_logprobs: list[float]
    hits: int = 0
    edit_norm: float = 0.0
    edit_ratio: float = 0.0

    def concept_logprob(self, step: int = 0) -> float:
        """``log sum_k p(tracked_k)`` at generated step ``step``.

        Example:
            >>> run = SteeringRun(None, 0.0, [1], "x", ["x"], [[math.log(0.1), math.log(0.3)]], [-1.0])
            >>> round(math.exp(run.concept_logprob()), 6)
            0.4
        """
        return logsumexp(self.tracked_logprobs[step])


@dataclass
class SteeringResult(SavedResult):
    """Unsteered and steered continuations of ``prompt`` for a concept prompt (see module docstring).

    ``settings`` records how the runs were made (model, backend, operator, concept position,
    cache use, equation, per-layer operator checks, timings).
    """

    concept_prompt: str
    prompt: str
    concept_ids: list[int]
    prompt_ids: list[int]
    tracked_ids: list[int]
    tracked_tokens: list[str]
    baseline: SteeringRun
    runs: list[SteeringRun]
    settings: dict[str, Any] = field(default_factory=dict)

    # ----- views ---------------------------------------------------------------------------
    @property
    def steered(self) -> SteeringRun:
        """The first steered run (the only one for :func:`~toolkit.jacobian.steering.steer`)."""
        if not self.runs:
            raise ValueError("this result holds no steered run; it was made with an empty sweep.")
        return self.runs[0]

    @property
    def layers(self) -> list[int]:
        """Distinct steered layers, in first-seen order."""
        return list(dict.fromkeys(r.layer for r in self.runs))

    @property
    def lams(self) -> list[float]:
        """Distinct weights, in first-seen order."""
        return list(dict.fromkeys(r.lam for r in self.runs))

    def run(self, layer: int, lam: float) -> SteeringRun:
        """The run steered at ``layer`` with weight ``lam``.

        Example:
            >>> steering.run(20, 1.0).text == steering.steered.text       # the default depth and weight
            True
        """
        for r in self.runs:
            if r.layer == layer and r.lam == lam:
                return r
        raise KeyError(f"no run at layer {layer} with lam {lam}; this result has layers {self.layers} "
                       f"and lams {self.lams}.")

    def delta_concept_logprob(self, run: SteeringRun, step: int = 0) -> float:
        """How much ``log sum_k p(tracked_k)`` at ``step`` rose over the unsteered baseline (nats)."""
        return run.concept_logprob(step) - self.baseline.concept_logprob(step)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per run, baseline first: what the report table and the CLI summary show.

        Example:
            >>> steering.rows()[0]["layer"]
            '-'
        """
        out = []
        for r in [self.baseline, *self.runs]:
            out.append({"layer": "-" if r.layer is None else r.layer, "lam": r.lam,
                        "d log p(concept), step 0": self.delta_concept_logprob(r),
                        "concept hits": r.hits, "edit / |h|": r.edit_ratio, "continuation": r.text})
        return out

    def to_frame(self):
        """:meth:`rows` as a ``pandas.DataFrame`` (one row per continuation: layer, lam, Δ log p, text).

        Example:
            >>> steering.to_frame()[["layer", "lam"]].values.tolist()[1]
            [20, 1.0]
        """
        import pandas as pd
        return pd.DataFrame(self.rows())

    def figure(self):
        """The λ × layer comparison figure (:func:`toolkit.plots.jacobian.steering_comparison`)."""
        from toolkit.plots.jacobian import steering_comparison
        return steering_comparison(self)

    def report(self, path: str | Path) -> Path:
        """Write the self-contained HTML report (:func:`toolkit.jacobian.steering_report.write_steering_report`).

        Example:
            >>> steering.report(tmp / "steer.html").exists()
            True
        """
        from toolkit.jacobian.steering_report import write_steering_report
        return write_steering_report(self, path)

    # ----- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, with ``kind`` and ``version``."""
        return {"kind": KIND, "version": VERSION, "concept_prompt": self.concept_prompt, "prompt": self.prompt,
                "concept_ids": list(self.concept_ids), "prompt_ids": list(self.prompt_ids),
                "tracked_ids": list(self.tracked_ids), "tracked_tokens": list(self.tracked_tokens),
                "baseline": asdict(self.baseline), "runs": [asdict(r) for r in self.runs],
                "settings": self.settings}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SteeringResult":
        """Inverse of :meth:`to_dict`; refuses dicts of another kind or version with a clear error."""
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind != KIND:
            raise ValueError(f"not a saved SteeringResult (found kind {kind!r}, expected {KIND!r}).")
        if data.get("version") != VERSION:
            raise ValueError(f"SteeringResult format version {data.get('version')!r}; this toolkit reads "
                             f"version {VERSION}.")
        return cls(concept_prompt=data["concept_prompt"], prompt=data["prompt"], concept_ids=data["concept_ids"],
                   prompt_ids=data["prompt_ids"], tracked_ids=data["tracked_ids"],
                   tracked_tokens=data["tracked_tokens"], baseline=SteeringRun(**data["baseline"]),
                   runs=[SteeringRun(**r) for r in data["runs"]], settings=data.get("settings", {}))

    KIND = KIND
    NOUN = "SteeringResult"

    def _to_parts(self) -> Parts:
        data = self.to_dict()
        return Parts(fields={k: v for k, v in data.items() if k not in ("kind", "version", "settings")})

    @classmethod
    def _from_parts(cls, parts: Parts) -> "SteeringResult":
        return cls.from_dict({**parts.fields, "kind": KIND, "version": VERSION})

    def __repr__(self) -> str:
        return (f"SteeringResult(concept={self.concept_prompt!r}, prompt={self.prompt!r}, layers={self.layers}, "
                f"lams={self.lams}, baseline={self.baseline.text!r})")
