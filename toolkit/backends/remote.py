"""Remote execution on NDIF through nnsight: the decomposition's model-facing stages as sessions.

``remote`` is ``False`` (run here), ``True`` (NDIF: the API key from ``NDIF_API_KEY`` or
``nnsight.login()``, the host from nnsight's config, ``NDIF_HOST``) or ``"local"`` (nnsight's own
simulation: the request is serialized and run in this process with the user's modules hidden,
as the server would run it). Only the nnsight backend has it.

Two stages run remotely; everything else (fits, statistics) stays local:

* :func:`collect_at_positions`: ``h_b`` at the sampled positions only, never whole sequences.
* :func:`kl_at_anchors`: ``h_b`` replaced at one anchor per batch row, and only the per-anchor
  KL of the next-token distribution (or its mean over later positions) comes back.

Each request is one ``model.session()`` holding one trace per batch of texts, so
``ceil(n_texts / texts_per_request)`` requests serve ``n_texts`` texts. The session bodies use
torch and nnsight only (no toolkit code, no closures): they survive the serialization as
written, which the ``remote="local"`` tests check on SmolLM2.

The detached Jacobian on NDIF
-----------------------------
Not offered remotely; run it locally, sharded (``load_model(..., device_map="auto")``) when the
model outgrows one device. What nnsight 0.8 allows and what the freeze needs:

* Gradients: the server turns ``requires_grad`` off on parameters, but a trace may set it on an
  activation (``emb.requires_grad_()``) and run backward (``with y.backward(): g = x.grad``) or
  ``torch.autograd.grad`` in its body. So vector-Jacobian products are possible remotely.
  (Checked with ``remote="local"`` on a tiny Llama with frozen parameters, nnsight 0.8.1: the
  gradient of the logits with respect to the embedding output comes back; replacing
  ``model.norm.source.torch_rsqrt_0.output`` by its ``.detach()`` changes it, as a freeze should;
  and ``self_attn.source.attention_interface_1.output[1]``, the pattern, is ``None`` under SDPA.)
* The freeze (:mod:`toolkit.jacobian.freeze`) swaps module ``forward`` methods and switches the
  config's ``_attn_implementation`` to eager for the duration of the computation. On NDIF that
  would mutate the deployed model that other users' requests share; a request may only edit the
  values flowing through it. Inside a trace the norm scales (``.source``'s ``rsqrt``) and the
  MLP gates (``act_fn``'s output) can be replaced by detached values, but the attention
  pattern cannot: the server runs SDPA/flash kernels, which never form ``softmax(QK^T)``, so the
  freeze would need a re-implementation of each architecture's attention (GQA, masks, sliding
  windows, soft-caps, sinks) written against the *server's* transformers source, outside the
  rule table whose every entry is checked here (:func:`toolkit.jacobian.freeze.check_supported`
  stops on any module it does not know). A wrong re-implementation would give a silently wrong
  Jacobian whose reconstruction error could not be checked against the local path.
* The matrix-free SVD (:mod:`toolkit.jacobian.matrix_free`) takes ``J v`` by forward-mode AD
  (``torch.func.jvp`` around the model call); a trace runs inside the server's forward and
  cannot wrap it, so ``J v`` would need double backward through the same hand-written attention.

So a user with a model too big for one device runs the Jacobian on a sharded or offloaded local
load, where the freeze and its exactness check are the tested ones.

Example:
    >>> check_remote(False), check_remote("local")
    (False, 'local')
"""
from __future__ import annotations

import os
import time
from typing import Mapping, Sequence

import torch
from torch import Tensor

REMOTE_CHOICES = (False, True, "local")


class RemoteUnavailable(ConnectionError):
    """NDIF cannot be used: no API key, or the service does not answer."""


