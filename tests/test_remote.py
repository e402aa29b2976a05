"""Remote execution through nnsight: the decomposition's collection and interventions as sessions.

``remote="local"`` is nnsight's own simulation of a remote run: each session is serialized as for
NDIF and run in this process with the user's modules (``toolkit`` among them) hidden, so a trace
that leans on local code fails here as it would on the server.
"""
from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch

import toolkit
from toolkit.backends import make_backend
from toolkit.backends.remote import RemoteUnavailable, check_remote, remotable_from_hub
from toolkit.collection.from_corpus import collect_from_corpus
from toolkit.collection.pairs import collect_hidden_states, model_fingerprint
from toolkit.decompose.interventions import patched_kl
from toolkit.decompose.pipeline import decompose
from toolkit.models.tiny import tiny_hf_model

# layer 29's pair ends at boundary 30, the last block's output (patched there, not at a block input)
SMALL = dict(layers=[4, 29], n_train=8, n_test=2, seq_len=16, per_text=3, k=12, rank=8, mlp_steps=20, n_boot=50,
             progress=False)


@pytest.fixture
def no_ndif(monkeypatch):
    """NDIF settings under the test's control (the config is read once, at import)."""
    from nnsight import CONFIG
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(CONFIG.API, "HOST", CONFIG.API.HOST)
    return CONFIG


def test_decompose_remote_local_matches_local_run(smollm2_nnsight, tmp_path, monkeypatch):
    """Same pairs and KL values through serialized remote requests as through the local fast path
    (the README's "Bigger models: NDIF" example)."""
    remote = toolkit.load_model("smollm2-135m", remote="local")   # before TOOLKIT_CACHE moves (weights live there)
    assert remote.remote == "local" and remote.name == "nnsight"
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    local = decompose(smollm2_nnsight, **SMALL)
    result = decompose(remote, **SMALL)
    # 8 train + 2 test texts: one collection request each, one intervention request
    assert remote.requests == 3
    # the pairs, reopened from the two stores (no model runs: both are cached)
    kw = dict(n_train=SMALL["n_train"], n_test=SMALL["n_test"], seq_len=SMALL["seq_len"],
              per_text=SMALL["per_text"], layers=SMALL["layers"], progress=False,
              split="document", min_position=1)          # decompose's defaults: the same texts, cached
    for ours, theirs in zip(collect_from_corpus(smollm2_nnsight, **kw), collect_from_corpus(remote, **kw)):
        assert ours.directory != theirs.directory                # remote states are stored apart
        for layer in SMALL["layers"]:
            for x, y in zip(ours.pairs(layer), theirs.pairs(layer)):
                # relative to the states' scale: the shared fixture may run the eager kernel (bridged), remote SDPA
                assert x.shape == y.shape and (x - y).abs().max() < 1e-5 * y.abs().max().clamp_min(1)
    assert remote.requests == 3
    a, b = local.anchors, result.anchors
    assert result.settings["remote"] == "local" and local.settings["remote"] is False
    assert np.array_equal(a["token_id"], b["token_id"]) and np.array_equal(a["position"], b["position"])
    assert np.abs(a["rel_err"] - b["rel_err"]).max() < 1e-5
    for col in ("kl", "kl_random", "kl_mlp"):
        diff = np.abs(a[col] - b[col])
        assert a[col].max() > 1e-3                     # real, nonzero KLs
        # measured: max abs diff 2.3e-5, max relative 7.3e-5 (fast path's float32 KL vs float64 from logits)
        assert (diff <= 1e-6 + 2e-4 * np.abs(a[col])).all(), (col, diff.max())


