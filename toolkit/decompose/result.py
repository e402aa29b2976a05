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
* with the MLP comparison, ``rel_err_mlp`` and ``kl_mlp``.

Saved as a folder: ``result.json`` (settings and summaries), ``anchors.npz`` (the arrays) and
``anchors.csv`` (the same, for spreadsheets), each written atomically.

Example:
    >>> result = decompose(model, "wikitext-test", layers=[10])      # doctest: +SKIP
    >>> result.save("runs/smollm2"); DecompositionResult.load("runs/smollm2").layer_summary  # doctest: +SKIP
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.decompose.statistics import mean_rho_with_ci, regimes, spearman_with_ci
from toolkit.decompose.views import DecompositionViews

KIND = "toolkit.decompose.DecompositionResult"
VERSION = 1


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class DecompositionResult(DecompositionViews):
    """Per-anchor measurements of a decomposition run, their summaries, and its settings.

    Views (figures, tables, the report) come from :class:`~toolkit.decompose.views.DecompositionViews`.
    """

    settings: dict
    anchors: dict[str, np.ndarray]
    layer_summary: list[dict] = field(default_factory=list)
    model_summary: dict = field(default_factory=dict)
    regimes: dict = field(default_factory=dict)
    sweeps: dict = field(default_factory=dict)

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

    # ----- persistence -----------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, **self.anchors)
        _atomic_write(folder / "anchors.npz", buf.getvalue())
        text = io.StringIO()
        writer = csv.writer(text)
        cols = list(self.anchors)
        writer.writerow(cols)
        writer.writerows(zip(*(self.anchors[c].tolist() for c in cols)))
        _atomic_write(folder / "anchors.csv", text.getvalue().encode())
        meta = {"kind": KIND, "version": VERSION, "settings": self.settings, "layer_summary": self.layer_summary,
                "model_summary": self.model_summary, "regimes": self.regimes, "sweeps": self.sweeps}
        _atomic_write(folder / "result.json", json.dumps(meta, indent=1).encode())  # last: marks completeness
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "DecompositionResult":
        folder = Path(folder)
        try:
            meta = json.loads((folder / "result.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder} holds no decomposition result (no result.json).") from None
        if meta.get("kind") != KIND:
            raise ValueError(f"{folder}/result.json is a {meta.get('kind')!r}, not a decomposition result.")
        with np.load(folder / "anchors.npz", allow_pickle=False) as z:
            anchors = {k: z[k] for k in z.files}
        return cls(settings=meta["settings"], anchors=anchors, layer_summary=meta["layer_summary"],
                   model_summary=meta["model_summary"], regimes=meta["regimes"], sweeps=meta.get("sweeps", {}))
