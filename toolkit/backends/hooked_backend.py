"""The HookedTransformer backend: TransformerLens 3's ``HookedTransformer``, with raw numerics.

TransformerLens 3.x (``transformer-lens>=3.9,<4``) ships ``HookedTransformer``; TransformerLens 4
removed it (its ``TransformerBridge`` is :mod:`toolkit.backends.transformer_lens_backend`). Where
it is importable, ``load_model(name, backend="hooked")`` builds one from the HF model the toolkit
loaded, *without* weight processing (no folded LayerNorm, no centred writing weights or
unembedding: they change the residual-stream geometry the decomposition measures), and
``make_backend(hooked_transformer)`` wraps a user's own. Boundaries are the same hook points as
the TransformerBridge backend's (``blocks.{l}.hook_resid_pre``, the last ``blocks.{L-1}.hook_resid_post``).

The ``HookedTransformer`` holds its own copy of the weights in its own modules, so it is what the
detached Jacobian freezes (:attr:`HookedTransformerBackend.frozen_module`; rules in
:mod:`toolkit.jacobian.hooked_rules`). The HF model it was built from stays in ``hf_model`` for the
facts the toolkit reads from HF (config, architecture, the targets driven directly).

Example:
    >>> import toolkit
    >>> model = toolkit.load_model("smollm2-135m", backend="hooked")  # TransformerLens 3 only  # doctest: +SKIP
    >>> model.name, type(model.hooked).__name__                                                   # doctest: +SKIP
    ('hooked', 'HookedTransformer')
"""
from __future__ import annotations

import importlib.metadata
import json
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from toolkit.backends.base import Backend, ModelInfo, Patch
from toolkit.models.placement import input_device

__all__ = ["HookedTransformerBackend", "hooked_transformer_class", "hooked_from_hf", "weight_processing",
           "ProcessedWeightsError", "is_hooked_transformer", "check_matches_hf"]


class ProcessedWeightsError(ValueError):
    """A ``HookedTransformer`` whose weights were processed (folded / centred): refused."""


def _tl_version() -> str:
    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def hooked_transformer_class() -> type:
    """TransformerLens' ``HookedTransformer`` class, or an ImportError naming the fix (TransformerLens 4 has none).

    Example:
        >>> try:
        ...     cls = hooked_transformer_class()
        ... except ImportError as err:
        ...     cls = None; print("transformer-lens==3.9.0" in str(err))     # TransformerLens 4 installed
        ... else:
        ...     print(cls.__name__ == "HookedTransformer")                    # TransformerLens 3 installed
        True
    """
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        HookedTransformer = None
    if HookedTransformer is None or not isinstance(HookedTransformer, type):
        raise ImportError(f"backend='hooked' needs TransformerLens' HookedTransformer, which the installed "
                          f"transformer-lens ({_tl_version()}) does not have: TransformerLens 4 removed it. "
                          f"Install TransformerLens 3 (pip install 'transformer-lens==3.9.0'; the toolkit supports "
                          f"transformer-lens>=3.9,<5), or use backend='tl' (TransformerBridge) or 'nnsight'.")
    return HookedTransformer


def is_hooked_transformer(model) -> bool:
    """Whether ``model`` is a TransformerLens ``HookedTransformer`` (by class name: no import needed).

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> is_hooked_transformer(tiny_hf_model("llama"))
        False
    """
    return any(c.__name__ == "HookedTransformer" and c.__module__.startswith("transformer_lens")
               for c in type(model).__mro__)