def check_remote(remote: bool | str | None, timeout: float = 5.0) -> bool | str:
    """``remote`` validated before any work: ``False``, ``"local"`` or ``True`` (key set, host answers).

    Raises :class:`RemoteUnavailable` when ``NDIF_API_KEY`` is unset (and nnsight has no stored
    key) or when NDIF's status page (``{host}/status``) does not answer within ``timeout`` seconds.

    Example:
        >>> check_remote("anywhere")
        Traceback (most recent call last):
        ...
        ValueError: remote='anywhere' is not understood; use False (run here), True (NDIF) or "local" (nnsight's simulation of a remote run).
    """
    if remote is None or remote is False:
        return False
    if remote == "local":
        return "local"
    if remote is not True:
        raise ValueError(f"remote={remote!r} is not understood; use False (run here), True (NDIF) or \"local\" "
                         f"(nnsight's simulation of a remote run).")
    from nnsight import CONFIG
    if not (os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY):
        raise RemoteUnavailable("remote=True runs on NDIF, which needs an API key: set the environment variable "
                                "NDIF_API_KEY (get a key at https://login.ndif.us) or run nnsight.login(); "
                                "or run here with remote=False.")
    host = CONFIG.API.HOST
    start = time.perf_counter()
    try:    # the status page nnsight itself reads (nnsight.ndif.status); a bare TCP connect can meet a proxy
        import httpx
        response = httpx.get(f"{host}/status", timeout=httpx.Timeout(timeout))
        response.raise_for_status()
        response.json()
    except Exception as err:
        raise RemoteUnavailable(f"NDIF at {host} cannot be reached ({type(err).__name__}: {err}; gave up after "
                                f"{time.perf_counter() - start:.1f} s). Check the network, or the host in "
                                f"NDIF_HOST; or run here with remote=False (a sharded load with device_map="
                                f"'auto' for a model bigger than one device).") from err
    return True


