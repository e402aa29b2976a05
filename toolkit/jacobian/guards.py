"""Guards that keep a detached Jacobian honest: what the model really runs, and whether the answer holds.

The freeze (:mod:`toolkit.jacobian.freeze`) replaces each module's nonlinear factor by a
detached constant *as its class computes it*. Two things a user's model may carry would make
that silently wrong:

* an **instance-level ``forward``** (``model.model.layers[3].mlp.forward = my_variant``): the
  freeze would compute the class forward instead (a different function, with a perfect
  reconstruction error), or run the override without freezing it;
* a **hook** (forward, forward-pre or backward; on a module or global): it edits values the
  freeze does not see, so a nonlinear hook (say ``tanh`` on an MLP's output) is differentiated
  through instead of detached and the map is no longer linear.

:func:`inspect_model` lists every such thing it cannot see through, each with its module path,
what it is, and the fix. It sees through the wrappers it knows: nnsight 0.8's ``Controller``
(an instance ``forward`` whose body is the class's own), the read-only hooks transformers and
TransformerBridge install themselves (:data:`KNOWN_HOOKS`), and the toolkit's own reading hooks
(:func:`toolkit_hook`); a user's TransformerLens hook (``bridge.add_hook``) is named with its
hook point. A hook the user knows to be affine (a fixed steering vector added, a
projection) can be let through with :func:`affine_hook`.

After the Jacobian is computed, :class:`Checks` verifies the numbers: the frozen forward must
reproduce the *live* model's output (unfrozen, hooks and overrides included) and
``sum_i J_i x_i + c`` must reproduce ``y``, both within :data:`TOLERANCES` for the dtype.
A failed check raises :class:`FreezeCheckError`; with ``strict=False`` it warns
(:class:`FreezeWarning`) and is recorded in ``result.settings["warnings"]``.

Example:
    >>> import torch
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> model = tiny_hf_model("llama")
    >>> inspect_model(model)
    []
    >>> handle = model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: torch.tanh(out))
    >>> [f.path for f in inspect_model(model)]
    ['model.layers.1.mlp']
    >>> handle.remove()
"""
from __future__ import annotations

import functools

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.modules.module as torch_module
from torch import Tensor, nn

from toolkit.jacobian.freeze_rules import FreezeError
from toolkit.metrics import relative_error

_AFFINE = "_toolkit_affine_hook"
_OWN = "_toolkit_own_hook"


class LiveModelError(FreezeError):
    """The model runs something the freeze cannot see (an instance ``forward`` or a hook)."""


class FreezeCheckError(FreezeError):
    """The frozen map does not reproduce the live model, or ``J x + c`` does not reproduce ``y``."""


class FreezeWarning(UserWarning):
    """A failed freeze check let through with ``strict=False``."""


@dataclass(frozen=True)
class Tolerance:
    """Relative bounds for one dtype: ``live`` (frozen vs live output), ``reconstruction`` (``J x + c`` vs ``y``)."""

    live: float
    reconstruction: float


