"""Saved results: one checked folder format for every result type, toolkit.load, atomic saves (#11, #15)."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import toolkit
from toolkit.decompose.result import DecompositionResult
from toolkit.jacobian.all_layers import LayerJacobians, all_layer_jacobians
from toolkit.jacobian.analysis import JacobianSVD, analyze_jacobian
from toolkit.jacobian.compute import detached_jacobian
from toolkit.jacobian.layerwise import LayerwiseSpectra, layerwise_spectra
from toolkit.jacobian.matrix_free import TopSVD, jacobian_svd
from toolkit.jacobian.result import DetachedJacobian
from toolkit.jacobian.steering_result import SteeringResult, SteeringRun
from toolkit.models.tiny import tiny_hf_model
from toolkit.atomic import temporary_prefix
from toolkit.persist import FORMAT_VERSION, KINDS, class_for

IDS = torch.tensor([3, 17, 42, 7])


@pytest.fixture(scope="module")
def model():
    return tiny_hf_model("llama", n_layers=2)


def decomposition(seed: int) -> DecompositionResult:
    """A small result with its summaries; two seeds give different settings and anchors."""
    rng = np.random.default_rng(seed)
    n = 24
    anchors = {"layer": np.repeat([0, 1], n // 2), "token": np.array([f"t{seed}_{i}" for i in range(n)]),
               "rel_err": rng.random(n) + 0.1, "kl": rng.random(n), "kl_random": rng.random(n)}
    for col in ("abs_cos_full_tok", "abs_cos_res_tok"):
        anchors[col] = rng.random(n)
    for kind in ("full", "tokenwise", "residual"):
        for k in (1, 4, 8):
            anchors[f"proj_{kind}_{k}"] = rng.random(n)
    return DecompositionResult.build({"model_id": f"run-{seed}", "seed": seed, "d_model": 64, "layers": (0, 1)},
                                     anchors, n_boot=20)


def every_result(model) -> dict[str, object]:
    det = detached_jacobian(model, IDS)
    layers = all_layer_jacobians(model, IDS, components=("resid", "mlp"))
    base = SteeringRun(None, 0.0, [1], " a", [" a"], [[-3.0]], [-0.1])
    steered = SteeringRun(1, 1.0, [2], " b", [" b"], [[-1.0]], [-0.2], hits=1, edit_norm=0.5, edit_ratio=0.1)
    return {
        "toolkit.decompose.DecompositionResult": decomposition(0),
        "toolkit.jacobian.DetachedJacobian": det,
        "toolkit.jacobian.SteeringResult": SteeringResult("c", "p", [1], [2], [2], [" b"], base, [steered],
                                                          {"operator": "sum", "operator_replay_error": {1: 1e-7}}),
        "toolkit.jacobian.JacobianSVD": analyze_jacobian(det, model.lm_head.weight.T, model.get_input_embeddings().weight,
                                                         str, top_k=3),
        "toolkit.jacobian.LayerwiseSpectra": layerwise_spectra(layers, k=4),
        "toolkit.jacobian.TopSVD": jacobian_svd(model, IDS, k=3, max_blocks=2),
        "toolkit.jacobian.LayerJacobians": layers,
    }


def same(a, b) -> None:
    """Field by field: tensors exactly equal (dtype included), everything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b), (a, b)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b)
        for name in a.__dataclass_fields__:
            same(getattr(a, name), getattr(b, name))
    elif isinstance(a, (list, tuple)) and a and isinstance(a[0], (dict, list, tuple, torch.Tensor)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b)
    else:
        assert a == b and type(a) is type(b), (a, b)