def weight_processing(hooked: nn.Module) -> list[str]:
    """What was done to a ``HookedTransformer``'s weights, read from its config and its weights.

    ``fold_ln``: LayerNorm/RMSNorm weights folded into the next linear maps (``cfg.normalization_type``
    ``LNPre``/``RMSPre``, the ``Pre`` modules); ``center_writing_weights``: every matrix writing to the
    residual stream (``W_E``, ``W_pos``, ``W_O``, ``W_out``) has zero mean over ``d_model``;
    ``center_unembed``: ``W_U`` has zero mean over the vocabulary. An empty list: raw numerics.

    Example:
        >>> weight_processing(my_from_pretrained_hooked_transformer)   # TransformerLens 3  # doctest: +SKIP
        ['fold_ln', 'center_writing_weights', 'center_unembed']
    """
    found = []
    norms = {type(m).__name__ for m in hooked.modules()}
    if getattr(hooked.cfg, "normalization_type", None) in ("LNPre", "RMSPre") or norms & {"LayerNormPre", "RMSNormPre"}:
        found.append("fold_ln")

    def centred(w: Tensor, dim: int) -> bool:
        w = w.detach().double()
        return bool(w.mean(dim).abs().max() <= 1e-6 * w.abs().max().clamp_min(1e-30))

    writers = [hooked.W_E] + [p for name, p in hooked.named_parameters() if name.endswith(("W_O", "W_out", "W_pos"))]
    if all(centred(w, -1) for w in writers):
        found.append("center_writing_weights")
    if centred(hooked.W_U, -1):
        found.append("center_unembed")
    return found


_WHAT_PROCESSING_CHANGES = {
    "fold_ln": "the norms' weights (and biases) move into the next linear maps, so h_l and the norms' outputs "
               "are no longer the model's own",
    "center_writing_weights": "the mean over d_model of every update written to the residual stream is removed, "
                              "so h_l differs from the model's by a per-token multiple of the all-ones direction",
    "center_unembed": "every logit is shifted by a per-position constant (probabilities unchanged)",
}


def check_raw(hooked: nn.Module) -> None:
    """Refuse a processed ``HookedTransformer``, saying what each processing step changes and the fix.

    Example:
        >>> check_raw(my_folded_hooked_transformer)                       # doctest: +SKIP
        Traceback (most recent call last):
        ProcessedWeightsError: this HookedTransformer's weights were processed (fold_ln: ...
    """
    steps = weight_processing(hooked)
    if steps:
        what = "; ".join(f"{s}: {_WHAT_PROCESSING_CHANGES[s]}" for s in steps)
        raise ProcessedWeightsError(
            f"this HookedTransformer's weights were processed ({what}). The toolkit measures the model's own "
            f"residual stream, so it refuses processed weights rather than report another model's geometry. "
            f"Build it with raw numerics: HookedTransformer.from_pretrained_no_processing(name, hf_model=..., "
            f"tokenizer=...), or let the toolkit build it: toolkit.load_model(name, backend='hooked').")


def _official_name(name: str | None) -> str | None:
    if not name:
        return None
    from transformer_lens import loading_from_pretrained as loading
    try:
        return loading.get_official_model_name(name)
    except ValueError:
        return None


def hooked_from_hf(hf_model: nn.Module, tokenizer, model_id: str | None = None) -> nn.Module:
    """A ``HookedTransformer`` with raw numerics (nothing folded or centred) from a loaded HF model.

    A name TransformerLens 3 knows (``model_id`` or the hub id in the HF config; e.g. ``google/gemma-3-270m``)
    goes through ``HookedTransformer.from_pretrained_no_processing(name, hf_model=hf_model, tokenizer=...)``.
    Any other model of an architecture TransformerLens converts (a local folder, SmolLM2, Qwen2.5-Coder,
    a tiny test model) gets its ``HookedTransformerConfig`` from its own HF config and its weights through
    the same TransformerLens converters (no download either way). Raises naming the fix where neither works.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> hooked = hooked_from_hf(tiny_hf_model("gpt2"), None)      # TransformerLens 3  # doctest: +SKIP
    """
    HookedTransformer = hooked_transformer_class()
    from transformer_lens import loading_from_pretrained as loading
    dtype = next(p.dtype for p in hf_model.parameters() if p.is_floating_point())
    device = str(input_device(hf_model))
    official = _official_name(model_id) or _official_name(getattr(hf_model.config, "_name_or_path", None))
    try:
        if official is not None:
            try:
                hooked = HookedTransformer.from_pretrained_no_processing(
                    official, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=device)
                return hooked.eval()
            except OSError:
                pass  # its hub config is not cached here (offline): build from the HF model's own config below
        with tempfile.TemporaryDirectory(prefix="toolkit-hooked-") as folder:  # a neutral name: TL reads names
            _save_config(hf_model, folder)
            cfg = loading.get_pretrained_model_config(folder, hf_cfg=hf_model.config.to_dict(), dtype=dtype,
                                                      device=device)
            state = loading.get_pretrained_state_dict(folder, cfg, hf_model, dtype=dtype)
        cfg.model_name = model_id or type(hf_model).__name__    # not the temporary folder's name
        hooked = HookedTransformer(cfg, tokenizer, move_to_device=False)
        hooked.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                           fold_value_biases=False, refactor_factored_attn_matrices=False)
    except (NotImplementedError, KeyError, AttributeError, TypeError) as err:
        raise ValueError(f"TransformerLens {_tl_version()} cannot build a HookedTransformer for "
                         f"{type(hf_model).__name__} ({err}); use backend='nnsight' (every family) or "
                         f"backend='tl'.") from err
    return hooked.to(device).eval()


