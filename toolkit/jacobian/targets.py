"""What a Jacobian is *of* and *with respect to*: targets, their inputs, and ``f: x -> y``.

Depth vocabulary (the same in every function, the CLI, results and figures)
---------------------------------------------------------------------------
A model with ``L`` blocks has **boundaries** ``h_0 .. h_L`` and **blocks** ``0 .. L-1``: ``h_0`` is
the input of block 0 (the embeddings), ``h_l`` the output of block ``l-1`` (= the input of block
``l``), ``h_L`` the last block's output before the final norm. Block ``l`` transforms ``h_l``
into ``h_{l+1}``. A target names the state ``y`` and, with it, the input ``x``:

========================  ========================================================  ==========
spelling                  ``y``                                                     ``x``
========================  ========================================================  ==========
``"output"``              the final-norm state (the paper's output embedding)        ``h_0``
``"resid.l"``             the residual stream ``h_l`` at boundary ``l`` (0..L)         ``h_0``
``"attn.l"``              block ``l``'s attention output, as added to the residual   ``h_0``
                          stream (Gemma 2/3, OLMo 2: after their post-norm)
``"mlp.l"``               block ``l``'s MLP output, as added to the residual stream   ``h_0``
                          (Gemma 2/3, OLMo 2: after its post-feedforward norm)
``"block.l"``             ``h_{l+1}``: block ``l``'s own transform ``h_l -> h_{l+1}``,  ``h_l``
                          cross-token attention included: ``J_i = dh_{l+1}[pos]/dh_l[i]``
========================  ========================================================  ==========

Also accepted, and normalised to the names above: a plain int ``l`` (= ``"resid.l"``), tuples
``("attn", 5)``, the TransformerLens hook names that carry the same tensor
(``"blocks.l.hook_resid_pre"`` = ``"resid.l"``, ``"blocks.l.hook_resid_post"`` = ``"resid.{l+1}"``,
``"blocks.l.hook_attn_out"``, ``"blocks.l.hook_mlp_out"``, ``"ln_final.hook_normalized"`` = ``"output"``),
and the older ``"block.l"`` for ``"block.l"``. Mamba blocks have no attention or MLP sublayer:
only ``"output"``, ``"resid.l"`` and ``"block.l"`` exist there.

``f`` runs the base model and reads ``y`` with a forward hook, stopping the forward pass as
soon as ``y`` is read (later blocks are not run). For ``"block.l"`` the blocks before ``l`` run
on the prompt and block ``l``'s input is *replaced* by ``x``, so masks, rotary tables and
every other per-call argument are the model's own for whichever attention kernel is active.

Example:
    >>> import torch
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> model = tiny_hf_model("llama")
    >>> [resolve_target(model, t).name for t in (("mlp", 1), 2, "blocks.1.hook_resid_post", "layer.0")]
    ['mlp.1', 'resid.2', 'resid.2', 'block.0']
    >>> ids = torch.tensor([1, 2, 3])
    >>> x = target_input(model, ids, "block.1")            # h_1: the input of block 1
    >>> f = state_function(model, "block.1", input_ids=ids, position=None)
    >>> f(x).shape                                         # h_2 at every position
    torch.Size([3, 64])
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import torch
from torch import Tensor, nn

from toolkit.jacobian.guards import toolkit_hook
from toolkit.models.architectures import spec_for
from toolkit.models.placement import input_device

Target = Union[int, str, tuple]
Kind = Literal["output", "resid", "attn", "mlp", "block"]

# Per family, the block's child whose output is the sublayer's contribution to the residual stream.
SUBLAYER_OUTPUTS: dict[str, dict[str, str]] = {
    "llama": {"attn": "self_attn", "mlp": "mlp"},
    "qwen3": {"attn": "self_attn", "mlp": "mlp"},
    "qwen2": {"attn": "self_attn", "mlp": "mlp"},
    "gemma3": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    "gpt2": {"attn": "attn", "mlp": "mlp"},
    "gpt_neox": {"attn": "post_attention_dropout", "mlp": "post_mlp_dropout"},
    "mamba": {},
    "gemma2": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    "olmo2": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    **{f: {"attn": "self_attn", "mlp": "mlp"} for f in ("mistral", "ministral", "ministral3", "smollm3", "gemma")},
    "phi3": {"attn": "resid_attn_dropout", "mlp": "resid_mlp_dropout"},
    "gptj": {"attn": "attn", "mlp": "mlp"},  # parallel block: h + attn(ln_1(h)) + mlp(ln_1(h))
    "gpt_neo": {"attn": "attn", "mlp": "mlp"},
}
COMPONENT_KINDS = ("attn", "mlp", "block")
# Older spellings of a kind, accepted and normalised.
KIND_ALIASES = {"layer": "block", "boundary": "resid"}
# TransformerLens hook names that carry one of our targets: (kind, offset added to the block index).
_TL_HOOKS = {"hook_resid_pre": ("resid", 0), "hook_resid_post": ("resid", 1), "hook_attn_out": ("attn", 0),
             "hook_mlp_out": ("mlp", 0)}
_TL_OUTPUT = ("ln_final.hook_normalized", "ln_final.hook_out")
# Learned absolute position embeddings, attribute of the base model: part of x = h_0, not of the map.
POSITION_EMBEDDINGS = {"gpt2": "wpe", "gpt_neo": "wpe"}


@dataclass(frozen=True)
class TargetSpec:
    """A validated target: ``kind`` and ``layer`` (boundary or block index; ``None`` for the output)."""

    kind: Kind
    layer: Optional[int] = None

    @property
    def name(self) -> str:
        """The canonical spelling: ``"output"``, ``"resid.l"``, ``"attn.l"``, ``"mlp.l"`` or ``"block.l"``."""
        return "output" if self.kind == "output" else f"{self.kind}.{self.layer}"

    @property
    def input_name(self) -> str:
        """What ``x`` is: ``"h_0"``, or ``"h_l"`` for a block's own transform."""
        return f"h_{self.layer}" if self.kind == "block" else "h_0"