def test_every_result_type_roundtrips_and_toolkit_load_finds_its_kind(model, tmp_path):
    results = every_result(model)
    assert set(results) == set(KINDS)  # every registered kind is covered here
    for kind, result in results.items():
        assert type(result).KIND == kind and class_for(kind) is type(result)
        path = result.save(tmp_path / kind)
        meta = json.loads((path / "result.json").read_text())
        assert meta["kind"] == kind and meta["format_version"] == FORMAT_VERSION
        for lib in ("toolkit", "torch", "transformers", "transformer_lens", "nnsight"):
            assert meta["saved_by"][lib], lib
        assert meta["saved_by"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
        assert set(meta["files"]) == {p.name for p in path.iterdir()} - {"result.json"}
        same(result, toolkit.load(path))
        same(result, type(result).load(path))
    # settings come back with their types: tuples and int keys
    assert toolkit.load(tmp_path / "toolkit.decompose.DecompositionResult").settings["layers"] == (0, 1)
    back = toolkit.load(tmp_path / "toolkit.jacobian.SteeringResult")
    assert back.settings["operator_replay_error"] == {1: 1e-7}
    names = results["toolkit.jacobian.LayerJacobians"].names
    assert toolkit.load(tmp_path / "toolkit.jacobian.LayerJacobians").names == names and len(names) == 5


def test_smollm2_jacobian_reloads_exact(smollm2_hf, smollm2_tokenizer, tmp_path):
    ids = torch.tensor(smollm2_tokenizer("The bridge")["input_ids"])
    r = detached_jacobian(smollm2_hf, ids, target=2)
    back = toolkit.load(r.save(tmp_path / "jac"))
    assert torch.equal(back.jacobian, r.jacobian) and back.settings == r.settings
    recon = torch.einsum("toi,ti->o", back.jacobian.double(), back.x.double()) + back.c.double()
    assert float((recon - back.y.double()).norm() / back.y.double().norm()) < 1e-5


def test_load_refuses_the_wrong_kind_and_a_newer_format(model, tmp_path):
    top = TopSVD(torch.ones(2), torch.ones(4, 2), torch.ones(3, 2), 2, 2, 1, True, {"k": 2})
    path = top.save(tmp_path / "top")
    with pytest.raises(ValueError, match=r"not a saved DetachedJacobian: it holds a 'toolkit.jacobian.TopSVD'"):
        DetachedJacobian.load(path)
    meta = json.loads((path / "result.json").read_text())
    (path / "result.json").write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 7}))
    with pytest.raises(ValueError, match=rf"format version {FORMAT_VERSION + 7}.*reads format version "
                                         rf"{FORMAT_VERSION}: upgrade the toolkit"):
        toolkit.load(path)
    (path / "result.json").write_text(json.dumps({**meta, "kind": "toolkit.future.Thing"}))
    with pytest.raises(ValueError, match=r"unknown result kind 'toolkit.future.Thing'"):
        toolkit.load(path)


def test_old_unchecked_folder_is_refused_with_the_fix(tmp_path):
    """A folder written by the format before checksums (version 1) is named as such, not half-trusted."""
    (tmp_path / "result.json").write_text(json.dumps({"kind": "toolkit.decompose.DecompositionResult", "version": 1,
                                                      "settings": {}}))
    np.savez(tmp_path / "anchors.npz", kl=np.zeros(3))
    with pytest.raises(ValueError, match=r"format version 1 .*re-run the analysis"):
        DecompositionResult.load(tmp_path)


# ----- #15: saves are atomic as a whole; loading verifies that every file belongs ---------------
class Killed(BaseException):
    """Stands for the process being killed: not an Exception, so no handler may swallow it."""


def test_save_interrupted_between_files_keeps_the_previous_result(tmp_path, monkeypatch):
    """#15: a run stopped after writing its first file (anchors.npz) must not leave run 0's settings with run 1's anchors."""
    a, b = decomposition(0), decomposition(1)
    a.save(tmp_path / "run")
    real = Path.write_bytes
    calls = []

    def write_then_die(self, data):
        calls.append(self.name)
        if len(calls) == 2:
            raise Killed
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_then_die)
    with pytest.raises(Killed):
        b.save(tmp_path / "run")
    monkeypatch.undo()
    back = DecompositionResult.load(tmp_path / "run")
    assert back.settings["model_id"] == "run-0"
    np.testing.assert_array_equal(back.anchors["kl"], a.anchors["kl"])   # the anchors of the same run
    assert [p.name for p in tmp_path.iterdir()] == ["run"]                  # no temporary left