def _save_config(hf_model: nn.Module, folder: str) -> None:
    """``config.json`` as TransformerLens 3 reads it: ``architectures`` names the class (TransformerLens
    picks its converter by it; a config converted from GGUF has none), and GPT-2's ``n_ctx`` (read by
    TransformerLens, no longer kept by transformers 5: it is ``n_positions``)."""
    hf_model.config.save_pretrained(folder)
    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    if not data.get("architectures"):
        data["architectures"] = [type(hf_model).__name__]
    if data.get("model_type") == "gpt2" and "n_ctx" not in data:
        data["n_ctx"] = data["n_positions"]
    path.write_text(json.dumps(data))


def check_matches_hf(hooked: nn.Module, hf_model: nn.Module, vocab_size: int, tol: float = 1e-3) -> float:
    """Refuse a ``HookedTransformer`` whose next-token log-probabilities differ from ``hf_model``'s.

    Both must be the same network (the HF model supplies the facts the toolkit reads from HF).
    Returns the largest absolute log-probability difference on a short probe.

    Example:
        >>> check_matches_hf(hooked, hf, hf.config.vocab_size) < 1e-3             # doctest: +SKIP
        True
    """
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, 6), generator=generator)
    with torch.no_grad():
        ours = hooked(ids.to(_param_device(hooked)), attention_mask=torch.ones_like(ids).to(_param_device(hooked)))
        theirs = hf_model(ids.to(input_device(hf_model))).logits
    diff = float((ours.double().log_softmax(-1).cpu() - theirs.double().log_softmax(-1).cpu()).abs().max())
    if not diff <= tol:
        raise ValueError(f"the HookedTransformer and the HF model given with it are different networks "
                         f"(log-probabilities differ by up to {diff:.3g} on a probe); pass hf_model= the HF model "
                         f"it was built from.")
    return diff