def _valid_choices(n_layers: int, family: str) -> str:
    kinds = [k for k in COMPONENT_KINDS if k == "block" or k in SUBLAYER_OUTPUTS.get(family, {})]
    comps = ", ".join(f"'{k}.l'" for k in kinds)
    return (f"'output', 'resid.l' with boundary l in 0..{n_layers} (or the int l), or {comps} with block l in "
            f"0..{n_layers - 1} (TransformerLens hook names such as 'blocks.{n_layers // 2}.hook_resid_post' "
            f"work too)")


def _split(target: Target) -> tuple:
    """``(kind, index)`` from any accepted spelling, before validation (``(None, None)`` if not understood)."""
    if isinstance(target, tuple) and len(target) == 2:
        kind, layer = target
        return KIND_ALIASES.get(kind, kind), layer
    if not isinstance(target, str):
        return None, None
    name = target.strip()
    if name.lower() in ("output", *_TL_OUTPUT):
        return "output", None
    hook = re.fullmatch(r"blocks\.(\d+)\.(hook_\w+)", name)
    if hook is not None and hook.group(2) in _TL_HOOKS:
        kind, offset = _TL_HOOKS[hook.group(2)]
        return kind, int(hook.group(1)) + offset
    kind, dot, index = name.partition(".")
    if not dot:
        return None, None
    kind = KIND_ALIASES.get(kind.lower(), kind.lower())
    return kind, int(index) if index.lstrip("-").isdigit() else index


