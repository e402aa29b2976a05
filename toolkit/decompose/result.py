"""The decomposition's result: per-anchor arrays, per-layer summaries, settings; save and reload.

One row per (layer, test anchor). Columns (all 1-D numpy arrays of equal length):

* ``layer, text, position, token_id`` and ``token``/``context`` strings (for hover text);
* ``rel_err`` = ||h_{l+1} - T(h_l)|| / ||h_{l+1}||; ``kl`` = KL(P_orig || P_patched) after replacing
  h_{l+1} by T(h_l) at the anchor; ``kl_random``: the same for an equal-norm perturbation
  h_{l+1} + ||r|| u in a random direction u (control: is the residual special or just large?);
* ``cos_full_tok``/``cos_res_tok`` (signed), ``abs_cos_*`` and ``angle_*`` (degrees) between the
  full update and the tokenwise update, and between the residual and the tokenwise update;
* ``proj_{full,tokenwise,residual}_{1,4,8}``: fraction of the vector's energy in the top-k left
  singular vectors of the local map (a random vector gets k/d);
* with the MLP comparison, ``rel_err_mlp`` and ``kl_mlp``;
* with the controls (:mod:`toolkit.decompose.baselines`): ``norm_x, norm_y, norm_update``;
  ``rel_err_identity`` (= the update's relative size ``||Δ|| / ||h_{l+1}||``) and ``kl_identity``
  (``h_{l+1}`` replaced by ``h_l``); ``update_err`` = ``||Δ - Δ̂|| / ||Δ||``; ``rel_err_*`` and
  ``update_err_*`` of the baselines ``mean_update``, ``global`` (ridge) and ``random_nb``;
  ``abs_cos_{full,res}_tok_{global,mean_update}``; ``massive`` (bool).

Beside the per-layer summaries (which then carry the baselines, robust summaries, R² and the
partial Spearman, :func:`toolkit.decompose.controls.layer_controls`), ``controls`` holds the pooled
controls and ``verdicts`` the verdict table of the paper's claims (:mod:`toolkit.decompose.verdicts`,
whose rules are recorded in ``settings["verdict_rules"]``).

Saved as a checked folder (:mod:`toolkit.persist`): ``result.json`` (settings, summaries, versions,
checksums), ``anchors.npz`` (the arrays) and ``anchors.csv`` (the same, for spreadsheets), swapped
in as a whole.

Example:
    >>> import toolkit
    >>> path = decomposition.save(tmp / "smollm2")      # decomposition = toolkit.decompose_layers(model, ...)
    >>> toolkit.load(path).layer_summary == decomposition.layer_summary
    True
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import numpy as np

from toolkit.decompose.statistics import mean_rho_with_ci, regimes, spearman_with_ci
from toolkit.decompose.views import DecompositionViews
from toolkit.persist import Parts, SavedResult, read_npz

KIND = "toolkit.decompose.DecompositionResult"


@dataclass
class DecompositionResult(DecompositionViews, SavedResult):
    """Per-anchor measurements of a decomposition run, their summaries, and its settings.

    Views (figures, tables, the report) come from :class:`~toolkit.decompose.views.DecompositionViews`.
    """

    settings: dict
    anchors: dict[str, np.ndarray]
    layer_summary: list[dict] = field(default_factory=list)
    model_summary: dict = field(default_factory=dict)
    regimes: dict = field(default_factory=dict)
    sweeps: dict = field(default_factory=dict)
    controls: dict = field(default_factory=dict)
    verdicts: list[dict] = field(default_factory=list)

    # ----- summaries -------------------------------------------------------------------
    @classmethod
    def build(cls, settings: dict, anchors: dict[str, np.ndarray], n_boot: int = 1000) -> "DecompositionResult":
        """Compute per-layer and pooled summaries (rho with intervals, means, regimes) from the anchors."""
        result = cls(settings=settings, anchors=anchors)
        result.summarise(n_boot)
        return result

    def summarise(self, n_boot: int = 1000) -> None:
        a = self.anchors
        rows = []
        d = self.settings.get("d_model", 1)
        for layer in np.unique(a["layer"]):
            sel = a["layer"] == layer
            rho = spearman_with_ci(a["rel_err"][sel], a["kl"][sel], n_boot=n_boot, seed=int(layer))
            row = {"layer": int(layer), "n": int(sel.sum()), "rho": rho.rho, "rho_ci_low": rho.ci_low,
                   "rho_ci_high": rho.ci_high, "p_value": rho.p_value,
                   "rel_err_mean": float(np.nanmean(a["rel_err"][sel])), "rel_err_median": float(np.median(a["rel_err"][sel])),
                   "kl_mean": float(a["kl"][sel].mean()), "kl_random_mean": float(a["kl_random"][sel].mean()),
                   "abs_cos_full_tok": float(np.nanmean(a["abs_cos_full_tok"][sel])),
                   "abs_cos_res_tok": float(np.nanmean(a["abs_cos_res_tok"][sel]))}
            for kind in ("full", "tokenwise", "residual"):
                for k in (1, 4, 8):
                    row[f"proj_{kind}_{k}"] = float(np.nanmean(a[f"proj_{kind}_{k}"][sel]))
            for k in (1, 4, 8):
                row[f"proj_random_{k}"] = k / d
            if "rel_err_mlp" in a:
                row["rel_err_mlp_mean"] = float(np.nanmean(a["rel_err_mlp"][sel]))
                row["kl_mlp_mean"] = float(a["kl_mlp"][sel].mean())
            rows.append(row)
        self.layer_summary = rows
        pooled = spearman_with_ci(a["rel_err"], a["kl"], n_boot=n_boot)
        rhos = np.array([r["rho"] for r in rows])
        layer_mean = mean_rho_with_ci([(a["rel_err"][a["layer"] == l], a["kl"][a["layer"] == l])
                                       for l in np.unique(a["layer"])], n_boot=n_boot)
        self.model_summary = {"rho_pooled": pooled.to_dict(), "rho_layer_mean": float(rhos.mean()),
                              "rho_layer_mean_ci": [layer_mean["ci_low"], layer_mean["ci_high"]],
                              "rho_layer_min": float(rhos.min()), "rho_layer_max": float(rhos.max()),
                              "rel_err_mean": float(a["rel_err"].mean()), "kl_mean": float(a["kl"].mean()),
                              "kl_random_mean": float(a["kl_random"].mean()),
                              "kl_ratio_residual_vs_random": float(a["kl"].mean() / max(a["kl_random"].mean(), 1e-30))}
        self.regimes = {"linear": regimes(a["rel_err"], a["kl"])}
        if "rel_err_mlp" in a:
            self.regimes["mlp"] = regimes(a["rel_err_mlp"], a["kl_mlp"])
        if "rel_err_identity" in a:           # results made with the controls on
            self._summarise_controls(n_boot)

    def _summarise_controls(self, n_boot: int) -> None:
        from toolkit.decompose.controls import layer_controls, pooled_controls
        from toolkit.decompose.verdicts import RULES, VERSION, verdict_table
        a, d = self.anchors, self.settings.get("d_model", 1)
        for row in self.layer_summary:
            row.update(layer_controls(a, a["layer"] == row["layer"], n_boot=n_boot, seed=row["layer"]))
        self.controls = pooled_controls(a, d, n_boot=n_boot)
        self.verdicts = verdict_table(a, self.model_summary, self.controls, d, n_boot=n_boot)
        self.settings["verdict_rules"] = {"version": VERSION, "rules": RULES}

    # ----- persistence (toolkit.persist: .save(path), DecompositionResult.load(path)) -----------
    KIND = KIND
    NOUN = "decomposition result"

    def _to_parts(self) -> Parts:
        buf = io.BytesIO()
        np.savez_compressed(buf, **self.anchors)
        text = io.StringIO()
        writer = csv.writer(text)
        cols = list(self.anchors)
        writer.writerow(cols)
        writer.writerows(zip(*(self.anchors[c].tolist() for c in cols)))
        return Parts(fields={"layer_summary": self.layer_summary, "model_summary": self.model_summary,
                             "regimes": self.regimes, "sweeps": self.sweeps,
                             "controls": self.controls, "verdicts": self.verdicts},
                     files={"anchors.npz": buf.getvalue(), "anchors.csv": text.getvalue().encode()})

    @classmethod
    def _from_parts(cls, parts: Parts) -> "DecompositionResult":
        f = parts.fields
        npz = parts.files["anchors.npz"]
        return cls(settings=f["settings"], anchors=read_npz(npz, npz.parent), layer_summary=f["layer_summary"],
                   model_summary=f["model_summary"], regimes=f["regimes"], sweeps=f.get("sweeps", {}),
                   controls=f.get("controls", {}), verdicts=f.get("verdicts", []))