def test_killed_save_leaves_the_previous_result_and_its_temporary_is_cleaned(tmp_path):
    """#15: `kill -9` during a save (a real SIGKILL, between two files) leaves the earlier result loadable
    and whole; the dead run's temporary is removed by the next save, a live writer's is kept."""
    decomposition(0).save(tmp_path / "run")
    new = decomposition(1)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the run that gets killed: it stops for good before its second file
        try:
            real, calls = Path.write_bytes, []

            def stop_before_second(self, data):
                calls.append(self)
                if len(calls) == 2:
                    os.write(write, b"1")
                    time.sleep(600)
                return real(self, data)

            Path.write_bytes = stop_before_second
            new.save(tmp_path / "run")
        finally:
            os._exit(1)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1", "the saving process ended before its second file"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
    back = DecompositionResult.load(tmp_path / "run")
    assert back.settings["model_id"] == "run-0"
    np.testing.assert_array_equal(back.anchors["kl"], decomposition(0).anchors["kl"])
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".run.tmp-")]
    assert left, "the killed save should have left its temporary (nothing could remove it)"
    live = tmp_path / (temporary_prefix("run") + "live")
    live.mkdir()                                             # a temporary of this (live) process
    decomposition(2).save(tmp_path / "run")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["run", live.name])               # the dead writer's temporary is gone
    assert DecompositionResult.load(tmp_path / "run").settings["model_id"] == "run-2"


def test_file_from_another_run_is_refused(tmp_path):
    """#15: a folder mixing files of two saves (a copied-in file, a partial sync) is refused, naming the file."""
    decomposition(0).save(tmp_path / "a")
    decomposition(1).save(tmp_path / "b")
    (tmp_path / "a" / "anchors.npz").write_bytes((tmp_path / "b" / "anchors.npz").read_bytes())
    with pytest.raises(ValueError, match=r"a/anchors.npz does not (belong to|match) this result.*re-run"):
        DecompositionResult.load(tmp_path / "a")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
@pytest.mark.parametrize("kind, file", [("decomposition", "result.json"), ("decomposition", "anchors.npz"),
                                        ("decomposition", "anchors.csv"), ("jacobian", "result.json"),
                                        ("jacobian", "tensors.safetensors")])
def test_damaged_files_name_the_file_and_the_fix(model, tmp_path, kind, file, damage):
    """#15: an empty or cut-short result.json, anchors.npz or tensor file (the .pt before) gives one clear
    error naming it (before: raw JSONDecodeError / BadZipFile / EOFError, or nothing for anchors.csv)."""
    result = decomposition(0) if kind == "decomposition" else detached_jacobian(model, IDS)
    path = result.save(tmp_path / "run")
    target = path / file if path.is_dir() else path
    data = target.read_bytes()
    target.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.raises(ValueError) as err:
        type(result).load(path)
    message = str(err.value)
    assert file in message and "re-run" in message and "delete" in message, message


def test_save_refuses_to_replace_a_folder_that_is_not_a_result(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"not a saved result \(it holds notes.txt\)"):
        decomposition(0).save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_report_in_the_folder_keeps_working(tmp_path):
    """The CLI and the demo write report.html into the result's folder after saving: it loads, and a new
    save replaces the old result with its now stale report."""
    from toolkit.report import Section, write_report
    path = decomposition(0).save(tmp_path / "run")
    write_report(path / "report.html", "r", [Section("s", text="run 0")])
    assert DecompositionResult.load(path).settings["model_id"] == "run-0"
    decomposition(1).save(path)
    assert not (path / "report.html").exists()
    assert DecompositionResult.load(path).settings["model_id"] == "run-1"