def resolve_target(hf_model: nn.Module, target: Target) -> TargetSpec:
    """Validate ``target`` for this model and return its :class:`TargetSpec`; errors name the valid choices.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("gpt2")
        >>> [resolve_target(model, t).name for t in ("output", 2, "attn.0", ("block", 1), "blocks.0.hook_mlp_out")]
        ['output', 'resid.2', 'attn.0', 'block.1', 'mlp.0']
        >>> resolve_target(tiny_hf_model("mamba"), "attn.0")
        Traceback (most recent call last):
        ...
        ValueError: target 'attn.0': mamba blocks have no attention sublayer; valid targets: 'output', 'resid.l' with boundary l in 0..2 (or the int l), or 'block.l' with block l in 0..1 (TransformerLens hook names such as 'blocks.1.hook_resid_post' work too)
    """
    spec = spec_for(hf_model)
    n_layers = len(spec.blocks(hf_model))
    choices = _valid_choices(n_layers, spec.family)
    if isinstance(target, TargetSpec):
        return target
    if isinstance(target, bool):
        raise ValueError(f"target {target!r} is not understood; valid targets: {choices}.")
    kind, layer = ("resid", target) if isinstance(target, int) else _split(target)
    if kind == "output":
        return TargetSpec("output")
    if kind == "resid" and isinstance(layer, int):
        if 0 <= layer <= n_layers:
            return TargetSpec("resid", layer)
        raise ValueError(f"target {target!r} is out of range: not a layer boundary 0..{n_layers} of this "
                         f"{n_layers}-layer model; valid targets: {choices}.")
    if kind not in COMPONENT_KINDS or not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"target {target!r} is not understood; valid targets: {choices}.")
    if kind != "block" and kind not in SUBLAYER_OUTPUTS.get(spec.family, {}):
        what = "attention" if kind == "attn" else "MLP"
        raise ValueError(f"target {target!r}: {spec.family} blocks have no {what} sublayer; valid targets: {choices}")
    if not 0 <= layer < n_layers:
        raise ValueError(f"target {target!r}: block {layer} is out of range (0..{n_layers - 1}); "
                         f"valid targets: {choices}.")
    return TargetSpec(kind, layer)


def sublayer_module(hf_model: nn.Module, kind: str, layer: int) -> nn.Module:
    """The module of block ``layer`` whose output is its ``kind`` (``"attn"``/``"mlp"``) contribution.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> type(sublayer_module(tiny_hf_model("gemma3"), "attn", 0)).__name__
        'Gemma3RMSNorm'
    """
    spec = spec_for(hf_model)
    attr = SUBLAYER_OUTPUTS.get(spec.family, {}).get(kind)
    if attr is None:
        raise ValueError(f"{spec.family} blocks have no {kind!r} sublayer "
                         f"(known: {sorted(SUBLAYER_OUTPUTS.get(spec.family, {}))}).")
    return getattr(spec.blocks(hf_model)[layer], attr)


def read_module(hf_model: nn.Module, target: Target) -> nn.Module:
    """The module whose output is the target state (final norm, block, or sublayer).

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("llama")
        >>> read_module(model, 2) is model.model.layers[1]
        True
    """
    t = resolve_target(hf_model, target)
    spec = spec_for(hf_model)
    if t.kind == "output":
        return spec.final_norm(hf_model)
    if t.kind == "resid":
        if t.layer == 0:
            raise ValueError("boundary 0 is the input h_0 itself: no module outputs it.")
        return spec.blocks(hf_model)[t.layer - 1]
    if t.kind == "block":
        return spec.blocks(hf_model)[t.layer]
    return sublayer_module(hf_model, t.kind, t.layer)


def _first(out) -> Tensor:
    """The hidden-state tensor of a module output (tensor, tuple or ``ModelOutput``)."""
    return out if isinstance(out, Tensor) else out[0]


class _Read(Exception):
    """Raised by the reading hook once every wanted state is captured: the rest is not run."""


def _as_ids(input_ids: Tensor) -> Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"input_ids must be one non-empty sequence ([T] or [1, T]), got shape {tuple(ids.shape)}.")
    return ids.long()