# Measured on SmolLM2-135M, "The capital of France is" (5 tokens), target "output", CPU:
#   float32:  live 1.2e-6, VJP affinity probe 6.5e-7, reconstruction 7.2e-7  -> bounds 1e-4 / 1e-5
#   bfloat16: live 2.3e-2, VJP affinity probe 7.3e-3, reconstruction 1.1e-2  -> bounds 1e-1 / 5e-2
#   float16:  not measured (CPU half matmuls are too slow here); its 10-bit mantissa (bfloat16: 7) puts
#             rounding ~8x below bfloat16's, so bounds 2e-2 / 1e-2.
# A broken freeze in float32 (a tanh hook on an MLP, an override) gives 1e-2 and more. In bfloat16 the rounding
# itself is that large, so only the structural refusal (inspect_model) separates the two there.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(live=1e-8, reconstruction=1e-10),
    torch.float32: Tolerance(live=1e-4, reconstruction=1e-5),
    torch.float16: Tolerance(live=2e-2, reconstruction=1e-2),
    torch.bfloat16: Tolerance(live=1e-1, reconstruction=5e-2),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The :class:`Tolerance` for ``dtype`` (float32's bounds for anything unlisted).

    Example:
        >>> tolerance(torch.float32)
        Tolerance(live=0.0001, reconstruction=1e-05)
    """
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def affine_hook(fn: Callable) -> Callable:
    """Mark a hook as affine in its input, so the freeze runs through it instead of refusing.

    Only for hooks that really are affine (adding a fixed vector, a projection, a scale): the
    numeric checks still verify the result, and a nonlinear hook marked affine fails them.

    Example:
        >>> import torch
        >>> steer = affine_hook(lambda module, args, out: out + 1.0)
        >>> handle = torch.nn.Linear(2, 2).register_forward_hook(steer)
    """
    setattr(fn, _AFFINE, True)
    return fn


def toolkit_hook(fn: Callable) -> Callable:
    """Mark a hook the toolkit itself installs (reading a target, replacing an input) as known.

    Example:
        >>> toolkit_hook(lambda m, a, out: None)._toolkit_own_hook
        True
    """
    setattr(fn, _OWN, True)
    return fn


@dataclass(frozen=True)
class Finding:
    """One thing the freeze cannot see through: module ``path``, ``what`` it is, and the ``fix``."""

    path: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.what}. Fix: {self.fix}"


def _marked(fn: Any, mark: str) -> bool:
    """Whether ``fn`` (or what it wraps: a partial, a TransformerLens ``full_hook`` closure) carries ``mark``."""
    seen = 0
    todo = [fn]
    while todo and seen < 16:
        f = todo.pop()
        seen += 1
        if getattr(f, mark, False):
            return True
        todo += [getattr(f, "func", None), getattr(f, "__wrapped__", None)]
        todo += [cell.cell_contents for cell in (getattr(f, "__closure__", None) or ())
                 if callable(getattr(cell, "cell_contents", None))]
        todo = [t for t in todo if t is not None]
    return False


# Hooks other libraries install on their own, that only read values (or route them to hook points whose
# user hooks are inspected on their own): qualified name (module:qualname) or module prefix -> why it is safe.
KNOWN_HOOKS: dict[str, str] = {
    "transformers.utils.output_capturing:install_output_capuring_hook.<locals>.output_capturing_hook":
        "transformers' output recorder (output_hidden_states / output_attentions): reads, returns None",
    "transformer_lens.model_bridge.": "TransformerBridge wiring (captures, routes to hook points; the hook "
                                      "points' own hooks are inspected separately)",
}


def _known(fn: Any) -> bool:
    name = f"{getattr(fn, '__module__', '')}:{getattr(fn, '__qualname__', '')}"
    return any(name == k or (k.endswith(".") and name.startswith(k)) for k in KNOWN_HOOKS)


def _describe(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name).split("<locals>.")[-1]  # the name the user gave it, not where it was defined


def _tl_user_hooks(module: nn.Module) -> dict[int, Any]:
    """TransformerLens ``HookPoint``: handle id -> the user's own callable (before ``add_hook`` wraps it)."""
    out = {}
    for lens in list(getattr(module, "fwd_hooks", []) or []) + list(getattr(module, "bwd_hooks", []) or []):
        handle = getattr(lens, "hook", None)
        if handle is not None and getattr(lens, "user_hook", None) is not None:
            out[handle.id] = lens.user_hook
    return out


def _runs(module: nn.Module, fn: Any) -> Any:
    """What a forward wrapper the toolkit knows finally runs: nnsight 0.8's Controller (its ``state``
    body) and accelerate's device hook (``partial(new_forward, module)`` over ``module._old_forward``,
    which moves inputs and loads offloaded weights around the module's own forward)."""
    for _ in range(8):
        state = getattr(fn, "state", None)
        if state is not None and hasattr(state, "body"):  # nnsight 0.8 Controller: look at what it runs
            fn = getattr(state, "original", state.body)
            continue
        if (isinstance(fn, functools.partial) and fn.args[:1] == (module,)
                and getattr(module, "_hf_hook", None) is not None and "_old_forward" in vars(module)):
            fn = vars(module)["_old_forward"]  # accelerate's AlignDevicesHook wrapper
            continue
        break
    return fn


def _is_class_forward(module: nn.Module, fn: Any) -> bool:
    cls_forward = type(module).forward
    return fn is cls_forward or (getattr(fn, "__func__", None) is cls_forward and getattr(fn, "__self__", None) is module)


def _instance_forward(path: str, module: nn.Module) -> Finding | None:
    own = vars(module).get("forward")
    if own is None:
        return None
    own = _runs(module, own)
    if _is_class_forward(module, own):
        return None
    cls = type(module).__qualname__
    return Finding(path, f"instance-level forward override {_describe(own)} (the class {cls}.forward is what "
                         f"the freeze rules know)",
                   f"remove it (del <module>.forward, or load the model afresh) and express the change as a "
                   f"module the rules cover; if it is affine, run it as a forward hook marked with "
                   f"toolkit.jacobian.guards.affine_hook")


_HOOK_KINDS = (("_forward_pre_hooks", "forward-pre hook"), ("_forward_hooks", "forward hook"),
               ("_backward_pre_hooks", "backward-pre hook"), ("_backward_hooks", "backward hook"))
_GLOBAL_HOOKS = (("_global_forward_pre_hooks", "global forward-pre hook", "register_module_forward_pre_hook"),
                 ("_global_forward_hooks", "global forward hook", "register_module_forward_hook"),
                 ("_global_backward_pre_hooks", "global backward-pre hook", "register_module_full_backward_pre_hook"),
                 ("_global_backward_hooks", "global backward hook", "register_module_full_backward_hook"))


def _hook_findings(path: str, module: nn.Module) -> list[Finding]:
    found = []
    tl = _tl_user_hooks(module)
    tl_name = getattr(module, "name", None) if tl else None
    for attr, kind in _HOOK_KINDS:
        for hook_id, hook in (getattr(module, attr, None) or {}).items():
            user = tl.get(hook_id, hook)
            if _marked(hook, _OWN) or _marked(user, _AFFINE) or _marked(hook, _AFFINE) or _known(hook):
                continue
            where = f" (TransformerLens hook point {tl_name!r})" if tl_name else ""
            found.append(Finding(path, f"{kind} {_describe(user)}{where} that the freeze would differentiate "
                                       f"through instead of detaching",
                                 "remove it (handle.remove(); TransformerLens: bridge.reset_hooks()) before "
                                 "computing the Jacobian; if it is affine in its input, register it wrapped in "
                                 "toolkit.jacobian.guards.affine_hook(fn)"))
    return found


def inspect_model(hf_model: nn.Module) -> list[Finding]:
    """Everything ``hf_model`` runs that the freeze cannot see through: instance forwards and hooks.

    Known wrappers are looked through (see the module docstring). An empty list means the model
    runs exactly its classes' forwards, so the freeze rules describe it.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("gpt2")
        >>> model.transformer.h[0].mlp.forward = lambda x: x
        >>> print(inspect_model(model)[0].path)
        transformer.h.0.mlp
    """
    found = []
    for attr, kind, registrar in _GLOBAL_HOOKS:
        for hook in (getattr(torch_module, attr, None) or {}).values():
            if not (_marked(hook, _OWN) or _marked(hook, _AFFINE)):
                found.append(Finding("<every module>",
                                     f"{kind} {_describe(hook)} (torch.nn.modules.module.{registrar})",
                                     "remove it (handle.remove()) while computing Jacobians; if it is affine, "
                                     "register it wrapped in toolkit.jacobian.guards.affine_hook(fn)"))
    for path, module in hf_model.named_modules():
        override = _instance_forward(path, module)
        if override is not None:
            found.append(override)
        found += _hook_findings(path, module)
    return found


def refusal(findings: list[Finding], model_name: str) -> str:
    """The message naming every finding (at most 8 shown) and its fix.

    Example:
        >>> print(refusal([Finding("model.layers.1.mlp", "forward hook f", "remove it")], "LlamaForCausalLM"))
        cannot freeze LlamaForCausalLM as it runs now: model.layers.1.mlp: forward hook f. Fix: remove it
    """
    shown = "; ".join(str(f) for f in findings[:8])
    more = f" (and {len(findings) - 8} more)" if len(findings) > 8 else ""
    return f"cannot freeze {model_name} as it runs now: {shown}{more}"


@dataclass
class Checks:
    """The verdicts of one Jacobian's checks; ``strict`` decides whether a failure raises or warns.

    ``live_error``: ``||y_frozen - y_live|| / ||y_live||``; ``affine_error``: the largest
    ``|u^T (J x + c - y)| / ||y||`` over a few unit probes ``u`` (computed with VJPs, so it works
    for matrix-free routes); ``reconstruction_error``: the dense ``||J x + c - y|| / ||y||``.

    Example:
        >>> checks = Checks(strict=False, dtype=torch.float32)
        >>> import warnings as w
        >>> with w.catch_warnings(record=True):
        ...     checks.check("reconstruction", 3e-2)
        >>> checks.warnings[0][:54]
        'reconstruction error 3.00e-02, above the float32 bound'
    """

    strict: bool = True
    dtype: torch.dtype = torch.float32
    warnings: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def tol(self) -> Tolerance:
        return tolerance(self.dtype)

    def fail(self, message: str) -> None:
        """Raise :class:`FreezeCheckError`, or (``strict=False``) warn loudly and record ``message``."""
        if self.strict:
            raise FreezeCheckError(message + " (pass strict=False to get the result anyway, with this warning "
                                             "recorded in result.settings['warnings'])")
        warnings.warn(message, FreezeWarning, stacklevel=3)
        self.warnings.append(message)

    def refuse(self, findings: list[Finding], model_name: str) -> None:
        """Structural findings (:func:`inspect_model`): refuse, or record them when not strict."""
        if not findings:
            return
        message = refusal(findings, model_name)
        if self.strict:
            raise LiveModelError(message + ". (strict=False computes it anyway, with a warning recorded.)")
        warnings.warn(message, FreezeWarning, stacklevel=3)
        self.warnings.append(message)

    def check(self, name: str, error: float) -> None:
        """Record ``error`` under ``name`` (``"live"``, ``"affine"`` or ``"reconstruction"``) and test its bound."""
        self.errors[name] = error
        bound = self.tol.live if name == "live" else self.tol.reconstruction
        if not error <= bound:  # NaN fails too
            dtype = str(self.dtype).replace("torch.", "")
            what = {"live": "the frozen forward's output differs from the live model's own (unfrozen, with its "
                            "hooks and overrides): relative error",
                    "affine": "the frozen map is not affine: a VJP probe of J x + c - y gives relative error",
                    "reconstruction": "reconstruction error"}[name]
            self.fail(f"{what} {error:.2e}, above the {dtype} bound {bound:.0e}: the Jacobian does not describe "
                      f"this model as it runs (a hook, an override or an unsupported module edits values the "
                      f"freeze does not see; see toolkit.jacobian.guards.inspect_model)")

    def compare_live(self, frozen: Tensor, live: Tensor) -> None:
        """Check the frozen forward's output against the live model's."""
        self.check("live", relative_error(frozen.detach(), live.detach()))

    def copy(self) -> "Checks":
        """An independent copy (one per result when several share the earlier checks)."""
        return Checks(self.strict, self.dtype, list(self.warnings), dict(self.errors))

    def as_settings(self) -> dict[str, Any]:
        """What goes into ``result.settings``: ``checks`` (errors and bounds) and ``warnings``."""
        tol = self.tol
        return {"checks": {"strict": self.strict, **{f"{k}_error": v for k, v in self.errors.items()},
                           "live_tolerance": tol.live, "reconstruction_tolerance": tol.reconstruction},
                "warnings": list(self.warnings)}


def affine_probe(vjp: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, c: Tensor, n_random: int = 3) -> float:
    """``max_u |<u^T J, x> - <u, y - c>| / ||y||`` over unit probes ``u``: ``y - c`` and ``n_random`` random ones.

    A lower bound on the reconstruction error ``||J x + c - y|| / ||y||`` from ``1 + n_random``
    VJPs only (the Jacobian is never formed); for a nonlinear frozen map it is nonzero.

    Example:
        >>> W = torch.randn(3, 2)
        >>> x = torch.randn(2)
        >>> affine_probe(lambda U: U @ W, x, W @ x + 1.0, torch.ones(3)) < 1e-6
        True
    """
    r = (y - c).detach().reshape(-1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    probes = [r / r.norm().clamp_min(1e-30)] + [torch.randn(r.numel(), generator=gen).to(r) for _ in range(n_random)]
    U = torch.stack([p / p.norm().clamp_min(1e-30) for p in probes])  # [p, m]
    G = vjp(U.reshape(-1, *y.shape)).reshape(U.shape[0], -1).double()  # [p, n]: u^T J
    lhs = G @ x.detach().reshape(-1).double()
    rhs = U.double() @ r.double()
    return float((lhs - rhs).abs().max() / y.detach().double().norm().clamp_min(1e-300))