def _param_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class HookedTransformerBackend(Backend):
    """A ``HookedTransformer`` (TransformerLens 3) seen through the :class:`Backend` interface.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = toolkit.make_backend(tiny_hf_model("gpt2"), tokenizer, backend="hooked")  # doctest: +SKIP
    """

    name = "hooked"
    kv_cache_support = False  # HookedTransformer keeps its own cache type, not a transformers DynamicCache

    def __init__(self, hf_model: nn.Module, tokenizer, info: ModelInfo, hooked: nn.Module):
        super().__init__(hf_model, tokenizer, info)
        check_raw(hooked)
        self.hooked = hooked

    # ----- where things run ------------------------------------------------------------------
    @property
    def frozen_module(self) -> nn.Module:
        """The ``HookedTransformer``: its own modules hold the weights :meth:`target_function` runs."""
        return self.hooked

    @property
    def device(self) -> torch.device:
        return self.hooked.embed.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hooked.embed.W_E.dtype

    def hook_name(self, layer: int) -> str:
        """The hook point carrying boundary ``layer``."""
        self.check_boundary(layer)
        return f"blocks.{layer - 1}.hook_resid_post" if layer == self.n_layers else f"blocks.{layer}.hook_resid_pre"

    def _stop_at(self, layers: Sequence[int]) -> int:
        """``stop_at_layer`` that runs just the blocks whose hooks carry ``layers`` (no final norm, no unembed)."""
        return min(max(layers) + 1, self.n_layers)

    def _mask(self, ids: Tensor) -> Tensor:
        # explicit: with a left-padding tokenizer HookedTransformer would mask every pad-token id
        return torch.ones_like(ids)

    @staticmethod
    def _no_cache(what: str, given) -> None:
        if given:
            raise ValueError(f"the hooked backend (HookedTransformer) does not take {what}: it keeps no "
                             f"transformers cache; run without it, or use backend='nnsight' or 'tl'.")

    # ----- the interface -------------------------------------------------------------------
    def hidden_states(self, input_ids, layers: Sequence[int] | None = None, kv_cache=None) -> Tensor:
        self._no_cache("kv_cache", kv_cache is not None)
        ids = self.check_tokens(input_ids)
        layers = list(range(self.n_layers + 1)) if layers is None else [self.check_boundary(l) for l in layers]
        names = {self.hook_name(l) for l in layers}
        with torch.no_grad():
            _, cache = self.hooked.run_with_cache(ids, names_filter=lambda n: n in names,
                                                  stop_at_layer=self._stop_at(layers), attention_mask=self._mask(ids))
        return torch.stack([cache[self.hook_name(l)].to(self.device) for l in layers])

    def run_with_patches(self, input_ids, patches: Sequence[Patch], **forward_kwargs) -> Tensor:
        self._no_cache(", ".join(forward_kwargs), forward_kwargs)
        ids = self.check_tokens(input_ids)
        hooks = []
        for patch in patches:
            self.check_boundary(patch.layer)
            hooks.append((self.hook_name(patch.layer), lambda resid, hook, patch=patch: patch.applied_to(resid)))
        with torch.no_grad():
            return self.hooked.run_with_hooks(ids, fwd_hooks=hooks, attention_mask=self._mask(ids))

    def logits(self, input_ids) -> Tensor:
        ids = self.check_tokens(input_ids)
        with torch.no_grad():
            return self.hooked(ids, attention_mask=self._mask(ids))

    def target_function(self, input_ids: Tensor, kind: str, layer: int | None,
                        position: int = -1) -> Callable[[Tensor], Tensor] | None:
        """``f(x) -> y`` through ``run_with_hooks``: ``blocks.0.hook_resid_pre`` returns ``x``; the boundary's
        hook is read (``"output"``: the last boundary, through the model's own ``ln_final``), and the
        blocks above it do not run."""
        if kind not in ("output", "resid"):
            return None
        ids = self.check_tokens(input_ids)
        boundary = self.n_layers if kind == "output" else layer
        if not boundary:  # boundary 0: y is x itself
            return lambda x: x[..., position, :]
        read_hook = self.hook_name(boundary)
        norm = self.hooked.ln_final if kind == "output" else None

        def f(x: Tensor) -> Tensor:  # x: [T, d], or a batch [B, T, d] (batched replays)
            xs = x if x.ndim == 3 else x[None]
            tokens = ids.expand(xs.shape[0], -1)
            captured: list[Tensor] = []

            def put_x(resid: Tensor, hook) -> Tensor:
                return xs.to(resid.device, resid.dtype)

            def grab(resid: Tensor, hook) -> None:
                captured.append(resid)

            self.hooked.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", put_x), (read_hook, grab)],
                                       stop_at_layer=self._stop_at([boundary]), attention_mask=self._mask(tokens))
            y = captured[-1][:, position]
            if norm is not None:
                y = norm(y[:, None])[:, 0]
            return y if x.ndim == 3 else y[0]
        return f

    # ----- embedding, final norm, unembedding: the HookedTransformer's own ---------------------
    @property
    def W_E(self) -> Tensor:
        return self.hooked.W_E

    @property
    def W_U(self) -> Tensor:
        return self.hooked.W_U

    @property
    def final_norm(self) -> nn.Module:
        return self.hooked.ln_final

    @property
    def blocks(self) -> nn.ModuleList:
        return self.hooked.blocks

    def unembed_normed(self, normed: Tensor) -> Tensor:
        out = self.hooked.unembed(normed)
        softcap = getattr(self.hooked.cfg, "output_logits_soft_cap", None)
        if softcap and softcap > 0:
            out = torch.tanh(out / softcap) * softcap
        return out