def remotable(hf_model, tokenizer, repo_id: str | None = None):
    """An nnsight ``TransformersModel`` around ``hf_model``: the wrapper whose traces can run remotely.

    ``repo_id`` is the hub id NDIF knows the checkpoint by (used by ``remote=True`` only). A model
    without a tokenizer (the tiny test models) gets nnsight's bare ``Remotable`` envoy, which serves
    ``remote="local"`` only.
    """
    import warnings

    from nnsight.modeling.mixins.remotable import Remotable
    from nnsight.modeling.transformers import TransformersModel
    if tokenizer is None:
        if repo_id is not None:
            raise ValueError("a model without a tokenizer cannot run on NDIF; load it by hub id.")
        return Remotable(hf_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
    if repo_id is not None:
        wrapper.repo_id = repo_id
    return wrapper


def remotable_from_hub(hub_id: str):
    """nnsight's ``TransformersModel`` for a hub checkpoint, weights not loaded (meta device): the
    wrapper of a model that lives on NDIF (which holds it in its own dtype). Reads the config and
    tokenizer from the hub (or a folder holding them)."""
    import warnings

    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(hub_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformersModel(hub_id, task="text-generation", tokenizer=tokenizer)


def _envoy(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def collect_at_positions(wrapper, blocks_path: str, tokens: Tensor, positions: Tensor, boundaries: Sequence[int],
                         remote: bool | str, batch_size: int = 8, texts_per_request: int = 64):
    """Yield ``(first text, states [len(boundaries), n * per_text, d] float32)`` per request.

    Row ``i * per_text + j`` of a chunk is text ``first + i`` at ``positions[first + i, j]``; boundary
    ``b`` is the input of block ``b`` (``b < n_layers``) or the last block's output.
    """
    blocks = _envoy(wrapper, blocks_path)
    n_layers = len(blocks)
    bounds = sorted(set(int(b) for b in boundaries))   # nnsight visits modules in execution order
    order = [bounds.index(int(b)) for b in boundaries]
    for first in range(0, tokens.shape[0], texts_per_request):
        chunk_tokens = tokens[first:first + texts_per_request].cpu()
        chunk_positions = positions[first:first + texts_per_request].cpu().long()
        with wrapper.session(remote=remote):
            picked = []
            for start in range(0, chunk_tokens.shape[0], batch_size):
                ids = chunk_tokens[start:start + batch_size]
                pos = chunk_positions[start:start + batch_size]
                with torch.no_grad(), wrapper.trace(ids) as tracer:
                    rows = torch.arange(ids.shape[0])[:, None]
                    states = []
                    for b in bounds:
                        h = blocks[b].input if b < n_layers else blocks[n_layers - 1].output
                        h = h[0] if isinstance(h, tuple) else h
                        states.append(h[rows.to(h.device), pos.to(h.device)].reshape(-1, h.shape[-1]).float().cpu())
                    picked.append(torch.stack(states))
                    tracer.stop()   # nothing above the last boundary is needed
            out = torch.cat(picked, dim=1).save()
        yield first, out[order]


def kl_at_anchors(wrapper, blocks_path: str, tokens: Tensor, positions: Tensor, values: Mapping, boundaries: Mapping,
                  remote: bool | str, next_only: bool = True, max_rows: int = 32, texts_per_request: int = 16):
    """Yield ``(first text, {key: KL [n * per_text] float64})`` per request.

    For each text, anchor ``j`` and key, one batch row runs the text with ``h_b`` at
    ``positions[t, j]`` replaced by ``values[key][t * per_text + j]`` (``b = boundaries[key]``); the
    KL ``KL(P_clean || P_patched)`` is taken at the anchor (``next_only``) or averaged over the
    anchor and every later position, in float64 from the logits. Rows are cut after the last
    position they need. Only the KL values leave the server.
    """
    blocks = _envoy(wrapper, blocks_path)
    n_layers = len(blocks)
    keys = list(values)
    n_texts, per_text = positions.shape
    seq_len = tokens.shape[1]
    for first in range(0, n_texts, texts_per_request):
        last = min(first + texts_per_request, n_texts)
        # rows (text, anchor, key), as flat index tensors; the values travel as one tensor
        text = torch.arange(first, last).repeat_interleave(per_text * len(keys))
        anchor = torch.arange(per_text).repeat_interleave(len(keys)).repeat(last - first)
        key_i = torch.arange(len(keys)).repeat((last - first) * per_text)
        pos = positions[text, anchor].long().cpu()
        bound = torch.tensor([int(boundaries[k]) for k in keys])[key_i]
        stacked = torch.stack([values[k] for k in keys], dim=1)                    # [rows, n_keys, d]
        patch = stacked[text * per_text + anchor, key_i].float().cpu()             # [R, d]
        chunk_tokens = tokens[first:last].cpu()
        chunk_positions = positions[first:last].long().cpu()
        local_text = text - first
        with wrapper.session(remote=remote):
            # P_clean at every anchor (or every position from the first anchor on), kept on the server
            with torch.no_grad(), wrapper.trace(chunk_tokens):
                logits = wrapper.output.logits
                if next_only:
                    rows = torch.arange(chunk_tokens.shape[0])[:, None].to(logits.device)
                    clean = logits[rows, chunk_positions.to(logits.device)].double().log_softmax(-1)
                else:
                    clean = logits.double().log_softmax(-1)
            kls = []
            for s in range(0, text.shape[0], max_rows):
                r_text, r_pos = local_text[s:s + max_rows], pos[s:s + max_rows]
                r_bound, r_anchor = bound[s:s + max_rows], anchor[s:s + max_rows]
                length = int(r_pos.max()) + 1 if next_only else seq_len
                ids = chunk_tokens[r_text, :length]
                with torch.no_grad(), wrapper.trace(ids):
                    n = ids.shape[0]
                    for b in sorted(set(r_bound.tolist())):     # ascending: execution order
                        target = blocks[b].input if b < n_layers else blocks[n_layers - 1].output
                        sel = (r_bound == b).nonzero()[:, 0]
                        vals = patch[s:s + max_rows][sel]
                        target[sel.to(target.device), r_pos[sel].to(target.device)] = vals.to(target.device,
                                                                                             target.dtype)
                    logits = wrapper.output.logits
                    if next_only:
                        lq = logits[torch.arange(n).to(logits.device), r_pos.to(logits.device)].double()
                        lq = lq.log_softmax(-1)
                        lp = clean[r_text.to(clean.device), r_anchor.to(clean.device)]
                        kls.append((lp.exp() * (lp - lq)).sum(-1).cpu())
                    else:
                        lq = logits.double().log_softmax(-1)
                        lp = clean[r_text.to(clean.device)]
                        per_pos = (lp.exp() * (lp - lq)).sum(-1)                          # [n, seq]
                        later = torch.arange(seq_len).to(per_pos.device)[None] >= r_pos.to(per_pos.device)[:, None]
                        kls.append(((per_pos * later).sum(-1) / later.sum(-1)).cpu())
            kl = torch.cat(kls).save()
        kl = kl.reshape(last - first, per_text, len(keys))
        yield first, {k: kl[:, :, i].reshape(-1) for i, k in enumerate(keys)}