def run_reading(hf_model: nn.Module, modules: list[nn.Module], *, inputs_embeds: Tensor | None = None,
                input_ids: Tensor | None = None, replace_input_of: nn.Module | None = None,
                replacement: Tensor | None = None) -> list[Tensor]:
    """Run the base model once and return the outputs of ``modules`` (``[1, T, d]`` each), in order.

    The pass stops right after the last of them has run. ``inputs_embeds`` is ``h_0`` (GPT-2's
    learned positions inside it: the model's own are zeroed for the call); else ``input_ids``
    are embedded as usual. ``replace_input_of`` (a block) gets ``replacement`` as its hidden
    states instead of what the blocks before it computed.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("qwen3")
        >>> (h1,) = run_reading(model, [model.model.layers[0]], input_ids=torch.tensor([1, 2]))
        >>> h1.shape
        torch.Size([1, 2, 64])
    """
    spec = spec_for(hf_model)
    base = spec.base(hf_model)
    wanted = {id(m): i for i, m in enumerate(modules)}
    if len(wanted) != len(modules):
        raise ValueError("run_reading: each module may be read once.")
    captured: dict[int, Tensor] = {}

    @toolkit_hook
    def grab(module, _args, out):
        captured[wanted[id(module)]] = _first(out)
        if len(captured) == len(modules):
            raise _Read

    handles = [m.register_forward_hook(grab) for m in modules]
    if replace_input_of is not None:
        @toolkit_hook
        def put(_module, args, kwargs):
            if args:
                return (replacement,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replacement}
        handles.append(replace_input_of.register_forward_pre_hook(put, with_kwargs=True))
    pos_attr = POSITION_EMBEDDINGS.get(spec.family)
    if inputs_embeds is not None and pos_attr is not None:  # x already holds the learned positions
        zero = toolkit_hook(lambda _m, _a, out: torch.zeros_like(out))
        handles.append(getattr(base, pos_attr).register_forward_hook(zero))
    try:
        if inputs_embeds is not None:
            base(inputs_embeds=inputs_embeds, use_cache=False)
        else:
            base(input_ids=_as_ids(input_ids)[None].to(input_device(hf_model)), use_cache=False)
    except _Read:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(modules)) if i not in captured]
    if missing:
        raise RuntimeError(f"the forward pass never ran module(s) {missing} of the {len(modules)} to read; "
                           f"are they part of this model's base forward?")
    return [captured[i] for i in range(len(modules))]


def input_embeddings(hf_model: nn.Module, input_ids: Tensor) -> Tensor:
    """``h_0`` for one sequence: ``[T, d_model]``, detached (the first block's input).

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> input_embeddings(tiny_hf_model("gpt2"), torch.tensor([1, 2])).shape
        torch.Size([2, 64])
    """
    spec = spec_for(hf_model)
    ids = _as_ids(input_ids).to(input_device(hf_model))
    with torch.no_grad():
        x = hf_model.get_input_embeddings()(ids)  # Gemma's scaled embedding applies its sqrt(d) here
        pos_attr = POSITION_EMBEDDINGS.get(spec.family)
        if pos_attr is not None:
            x = x + getattr(spec.base(hf_model), pos_attr)(torch.arange(ids.numel(), device=ids.device))
    return x.detach()


def target_input(hf_model: nn.Module, input_ids: Tensor, target: Target = "output") -> Tensor:
    """The ``x`` of a target for one sequence, ``[T, d]``, detached: ``h_0``, or ``h_l`` for ``"block.l"``.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("gpt2")
        >>> ids = torch.tensor([5, 6, 7])
        >>> torch.equal(target_input(model, ids, "mlp.1"), input_embeddings(model, ids))
        True
    """
    t = resolve_target(hf_model, target)
    if t.kind != "block" or t.layer == 0:
        return input_embeddings(hf_model, input_ids)
    with torch.no_grad():  # h_l is the output of block l - 1
        (h,) = run_reading(hf_model, [spec_for(hf_model).blocks(hf_model)[t.layer - 1]], input_ids=input_ids)
    return h[0].detach()


