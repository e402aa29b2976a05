"""Bad input is refused before any expensive work, with a message naming the problem and the fix.

On the command line: one ``error: ...`` line, exit status 2, no traceback, no model loaded, nothing
written. In Python: the same ``ValueError`` from the library function, before the model is touched
(``object()`` stands in for the model: any use of it would raise ``AttributeError`` instead).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import toolkit
from toolkit.cli import main


class ModelLoaded(Exception):
    """Raised by the stand-in loader: the command got past its checks to loading the model."""


@pytest.fixture
def no_model_load(monkeypatch, tmp_path):
    """Loading a model is the first expensive step; here it raises ModelLoaded instead."""
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise ModelLoaded(args)
    monkeypatch.setattr(toolkit, "load_model", refuse)


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("command", ["collect", "decompose"])
def test_negative_layer_is_refused_before_loading(no_model_load, capsys, command):
    err = _error(capsys, [command, "--layers=-1"])
    assert "--layers '-1'" in err and "negative indices are not accepted" in err and "'0,5,10'" in err


def test_reversed_layer_range_is_refused_before_loading(no_model_load, capsys):
    err = _error(capsys, ["decompose", "--layers", "5-3"])
    assert "the range 5-3 is empty" in err and "3-5" in err
    err = _error(capsys, ["decompose", "--layers", "0,x"])
    assert "'x' is not a non-negative integer or a range" in err


@pytest.mark.parametrize("command", ["collect", "decompose"])
def test_batch_size_zero_is_refused_before_loading(no_model_load, capsys, command):
    err = _error(capsys, [command, "--batch-size", "0"])
    assert "batch_size (--batch-size) must be a positive integer" in err and "got 0; use 1 or more" in err


def test_batch_size_zero_in_python_before_the_model_is_touched():
    from toolkit.collection.from_corpus import collect_from_corpus
    from toolkit.decompose.pipeline import decompose
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) must be a positive integer"):
        decompose(object(), "embedded", batch_size=0)
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) must be a positive integer"):
        collect_from_corpus(object(), "embedded", batch_size=0)


def test_n_test_zero_is_refused_before_loading_or_collecting(no_model_load, capsys):
    err = _error(capsys, ["decompose", "--n-test", "0"])
    assert "n_test (--n-test) must be a positive integer (test texts), got 0" in err
    assert "n_train (--n-train)" in _error(capsys, ["collect", "--n-train", "-3"])
    assert "n_test (--n-test)" in _error(capsys, ["demo", "--n-test", "0"])
    from toolkit.decompose.pipeline import decompose
    with pytest.raises(ValueError, match=r"n_test \(--n-test\) must be a positive integer"):
        decompose(object(), "embedded", n_test=0)


def test_cuda_on_a_cpu_only_torch_is_one_clear_line(monkeypatch, capsys, tmp_path):
    import toolkit.loading as loading
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine's torch, on any machine

    def refuse(*args, **kwargs):
        raise ModelLoaded(args)
    monkeypatch.setattr(loading, "_from_folder_or_hub", refuse)
    err = _error(capsys, ["jacobian", "--device", "cuda", "--out", str(tmp_path / "j")])
    assert "device 'cuda' (--device) is not available" in err and "--device cpu" in err
    with pytest.raises(ValueError, match="device 'cuda:1' .* is not available"):
        toolkit.load_model("smollm2-135m", device="cuda:1")
    assert "unknown device 'gpu'" in _error(capsys, ["collect", "--device", "gpu"])
    assert not (tmp_path / "j").exists()


def test_model_folder_that_is_not_a_model(monkeypatch, capsys, tmp_path):
    import toolkit.loading as loading

    def refuse(*args, **kwargs):
        raise ModelLoaded(args)
    monkeypatch.setattr(loading, "_from_folder_or_hub", refuse)  # the check comes before transformers
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.txt").write_text("not a model")
    err = _error(capsys, ["jacobian", "--model", str(folder), "--out", str(tmp_path / "j")])
    assert f"{folder} is not a model folder: it has no config.json (it holds README.txt)" in err
    assert "save_pretrained" in err and "python -m toolkit models" in err and "sentencepiece" not in err
    with pytest.raises(ValueError, match="is not a model folder"):
        toolkit.load_model(str(folder))


def test_binary_corpus_names_the_file(no_model_load, capsys, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    err = _error(capsys, ["collect", "--corpus", str(path)])
    assert f"{path} looks like a binary file" in err and "give a plain text file" in err


def test_latin1_corpus_names_the_file_and_the_encoding_option(no_model_load, capsys, tmp_path):
    from toolkit.data import load_corpus
    path = tmp_path / "cafe.txt"
    path.write_bytes("Un café au bord de la rivière.\n\nLe pont de pierre traverse la rivière.\n".encode("latin-1"))
    err = _error(capsys, ["decompose", "--corpus", str(path)])
    assert f"{path} is not valid utf-8 text (byte 0xe9 at offset 6)" in err and "--encoding latin-1" in err
    corpus = load_corpus(path, encoding="latin-1")
    assert list(corpus.documents) == ["Un café au bord de la rivière.", "Le pont de pierre traverse la rivière."]
    with pytest.raises(ModelLoaded):  # with the option, the corpus loads and the command goes on
        main(["decompose", "--corpus", str(path), "--encoding", "latin-1"])
    assert "unknown text encoding 'klingon'" in _error(capsys, ["collect", "--corpus", str(path),
                                                               "--encoding", "klingon"])


@pytest.mark.parametrize("flag,name", [("--top-k", "top_k"), ("--n-vectors", "n_vectors")])
def test_zero_top_k_or_n_vectors_refused_before_any_work(no_model_load, capsys, tmp_path, flag, name):
    out = tmp_path / "jacobian"
    err = _error(capsys, ["jacobian", flag, "0", "--out", str(out)])
    assert f"{name} ({flag}) must be a positive integer" in err and "got 0; use 1 or more" in err
    assert not out.exists()  # no half-written output folder
    from toolkit.jacobian.run import run_jacobian
    with pytest.raises(ValueError, match=rf"{name} \({flag}\) must be a positive integer"):
        run_jacobian(object(), "Hi", **{name: 0}, out=out)
    assert not out.exists()


def test_zero_top_k_refused_by_the_analysis_itself():
    from toolkit.jacobian.analysis import analyze_jacobian
    from toolkit.jacobian.result import DetachedJacobian
    r = DetachedJacobian.random(T=2, d_out=4)
    for kwargs in ({"top_k": 0}, {"n_vectors": 0}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            analyze_jacobian(r, W_U=torch.randn(4, 10), W_E=torch.randn(10, 4), decode=str, **kwargs)


def test_error_from_the_installed_command_has_no_traceback():
    out = subprocess.run([sys.executable, "-m", "toolkit", "decompose", "--layers", "5-3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == ["error: --layers '5-3': the range 5-3 is empty; write the lower end first: "
                                       "3-5."], out.stderr