def test_requests_per_texts_tiny(monkeypatch):
    """ceil(n / texts_per_request) requests for n texts; "later" KL and the last boundary too.
    The requests carry neither toolkit code (NDIF does not have it) nor weights."""
    from nnsight.schema.request import RequestModel
    serialize, payloads = RequestModel.serialize.__func__, []

    def recording(cls, tracer, compress=False):            # the real serializer, its output kept
        payloads.append(serialize(cls, tracer, compress))
        return payloads[-1]

    monkeypatch.setattr(RequestModel, "serialize", classmethod(recording))
    model = make_backend(tiny_hf_model("llama"), backend="nnsight")
    remote = model.with_remote("local")
    tokens = torch.randint(0, 500, (7, 12))
    positions = torch.tensor([[2, 7, 10]] * 7)
    chunks = list(remote.remote_states(tokens, positions, [0, 1, 2], texts_per_request=3))
    assert [first for first, _ in chunks] == [0, 3, 6] and remote.requests == 3
    hs = model.hidden_states(tokens)
    rows = torch.arange(7)[:, None]
    full = torch.cat([s for _, s in chunks], dim=1)
    assert torch.allclose(full, hs[:, rows, positions].reshape(3, -1, model.d_model), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    values = {("x", 1): torch.randn(21, model.d_model, generator=g), ("x", 2): torch.randn(21, model.d_model, generator=g)}
    for kl_positions in ("next", "later"):
        ref = patched_kl(model, tokens, positions, values, kl_positions=kl_positions, progress=False)
        got = patched_kl(remote, tokens, positions, values, kl_positions=kl_positions, progress=False, max_rows=5)
        for key in values:
            assert ref[key].min() > 1e-4 and torch.allclose(got[key], ref[key], rtol=1e-5, atol=1e-8)
    assert remote.requests == 3 + 2                  # 7 texts, 16 a request: one KL request per call
    # no toolkit module is referenced (only the source file's name travels, for tracebacks)
    assert len(payloads) == 5 and all(b"toolkit." not in p and len(p) < 200_000 for p in payloads)


def test_no_key_is_a_clear_error_before_any_work(no_ndif, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(RemoteUnavailable, match="NDIF_API_KEY"):
        toolkit.load_model("smollm2-135m", remote=True)
    with pytest.raises(RemoteUnavailable, match="NDIF_API_KEY"):
        decompose(make_backend(tiny_hf_model("llama"), backend="nnsight"), remote=True, progress=False)
    assert time.perf_counter() - start < 5 and not any(tmp_path.iterdir())     # nothing loaded or collected


def test_cli_remote_without_key_is_one_line(no_ndif, capsys):
    from toolkit.cli import main
    start = time.perf_counter()
    assert main(["decompose", "--remote", "--n-train", "16", "--n-test", "2"]) == 2   # 128 anchors >= k
    err = capsys.readouterr().err
    assert err.startswith("error: remote=True runs on NDIF") and "NDIF_API_KEY" in err
    assert time.perf_counter() - start < 5


def test_unreachable_service_is_a_clear_fast_error(no_ndif, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "not-a-key")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()                                        # nothing listens there now
    no_ndif.API.HOST = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    with pytest.raises(RemoteUnavailable, match=f"127.0.0.1:{port} cannot be reached"):
        toolkit.load_model("smollm2-135m", remote=True)
    no_ndif.API.HOST = "https://ndif.invalid"            # a name that never resolves
    with pytest.raises(RemoteUnavailable, match="ndif.invalid cannot be reached.*NDIF_HOST"):
        check_remote(True, timeout=1.0)
    assert time.perf_counter() - start < 5


def _status_server():
    """A local HTTP server answering ``/status`` with an empty deployment list."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Status(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"deployments": {}}')

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Status)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_remote_model_without_local_weights(no_ndif, monkeypatch):
    """remote=True wraps a meta-device nnsight model: no weights here, a fingerprint from its config."""
    from toolkit.models.weights import SMOLLM2, converted_folder
    monkeypatch.setenv("NDIF_API_KEY", "not-a-key")
    server = _status_server()                            # answers the status check, as NDIF does
    no_ndif.API.HOST = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        model = make_backend(remotable_from_hub(str(converted_folder(SMOLLM2))), model_id="smollm2-135m", remote=True)
    finally:
        server.shutdown()
    assert model.remote is True and model.name == "nnsight" and model.n_layers == 30
    assert model.W_E.is_meta and len(model_fingerprint(model)) == 16 and model.requests == 0


def test_other_backends_refuse_remote():
    with pytest.raises(ValueError, match="runs through nnsight.*backend='nnsight'"):
        make_backend(tiny_hf_model("gpt2"), backend="transformer_lens", remote="local")
    with pytest.raises(ValueError, match="not understood"):
        make_backend(tiny_hf_model("llama"), backend="nnsight", remote="ndif")