def state_function(hf_model: nn.Module, target: Target = "output", *, input_ids: Tensor | None = None,
                   position: int | None = -1) -> Callable[[Tensor], Tensor]:
    """``f(x) -> y`` for a target: ``x`` ``[T, d]`` (see :func:`target_input`), ``y`` ``[d]`` at
    ``position`` or ``[T, d]`` when ``position`` is ``None``. A batch ``x`` ``[B, T, d]`` runs as
    ``B`` sequences and gives ``[B, ...]``.

    ``input_ids`` is needed for ``"block.l"`` (the blocks before ``l`` run on them). Frozen or
    not depends on whether ``f`` is called inside :func:`toolkit.jacobian.freeze.detached`.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("gpt_neox")
        >>> ids = torch.tensor([1, 2, 3])
        >>> f = state_function(model, "attn.1")
        >>> f(input_embeddings(model, ids)).shape
        torch.Size([64])
    """
    t = resolve_target(hf_model, target)
    if t.kind == "block" and input_ids is None:
        raise ValueError(f"target {t.name!r} (a layer's own transform) needs input_ids: the blocks before "
                         f"{t.layer} run on the prompt; pass input_ids=...")
    ids = None if input_ids is None else _as_ids(input_ids)
    read = None if t.kind == "resid" and t.layer == 0 else read_module(hf_model, t)
    block = spec_for(hf_model).blocks(hf_model)[t.layer] if t.kind == "block" else None

    def pick(h: Tensor) -> Tensor:  # h: [B, T, d]
        return h if position is None else h[:, position]

    def f(x: Tensor) -> Tensor:
        if x.ndim not in (2, 3):
            raise ValueError(f"x must be [T, d_model] (or a batch [B, T, d_model]), got shape {tuple(x.shape)}.")
        xb = x if x.ndim == 3 else x[None]
        if read is None:  # boundary 0: y is x itself
            h = xb
        elif block is not None:
            if xb.shape[1] != ids.numel():
                raise ValueError(f"x has {xb.shape[1]} positions but input_ids has {ids.numel()}.")
            (h,) = run_reading(hf_model, [read], input_ids=ids, replace_input_of=block, replacement=xb)
        else:
            (h,) = run_reading(hf_model, [read], inputs_embeds=xb)
        y = pick(h)
        return y if x.ndim == 3 else y[0]
    return f


def states_function(hf_model: nn.Module, targets: list[Target], *,
                    position: int = -1) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """``f(h_0) -> (y_1, ..., y_n)``: several ``h_0``-input targets at ``position`` from one forward pass.

    The pass stops after the deepest target. ``"block.l"`` targets (input ``h_l``) are refused.

    Example:
        >>> import torch
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("llama")
        >>> f = states_function(model, [1, "attn.1", "mlp.1", 2])
        >>> [y.shape[0] for y in f(input_embeddings(model, torch.tensor([1, 2])))]
        [64, 64, 64, 64]
    """
    specs = [resolve_target(hf_model, t) for t in targets]
    for s in specs:
        if s.kind == "block":
            raise ValueError(f"target {s.name!r} takes h_{s.layer} as input, not h_0: compute it on its own "
                             f"(detached_jacobian(..., target={s.name!r})).")
    reads = [None if s.kind == "resid" and s.layer == 0 else read_module(hf_model, s) for s in specs]
    modules = list({id(m): m for m in reads if m is not None}.values())

    def f(x: Tensor) -> tuple[Tensor, ...]:
        xb = x if x.ndim == 3 else x[None]  # a batch [B, T, d] gives [B, d] per target
        outs = run_reading(hf_model, modules, inputs_embeds=xb) if modules else []
        by_module = {id(m): h[:, position] for m, h in zip(modules, outs)}
        ys = tuple(xb[:, position] if m is None else by_module[id(m)] for m in reads)
        return ys if x.ndim == 3 else tuple(y[0] for y in ys)
    return f
