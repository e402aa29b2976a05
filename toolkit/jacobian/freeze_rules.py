"""Freeze rules: per module kind, how to detach its nonlinear factor without changing its value.

Golden (2025, "Large Language Models are Locally Linear Mappings") makes a decoder an
exactly linear function of its input embeddings by detaching, from autograd, every factor
that depends nonlinearly on the input, while computing the same forward values:

===================  ==========================================================================
kind                 frozen form (``[·]`` = detached factor, taken from the :class:`FactorStore`)
===================  ==========================================================================
RMSNorm              ``w * x * [1/sqrt(mean(x²) + eps)]``  (Gemma: ``(1 + w)`` instead of ``w``)
LayerNorm            ``(x - mean(x)) * [1/sqrt(var + eps)] * w + b``  (centring is linear: kept)
activation           ``x * [act(x)/x]``: SiLU ``x·[σ(x)]``, GELU ``x·[Φ(x)]``, tanh-GELU ``x·[½(1+tanh…)]``
gated MLP            ``down([act(gate(x))] * up(x))``  (SwiGLU / GeGLU: the whole gate is the factor)
attention            queries and keys are detached at their projection, so the softmax pattern
                     (rotary, QK-norm, logit softcap, masks included) is a constant and only
                     ``V -> O`` stays in the graph; the kernel itself is not touched (the freeze
                     runs it eagerly, see :func:`toolkit.jacobian.freeze.eager_attention`)
Mamba mixer          ``Δ`` (through its softplus), ``B``, ``C`` = ``[x_proj(u)]``; the conv SiLU as
                     ``u·[σ(u)]``; the output gate ``[silu(z)]``: the scan is linear in ``u``
linear               modules that only add, project, reshape, embed or drop (in eval mode)
===================  ==========================================================================

Rules are keyed by the exact class (a subclass may override ``forward``, so it must be
registered on its own). :data:`RULES` covers the HF families of :mod:`toolkit.families`
(Llama, Qwen3, Gemma 1/2/3, Mistral/Ministral, Phi 3, OLMo 2, SmolLM3, GPT-2, GPT-J, GPT-Neo,
GPT-NeoX, Mamba); fused projections (GPT-2's ``c_attn``, Phi 3's ``qkv_proj`` and
``gate_up_proj``) freeze only their q/k columns and their gate half; :func:`rule_for` returns ``None`` for anything else, and
:mod:`toolkit.jacobian.freeze` stops with an error naming it.

Each ``install`` function patches one module instance (an instance-level ``forward`` or a
forward hook on a child) and returns the callables that undo it.

Example:
    >>> from torch import nn
    >>> rule_for(nn.LayerNorm(4)).kind
    'norm'
    >>> rule_for(nn.Mish()) is None
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import activations as hf_act
from transformers.models.gemma import modeling_gemma as gemma
from transformers.models.gemma2 import modeling_gemma2 as gemma2
from transformers.models.gemma3 import modeling_gemma3 as gemma3
from transformers.models.gpt2 import modeling_gpt2 as gpt2
from transformers.models.gpt_neo import modeling_gpt_neo as gpt_neo
from transformers.models.gpt_neox import modeling_gpt_neox as neox
from transformers.models.gptj import modeling_gptj as gptj
from transformers.models.llama import modeling_llama as llama
from transformers.models.mamba import modeling_mamba as mamba
from transformers.models.ministral import modeling_ministral as ministral
from transformers.models.ministral3 import modeling_ministral3 as ministral3
from transformers.models.mistral import modeling_mistral as mistral
from transformers.models.olmo2 import modeling_olmo2 as olmo2
from transformers.models.phi3 import modeling_phi3 as phi3
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3
from transformers.models.smollm3 import modeling_smollm3 as smollm3
from transformers.pytorch_utils import Conv1D

from toolkit.jacobian.factors import FactorStore
from toolkit.models.placement import parameter

Undo = Callable[[], None]
Install = Callable[[nn.Module, str, FactorStore], list[Undo]]


class FreezeError(RuntimeError):
    """A module cannot be frozen as asked (unsupported kind, configuration or call)."""


@dataclass(frozen=True)
class Rule:
    """How one module kind is frozen: ``install(module, path, store) -> undo callables``.

    Norms also give their ``gain``: the per-dimension factor of their frozen linear part (``w``,
    Gemma's ``1 + w``), which :func:`toolkit.jacobian.analysis.residual_readout` folds into the unembedding.
    """

    kind: str
    install: Install | None  # None: the module is linear once its children are frozen
    note: str
    gain: Callable[[nn.Module], Tensor | None] | None = None


def swap_forward(module: nn.Module, new_forward: Callable) -> Undo:
    """Give ``module`` an instance-level ``forward``; the returned callable restores the old state.

    A module placed by accelerate (``device_map``) carries ``AlignDevicesHook``'s wrapper as its
    instance ``forward`` and its own forward as ``_old_forward``: the latter is swapped, so the
    hook still moves inputs and loads offloaded weights around the frozen forward.

    A module instrumented by nnsight (0.8) already carries an instance-level ``forward``: its
    ``Controller``, which hands ``.input``/``.output`` to a running trace and then calls
    ``controller.state.body``. Replacing the controller would hide the module from nnsight
    while frozen, so for such a module the *body* is swapped instead, and traces still see
    (and may set) the frozen module's input and output.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> undo = swap_forward(lin, lambda x: x)
        >>> undo(); "forward" in vars(lin)
        False
    """
    controller_state = (getattr(vars(module).get("forward"), "state", None)
                        or getattr(vars(module).get("_old_forward"), "state", None))
    if controller_state is not None and hasattr(controller_state, "body"):  # nnsight Controller
        old_body = controller_state.body

        def undo_body() -> None:
            controller_state.body = old_body

        controller_state.body = lambda _self, *args, **kwargs: new_forward(*args, **kwargs)
        return undo_body

    if "_hf_hook" in vars(module) and "_old_forward" in vars(module):
        # accelerate (device_map): the instance forward is AlignDevicesHook's wrapper, which moves the
        # inputs and loads offloaded weights, then calls ``_old_forward``. Swap that slot, so the
        # frozen forward runs with the weights in place (replacing ``forward`` would run it on meta).
        old_inner = vars(module)["_old_forward"]

        def undo_inner() -> None:
            module._old_forward = old_inner

        module._old_forward = new_forward
        return undo_inner

    had_own = "forward" in vars(module)
    old = vars(module).get("forward")

    def undo() -> None:
        if had_own:
            module.forward = old
        else:
            vars(module).pop("forward", None)

    module.forward = new_forward
    return undo


def _hook_output(child: nn.Module, fn: Callable[[Tensor], Tensor]) -> Undo:
    """Replace ``child``'s output by ``fn(output)`` with a removable forward hook."""
    handle = child.register_forward_hook(lambda _m, _args, out: fn(out))
    return handle.remove


# ----- norms ---------------------------------------------------------------------------------
def _install_rmsnorm(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    # Llama/Qwen3/Mamba form: w * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype), same op order.
    def forward(hidden_states: Tensor) -> Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        scale = store.get(f"{path}:scale", lambda: torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
        return m.weight * (h * scale).to(dtype)
    return [swap_forward(m, forward)]


def _install_rmsnorm_weight_first(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    # OLMo 2 form: (w * (x.float() * rsqrt(...))).to(dtype): the weight multiplies before the cast back.
    def forward(hidden_states: Tensor) -> Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        scale = store.get(f"{path}:scale", lambda: torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
        return (m.weight * (h * scale)).to(dtype)
    return [swap_forward(m, forward)]


def _install_gemma_rmsnorm(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    # Gemma form: (x.float() * rsqrt(...)) * (1 + w.float()), cast back after the weight.
    def forward(x: Tensor) -> Tensor:
        h = x.float()
        scale = store.get(f"{path}:scale", lambda: torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.eps))
        return ((h * scale) * (1.0 + m.weight.float())).type_as(x)
    return [swap_forward(m, forward)]


def _install_layernorm(m: nn.LayerNorm, path: str, store: FactorStore) -> list[Undo]:
    dims = tuple(range(-len(m.normalized_shape), 0))

    def forward(x: Tensor) -> Tensor:
        centred = x - x.mean(dims, keepdim=True)  # the mean subtraction is linear: it stays in the graph
        scale = store.get(f"{path}:scale", lambda: torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + m.eps))
        out = centred * scale
        if m.weight is not None:
            out = out * m.weight
        if m.bias is not None:
            out = out + m.bias
        return out
    return [swap_forward(m, forward)]


# ----- elementwise activations: act(x) = x * gate(x) ------------------------------------------
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _phi(x: Tensor) -> Tensor:  # exact GELU gate: the normal CDF
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _tanh_gelu_gate(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def _nn_gelu_gate(m: nn.GELU) -> Callable[[Tensor], Tensor]:
    return _tanh_gelu_gate if m.approximate == "tanh" else _phi


# Class -> (module -> gate function). The gate is the ratio act(x)/x, written without division.
ACTIVATION_GATES: dict[type, Callable[[nn.Module], Callable[[Tensor], Tensor]]] = {
    hf_act.SiLUActivation: lambda m: torch.sigmoid,
    nn.SiLU: lambda m: torch.sigmoid,
    hf_act.GELUActivation: lambda m: _phi,          # F.gelu and the erf python form are both exact GELU
    nn.GELU: _nn_gelu_gate,
    hf_act.GELUTanh: lambda m: _tanh_gelu_gate,
    hf_act.NewGELUActivation: lambda m: _tanh_gelu_gate,
    hf_act.FastGELUActivation: lambda m: (lambda x: 0.5 * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))),
    hf_act.QuickGELUActivation: lambda m: (lambda x: torch.sigmoid(1.702 * x)),
    nn.ReLU: lambda m: (lambda x: (x > 0).to(x.dtype)),
}


def activation_gate(m: nn.Module) -> Callable[[Tensor], Tensor]:
    """The gate ``g`` with ``act(x) = x * g(x)`` for a registered activation module.

    Example:
        >>> activation_gate(nn.SiLU())(torch.zeros(1)).item()
        0.5
    """
    try:
        return ACTIVATION_GATES[type(m)](m)
    except KeyError:
        raise FreezeError(f"activation {type(m).__qualname__} has no freeze rule; register its gate in "
                          f"toolkit.jacobian.freeze_rules.ACTIVATION_GATES.") from None


def _install_activation(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    gate = activation_gate(m)

    def forward(x: Tensor) -> Tensor:
        return x * store.get(f"{path}:gate", lambda: gate(x))
    return [swap_forward(m, forward)]


install_activation = _install_activation  # public: register_rule(MyAct, "activation", install_activation)


# ----- gated MLPs (SwiGLU / GeGLU) -------------------------------------------------------------
def _install_gated_mlp(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    # x * gate(x) would leave the product bilinear; the whole act(gate) is the factor. The act runs
    # through its class forward so a frozen act_fn instance does not record a second factor.
    act = m.act_fn
    activation_gate(act)  # only registered activations: the forward value must be the known function

    def forward(x: Tensor) -> Tensor:
        g = store.get(f"{path}:gate", lambda: type(act).forward(act, m.gate_proj(x)))
        return m.down_proj(g * m.up_proj(x))
    return [swap_forward(m, forward)]


def _install_fused_gated_mlp(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    # Phi 3 / Phi 4: one gate_up_proj whose first half is the gate; the factor is act(gate) as above.
    act = m.activation_fn
    activation_gate(act)

    def forward(hidden_states: Tensor) -> Tensor:
        gate, up = m.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return m.down_proj(up * store.get(f"{path}:gate", lambda: type(act).forward(act, gate)))
    return [swap_forward(m, forward)]


# ----- attention: detach queries and keys at their projections -------------------------------
def _batch_like(factor: Tensor, live: Tensor) -> Tensor:
    """A replayed factor recorded for one sequence, broadcast to a live batch of sequences.

    Replaying a batch ``[B, ...]`` through factors recorded at ``[1, ...]`` evaluates the same
    linear map on ``B`` inputs at once (used for batched Jacobian-vector products).
    """
    return factor if factor.shape == live.shape else factor.expand_as(live)


def _install_separate_qk(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    # Llama / Qwen3 / Gemma3: q_proj and k_proj feed only the pattern (then QK-norm, rotary, scores).
    # Their inputs are detached too, so JVPs push no tangents through projections that are dropped,
    # and while replaying, a projection runs on one sequence only: its output is the recorded factor
    # (broadcast to the live batch) whatever the input.
    undos = []
    for name in ("q", "k"):
        proj, key, live_batch = getattr(m, f"{name}_proj"), f"{path}:{name}", [1]

        def detach_input(_m, args, live_batch=live_batch):
            x = args[0]
            live_batch[0] = x.shape[0]
            x = x[:1] if store.mode == "replay" else x
            return (x.detach(),) + tuple(args[1:])

        def factor(_m, _args, out, key=key, live_batch=live_batch):
            value = store.get(key, lambda: out)
            return value if value.shape[0] == live_batch[0] else value.expand(live_batch[0], *value.shape[1:])

        undos += [proj.register_forward_pre_hook(detach_input).remove, proj.register_forward_hook(factor).remove]
    return undos


def _detach_leading_columns(proj: nn.Module, width: int, key: str, store: FactorStore) -> Undo:
    """A fused ``[q | k | v]`` projection: its first ``width`` output columns (q and k) become the factor."""
    def detach_qk(out: Tensor) -> Tensor:
        qk = _batch_like(store.get(key, lambda: out[..., :width]), out[..., :width])
        return torch.cat([qk, out[..., width:]], dim=-1)
    return _hook_output(proj, detach_qk)


def _install_gpt2_attention(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    if m.is_cross_attention:
        raise FreezeError(f"{path}: GPT-2 cross-attention has no freeze rule (only causal self-attention).")
    return [_detach_leading_columns(m.c_attn, 2 * m.split_size, f"{path}:qk", store)]  # c_attn: [q | k | v]


def _install_phi3_attention(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    # qkv_proj: [q (n_heads * head_dim) | k (n_kv_heads * head_dim) | v], as Phi3Attention.forward slices it.
    width = (m.config.num_attention_heads + m.num_key_value_heads) * m.head_dim
    return [_detach_leading_columns(m.qkv_proj, width, f"{path}:qk", store)]


def _install_neox_attention(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    hs = m.head_size

    def detach_qk(out: Tensor) -> Tensor:  # per head [q | k | v], each head_size wide
        per_head = out.unflatten(-1, (-1, 3, hs))
        qk = _batch_like(store.get(f"{path}:qk", lambda: per_head[..., :2, :]), per_head[..., :2, :])
        return torch.cat([qk, per_head[..., 2:, :]], dim=-2).flatten(-3)
    return [_hook_output(m.query_key_value, detach_qk)]


# ----- Mamba mixer -----------------------------------------------------------------------------
def _install_mamba_mixer(m: nn.Module, path: str, store: FactorStore) -> list[Undo]:
    conv_gate = activation_gate(m.act)

    def forward(hidden_states: Tensor, cache_params=None, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        if cache_params is not None:
            raise FreezeError(f"{path}: the frozen Mamba mixer runs whole sequences without a cache; "
                              f"call the model with use_cache=False.")
        dtype, seq_len = hidden_states.dtype, hidden_states.shape[1]
        hidden_states = mamba.apply_mask_to_padding_states(hidden_states, attention_mask)
        projected = m.in_proj(hidden_states).transpose(1, 2)
        A = -torch.exp(m.A_log.float())
        u, gate = projected.chunk(2, dim=1)
        # Depthwise causal conv (linear, bias = constant), then its activation as u * [gate(u)].
        # The children's weights are read directly (not through their own calls): parameter() loads
        # them from accelerate's offload store when the model is offloaded.
        conv_w, conv_b = parameter(m.conv1d, "weight"), parameter(m.conv1d, "bias")
        u = F.conv1d(u.to(conv_w.dtype), conv_w, conv_b, padding=conv_w.shape[-1] - 1,
                     groups=m.intermediate_size)[:, :, :seq_len]
        u = (u * store.get(f"{path}:conv_gate", lambda: conv_gate(u))).to(dtype)
        u = mamba.apply_mask_to_padding_states(u.transpose(1, 2), attention_mask)  # [b, s, inter]
        # The selection (Δ, B, C) depends on u: one detached factor, then the slow-path scan.
        selection = store.get(f"{path}:selection", lambda: m.x_proj(u))
        time_step, B, C = torch.split(selection, [m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=-1)
        dt = parameter(m.dt_proj, "weight") @ time_step.transpose(1, 2)
        if m.dt_proj.bias is not None:
            dt = dt + parameter(m.dt_proj, "bias").float()[..., None]
        dt = F.softplus(dt)
        hs = u.transpose(1, 2)  # [b, inter, s]
        discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
        deltaB_u = (dt[:, :, :, None] * B[:, None, :, :].float()) * hs[:, :, :, None].float()
        state = torch.zeros(hs.shape[0], hs.shape[1], m.ssm_state_size, dtype=hs.dtype, device=hs.device)
        outputs = []
        for i in range(seq_len):
            state = discrete_A[:, :, i] * state + deltaB_u[:, :, i]
            outputs.append(torch.matmul(state.to(hs.dtype), C[:, i, :].unsqueeze(-1))[:, :, 0])
        scan = torch.stack(outputs, dim=-1) + hs * m.D.float()[None, :, None]
        scan = scan * store.get(f"{path}:out_gate", lambda: F.silu(gate))
        return m.out_proj(scan.transpose(1, 2).to(dtype))
    return [swap_forward(m, forward)]


# ----- the table -------------------------------------------------------------------------------
def _rules() -> dict[type, Rule]:
    table: dict[type, Rule] = {}

    def add(classes, kind: str, install: Install | None, note: str, gain=None) -> None:
        for cls in classes:
            table[cls] = Rule(kind, install, note, gain)

    def weight(m: nn.Module) -> Tensor | None:  # values, even when offloaded (meta between calls)
        return parameter(m) if m.weight is not None else None

    add([llama.LlamaRMSNorm, qwen3.Qwen3RMSNorm, mamba.MambaRMSNorm, mistral.MistralRMSNorm,
         ministral.MinistralRMSNorm, ministral3.Ministral3RMSNorm, phi3.Phi3RMSNorm, smollm3.SmolLM3RMSNorm],
        "norm", _install_rmsnorm, "w * x * [rsqrt(mean(x^2)+eps)]", weight)
    # OLMo 2 also norms the flattened q and k (QK-norm: inside the detached pattern) and each sublayer's output
    add([olmo2.Olmo2RMSNorm], "norm", _install_rmsnorm_weight_first, "w * x * [rsqrt(mean(x^2)+eps)]", weight)
    add([gemma3.Gemma3RMSNorm, gemma2.Gemma2RMSNorm, gemma.GemmaRMSNorm], "norm", _install_gemma_rmsnorm,
        "(1+w) * x * [rsqrt(mean(x^2)+eps)]", lambda m: 1.0 + parameter(m))
    add([nn.LayerNorm], "norm", _install_layernorm, "(x-mean) * [rsqrt(var+eps)] * w + b", weight)
    add(list(ACTIVATION_GATES), "activation", _install_activation, "x * [act(x)/x]")
    add([llama.LlamaMLP, qwen3.Qwen3MLP, gemma3.Gemma3MLP, mistral.MistralMLP, ministral.MinistralMLP,
         ministral3.Ministral3MLP, olmo2.Olmo2MLP, gemma2.Gemma2MLP, smollm3.SmolLM3MLP, gemma.GemmaMLP],
        "gated_mlp", _install_gated_mlp, "down([act(gate(x))] * up(x))")
    add([phi3.Phi3MLP], "gated_mlp", _install_fused_gated_mlp, "down(up * [act(gate)]), [gate | up] = gate_up_proj(x)")
    # Gemma 2's attention-logit softcap, sliding windows, Ministral 3's position scale of q: all in the constant pattern
    add([llama.LlamaAttention, qwen3.Qwen3Attention, gemma3.Gemma3Attention, mistral.MistralAttention,
         ministral.MinistralAttention, ministral3.Ministral3Attention, olmo2.Olmo2Attention, gemma2.Gemma2Attention,
         smollm3.SmolLM3Attention, gptj.GPTJAttention, gpt_neo.GPTNeoSelfAttention, gemma.GemmaAttention],
        "attention", _install_separate_qk, "[q_proj], [k_proj]: constant pattern, V->O linear")
    add([phi3.Phi3Attention], "attention", _install_phi3_attention, "[q|k] of qkv_proj: constant pattern")
    add([gpt2.GPT2Attention], "attention", _install_gpt2_attention, "[q|k] of c_attn: constant pattern")
    add([neox.GPTNeoXAttention], "attention", _install_neox_attention, "[q|k] per head of query_key_value")
    add([mamba.MambaMixer], "ssm_mixer", _install_mamba_mixer,
        "[Δ,B,C]=[x_proj(u)], u*[σ(u)], [silu(z)]: scan linear in u")
    # Linear once their children are frozen (checked against the transformers 5.23 modeling code):
    # residual adds, projections, embeddings, rotary tables (positions only), dropout (identity in eval),
    # containers. Gemma 2/3's final logit softcap acts on logits, outside the Jacobian's y.
    add([nn.Linear, Conv1D, nn.Conv1d, nn.Embedding, nn.Dropout, nn.ModuleList, nn.Identity,
         gemma3.Gemma3TextScaledWordEmbedding,
         llama.LlamaRotaryEmbedding, qwen3.Qwen3RotaryEmbedding, gemma3.Gemma3RotaryEmbedding,
         neox.GPTNeoXRotaryEmbedding,
         llama.LlamaDecoderLayer, qwen3.Qwen3DecoderLayer, gemma3.Gemma3DecoderLayer, gpt2.GPT2Block,
         neox.GPTNeoXLayer, mamba.MambaBlock, gpt2.GPT2MLP, neox.GPTNeoXMLP,
         llama.LlamaModel, qwen3.Qwen3Model, gemma3.Gemma3TextModel, gpt2.GPT2Model, neox.GPTNeoXModel,
         mamba.MambaModel,
         llama.LlamaForCausalLM, qwen3.Qwen3ForCausalLM, gemma3.Gemma3ForCausalLM, gpt2.GPT2LMHeadModel,
         neox.GPTNeoXForCausalLM, mamba.MambaForCausalLM],
        "linear", None, "affine given frozen children")
    add([gemma2.Gemma2TextScaledWordEmbedding, gpt_neo.GPTNeoAttention,  # GPTNeoAttention only dispatches
         mistral.MistralRotaryEmbedding, ministral.MinistralRotaryEmbedding, ministral3.Ministral3RotaryEmbedding,
         phi3.Phi3RotaryEmbedding, olmo2.Olmo2RotaryEmbedding, gemma2.Gemma2RotaryEmbedding,
         smollm3.SmolLM3RotaryEmbedding,
         mistral.MistralDecoderLayer, ministral.MinistralDecoderLayer, ministral3.Ministral3DecoderLayer,
         phi3.Phi3DecoderLayer, olmo2.Olmo2DecoderLayer, gemma2.Gemma2DecoderLayer, smollm3.SmolLM3DecoderLayer,
         gptj.GPTJBlock, gptj.GPTJMLP, gpt_neo.GPTNeoBlock, gpt_neo.GPTNeoMLP,
         mistral.MistralModel, ministral.MinistralModel, ministral3.Ministral3Model, phi3.Phi3Model,
         olmo2.Olmo2Model, gemma2.Gemma2Model, smollm3.SmolLM3Model, gptj.GPTJModel, gpt_neo.GPTNeoModel,
         mistral.MistralForCausalLM, ministral.MinistralForCausalLM, ministral3.Ministral3ForCausalLM,
         phi3.Phi3ForCausalLM, olmo2.Olmo2ForCausalLM, gemma2.Gemma2ForCausalLM, smollm3.SmolLM3ForCausalLM,
         gptj.GPTJForCausalLM, gpt_neo.GPTNeoForCausalLM,
         gemma.GemmaTextScaledWordEmbedding, gemma.GemmaRotaryEmbedding, gemma.GemmaDecoderLayer, gemma.GemmaModel,
         gemma.GemmaForCausalLM],
        "linear", None, "affine given frozen children")
    # ----- Qwen 2 / 2.5 (also the DeepSeek-R1 Qwen distills): Llama's modules plus biases on q, k, v.
    # The q/k biases sit inside the detached projections; the v bias passes the constant pattern into
    # o_proj, an input-independent term of the output: it feeds the constant c of y = sum_i J_i x_i + c.
    add([qwen2.Qwen2RMSNorm], "norm", _install_rmsnorm, "w * x * [rsqrt(mean(x^2)+eps)]", weight)
    add([qwen2.Qwen2MLP], "gated_mlp", _install_gated_mlp, "down([act(gate(x))] * up(x))")
    add([qwen2.Qwen2Attention], "attention", _install_separate_qk,
        "[q_proj+b], [k_proj+b]: constant pattern, V->O linear (v bias -> c)")
    add([qwen2.Qwen2RotaryEmbedding, qwen2.Qwen2DecoderLayer, qwen2.Qwen2Model, qwen2.Qwen2ForCausalLM],
        "linear", None, "affine given frozen children")
    return table


RULES: dict[type, Rule] = _rules()


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this module's exact class, or ``None`` when the kind is not covered.

    Example:
        >>> rule_for(nn.SiLU()).kind
        'activation'
    """
    return RULES.get(type(module))


def register_rule(cls: type, kind: str, install: Install | None, note: str = "",
                  gain: Callable[[nn.Module], Tensor | None] | None = None) -> None:
    """Add (or replace) the rule for ``cls``; ``install=None`` declares it linear; norms give their ``gain``.

    Rules are keyed by the exact class. ``install(module, path, store)`` patches one instance so that
    its nonlinear factor comes from ``store.get(f"{path}:name", compute)`` (detached, recorded once,
    replayed after) and returns the undo callables. An activation ``act(x) = x * g(x)`` needs no
    install code: put its gate ``g`` in :data:`ACTIVATION_GATES` and use :data:`install_activation`.
    Then run :func:`toolkit.jacobian.audit.check_freeze` to see the freeze hold on the model.

    Example:
        A model with a custom activation is refused until its rule is registered:

        >>> from toolkit.jacobian.audit import check_freeze
        >>> from toolkit.jacobian.freeze import UnsupportedModuleError
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> class SquaredReLU(nn.Module):                # act(x) = relu(x)^2 = x * [relu(x)]
        ...     def forward(self, x):
        ...         return torch.relu(x) ** 2
        >>> model = tiny_hf_model("gpt2")
        >>> for block in model.transformer.h:
        ...     block.mlp.act = SquaredReLU()
        >>> try:
        ...     check_freeze(model)
        ... except UnsupportedModuleError as err:
        ...     print("SquaredReLU" in str(err))
        True
        >>> ACTIVATION_GATES[SquaredReLU] = lambda m: torch.relu           # the gate g with act(x) = x * g(x)
        >>> register_rule(SquaredReLU, "activation", install_activation, "x * [relu(x)]")
        >>> check_freeze(model).passed
        True
        >>> del RULES[SquaredReLU], ACTIVATION_GATES[SquaredReLU]           # (leave the tables as they were)

        A module that only reshapes or projects is declared linear:

        >>> register_rule(nn.Identity, "linear", None, "identity")
    """
    RULES[cls] = Rule(kind, install, note, gain)


# Rule tables for a library's own module kinds (a TransformerBridge wraps the HF modules in place; a
# HookedTransformer is built from TransformerLens components). Each is registered lazily, the first
# time a model holding such classes is frozen, so importing the toolkit never imports that library:
# class-module prefix -> "module:function" taking the model and returning the names it registered.
# Several tables may share a prefix (TransformerLens 3 ships both a TransformerBridge and a
# HookedTransformer): each registers only its own classes (HookPoint, shared, by whichever comes first).
RULE_PROVIDERS: dict[str, tuple[str, ...]] = {
    "transformer_lens.": ("toolkit.jacobian.bridge_rules:register_bridge_rules",
                          "toolkit.jacobian.hooked_rules:register_hooked_rules"),
}


def provide_rules(model: nn.Module) -> list[str]:
    """Register the library rule tables (:data:`RULE_PROVIDERS`) the classes inside ``model`` need.

    A class no table covers stays uncovered, and :func:`toolkit.jacobian.freeze.check_supported`
    names it.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> provide_rules(tiny_hf_model("llama"))      # only transformers classes: nothing to register
        []
    """
    import importlib

    modules = {type(m).__module__ for m in model.modules() if type(m) not in RULES}
    added: list[str] = []
    for prefix, targets in RULE_PROVIDERS.items():
        if any(name.startswith(prefix) for name in modules):
            for target in (targets,) if isinstance(targets, str) else targets:
                module_name, function = target.split(":")
                added.extend(getattr(importlib.import_module(module_name), function)(model))
    return added
