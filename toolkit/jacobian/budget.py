"""Time and memory of a dense detached Jacobian, estimated before any work, and the refusal when it won't fit.

A dense Jacobian ``J`` of a ``T``-token prompt is ``[T, d_out, d_in]``; computing it by rows
keeps the frozen forward's autograd graph alive (activations plus, per layer, the ``H x T x T``
attention pattern) and adds one chunk of batched backward passes. All three grow with ``T``
(the graph quadratically), so a long prompt can need many gigabytes:

=================  ================================================================================
term               bytes (``b`` = element size of the dtype)
=================  ================================================================================
``jacobian``       ``T * d_out * d_in * b`` per target
``graph``          ``L * T * (GRAPH_PER_TOKEN_D * d + GRAPH_PER_TOKEN_FF * d_ff) * b``
                   ``+ L * H * T^2 * GRAPH_PER_PATTERN * b``
``chunk``          ``chunk_size * T * (CHUNK_PER_TOKEN_D * d + CHUNK_PER_TOKEN_FF * d_ff) * b``
=================  ================================================================================

Time is ``d_out`` backward passes of the frozen linear path, each about one forward pass's
multiply-adds (``2 * params_per_token * T + 2 * L * T^2 * d``), at this machine's measured
matrix-multiply rate times :data:`EFFICIENCY`. The constants are fitted to SmolLM2-135M in
float32 on CPU (see ``tests/test_budget.py`` and the report of issue 15).

When the estimate exceeds the memory available (``psutil``'s available RAM, or the free memory
of the CUDA device), :func:`check_fits` refuses with the numbers and the alternatives: the
matrix-free top-``k`` route (:func:`toolkit.jacobian.matrix_free.jacobian_svd`, memory ``O(k T d)``),
a shorter prompt (the longest that fits is named) or a smaller ``chunk_size``.

Example:
    >>> from toolkit.models.tiny import tiny_hf_model
    >>> est = estimate_jacobian(tiny_hf_model("llama"), n_tokens=100)
    >>> est.jacobian_bytes == 100 * 64 * 64 * 4
    True
    >>> estimate_jacobian(tiny_hf_model("llama"), n_tokens=200).jacobian_bytes == 2 * est.jacobian_bytes
    True
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch import nn

# Fitted to measured peaks (SmolLM2-135M, float32, CPU, T = 64..512; see the module docstring).
GRAPH_PER_TOKEN_D = 12.0     # saved [T, d] tensors per layer (norms, residuals, projections' inputs)
GRAPH_PER_TOKEN_FF = 4.0     # saved [T, d_ff] tensors per layer (gate, up, their product)
GRAPH_PER_PATTERN = 2.0      # saved [H, T, T] tensors per layer (eager softmax pattern, its cast)
CHUNK_PER_TOKEN_D = 6.0      # live [chunk, T, d] gradients per backward step
CHUNK_PER_TOKEN_FF = 3.0     # live [chunk, T, d_ff] gradients per backward step
EFFICIENCY = 0.9             # batched backward passes reach about this share of a plain matmul's rate
GIB = 1024 ** 3


class JacobianTooLargeError(MemoryError):
    """The dense Jacobian would not fit in the memory available: the message names the alternatives."""


@dataclass(frozen=True)
class JacobianEstimate:
    """Predicted cost of one dense Jacobian computation (reverse mode, by row chunks).

    Bytes are for the computation on top of the loaded model; ``available_bytes`` is what the
    device had free when estimated (or the budget given).
    """

    n_tokens: int
    d_in: int
    d_out: int
    d_ff: int
    n_layers: int
    n_heads: int
    dtype: str
    chunk_size: int
    n_targets: int
    jacobian_bytes: int
    graph_bytes: int
    chunk_bytes: int
    flops: float
    seconds: float
    available_bytes: int | None

    @property
    def peak_bytes(self) -> int:
        """``jacobian + graph + chunk``: the predicted peak above the loaded model."""
        return self.jacobian_bytes + self.graph_bytes + self.chunk_bytes

    @property
    def fits(self) -> bool:
        """Whether :attr:`peak_bytes` fits in :attr:`available_bytes` (True when unknown)."""
        return self.available_bytes is None or self.peak_bytes <= self.available_bytes

    def describe(self) -> str:
        """One line: the sizes, the time and the memory available.

        Example:
            >>> from toolkit.models.tiny import tiny_hf_model
            >>> estimate_jacobian(tiny_hf_model("llama"), 10, available_bytes=GIB).describe()[:38]
            'dense Jacobian [10, 64, 64] x 1 (float'
        """
        avail = "unknown" if self.available_bytes is None else f"{self.available_bytes / GIB:.2f} GiB"
        return (f"dense Jacobian [{self.n_tokens}, {self.d_out}, {self.d_in}] x {self.n_targets} ({self.dtype}): "
                f"~{self.peak_bytes / GIB:.2f} GiB peak (J {self.jacobian_bytes / GIB:.2f}, autograd graph "
                f"{self.graph_bytes / GIB:.2f}, one chunk of {self.chunk_size} rows {self.chunk_bytes / GIB:.2f}), "
                f"~{_duration(self.seconds)}; available {avail}")

    def to_dict(self) -> dict:
        """Plain numbers for ``result.settings`` / JSON.

        Example:
            >>> from toolkit.models.tiny import tiny_hf_model
            >>> estimate_jacobian(tiny_hf_model("llama"), 10).to_dict()["peak_bytes"] > 0
            True
        """
        return {**asdict(self), "peak_bytes": self.peak_bytes}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _shape(hf_model: nn.Module) -> dict[str, int]:
    """``d``, ``d_ff``, ``L``, ``H``, KV heads, gated MLP, from the HF config (GPT-2 names mapped by transformers)."""
    config = hf_model.config
    d = int(config.hidden_size)
    d_ff = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)  # Mamba: none
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    gated = config.model_type in ("llama", "qwen3", "gemma3_text", "gemma3", "mistral", "qwen2")
    return {"d": d, "d_ff": int(d_ff), "L": int(config.num_hidden_layers), "H": heads, "kv": kv, "gated": gated}


@lru_cache(maxsize=4)
def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Multiply-add FLOP/s of this machine for a mid-sized matmul (measured once per process, ~0.1 s).

    Example:
        >>> matmul_rate() > 1e8
        True
    """
    m, k, n = 2048, 512, 1536  # the shape of a chunk of batched rows through an MLP projection
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < 0.1:
        a @ b
        reps += 1
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return 2 * m * k * n * reps / (time.perf_counter() - t0)


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free now: the CUDA device's free memory, else the host's available RAM (``psutil``).

    Example:
        >>> available_memory() > 0
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil
    return int(psutil.virtual_memory().available)


def estimate_jacobian(hf_model: nn.Module, n_tokens: int, *, chunk_size: int = 64, n_targets: int = 1,
                      dtype: torch.dtype | None = None, available_bytes: int | None = None,
                      measure_available: bool = False) -> JacobianEstimate:
    """Predict time and memory of the dense detached Jacobian of an ``n_tokens`` prompt (no model run).

    Args:
        n_tokens: prompt length ``T``.
        chunk_size: rows per batched backward pass.
        n_targets: Jacobians kept at once (all-layer sweeps).
        dtype: the computation's dtype (default the model's).
        available_bytes: the memory budget to compare with; else measured when
            ``measure_available`` (:func:`available_memory`), else unknown.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> est = estimate_jacobian(tiny_hf_model("llama"), 32, available_bytes=1000)
        >>> est.fits, est.jacobian_bytes
        (False, 524288)
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    s = _shape(hf_model)
    param = next(hf_model.parameters())
    dtype = dtype or param.dtype
    b = torch.empty((), dtype=dtype).element_size()
    T, d, d_ff, L, H = n_tokens, s["d"], s["d_ff"], s["L"], s["H"]
    jac = T * d * d * b * n_targets
    graph = L * T * (GRAPH_PER_TOKEN_D * d + GRAPH_PER_TOKEN_FF * d_ff) * b + L * H * T * T * GRAPH_PER_PATTERN * b
    chunk = min(chunk_size, d) * T * (CHUNK_PER_TOKEN_D * d + CHUNK_PER_TOKEN_FF * d_ff) * b
    head = d // H if H else d
    per_token = L * (2 * d * d + 2 * d * s["kv"] * head + (3 if s["gated"] else 2) * d * d_ff)
    flops = d * n_targets * (2 * per_token * T + 2 * L * T * T * d) + 2 * (2 * per_token * T)
    seconds = flops / (matmul_rate(param.device.type if param.device.type == "cpu" else str(param.device))
                       * EFFICIENCY)
    if available_bytes is None and measure_available:
        available_bytes = available_memory(param.device)
    return JacobianEstimate(n_tokens=T, d_in=d, d_out=d, d_ff=d_ff, n_layers=L, n_heads=H,
                            dtype=str(dtype).replace("torch.", ""), chunk_size=chunk_size, n_targets=n_targets,
                            jacobian_bytes=int(jac), graph_bytes=int(graph), chunk_bytes=int(chunk), flops=float(flops),
                            seconds=float(seconds), available_bytes=available_bytes)


def longest_prompt(hf_model: nn.Module, budget_bytes: int, *, chunk_size: int = 64, n_targets: int = 1) -> int:
    """The most tokens whose dense Jacobian fits in ``budget_bytes`` (0 if none).

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> model = tiny_hf_model("llama")
        >>> T = longest_prompt(model, 10 * 2**20)
        >>> [estimate_jacobian(model, n, available_bytes=10 * 2**20).fits for n in (T, T + 1)]
        [True, False]
    """
    lo, hi = 0, 1
    while estimate_jacobian(hf_model, hi, chunk_size=chunk_size, n_targets=n_targets).peak_bytes <= budget_bytes:
        lo, hi = hi, hi * 2
        if hi > 1 << 24:
            return lo
    while hi - lo > 1:  # peak grows with T: bisect
        mid = (lo + hi) // 2
        if estimate_jacobian(hf_model, mid, chunk_size=chunk_size, n_targets=n_targets).peak_bytes <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def check_fits(hf_model: nn.Module, n_tokens: int, *, chunk_size: int = 64, n_targets: int = 1,
               memory_budget: int | None = None) -> JacobianEstimate:
    """The estimate, or :class:`JacobianTooLargeError` (before any work) when it exceeds the memory.

    ``memory_budget``: bytes allowed (default: what is available now, :func:`available_memory`).

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> try:
        ...     check_fits(tiny_hf_model("llama"), 500, memory_budget=2**20)
        ... except JacobianTooLargeError as e:
        ...     print(str(e)[:34])
        the dense Jacobian will not fit: d
    """
    est = estimate_jacobian(hf_model, n_tokens, chunk_size=chunk_size, n_targets=n_targets,
                            available_bytes=memory_budget, measure_available=memory_budget is None)
    if est.fits:
        return est
    longest = longest_prompt(hf_model, est.available_bytes, chunk_size=chunk_size, n_targets=n_targets)
    smaller_chunk = estimate_jacobian(hf_model, n_tokens, chunk_size=8, n_targets=n_targets,
                                      available_bytes=est.available_bytes)
    chunk_hint = (f"; chunk_size=8 would need ~{smaller_chunk.peak_bytes / GIB:.2f} GiB"
                  f"{' (fits)' if smaller_chunk.fits else ' (still too much)'}" if chunk_size > 8 else "")
    raise JacobianTooLargeError(
        f"the dense Jacobian will not fit: {est.describe()}. Use the matrix-free top-k route instead "
        f"(toolkit.jacobian.jacobian_svd(model, ids, k=8): memory O(k*T*d), never forms J; CLI: "
        f"`jacobian --matrix-free`), or a shorter prompt (at most {longest} tokens fit){chunk_hint}.")


def prefer_matrix_free(estimate: JacobianEstimate, *, max_seconds: float = 120.0) -> str | None:
    """Why a caller that may choose (the CLI) should take the matrix-free route, or ``None`` for the dense one.

    Long prompts go matrix-free: the dense Jacobian does not fit, or would take over ``max_seconds``.

    Example:
        >>> from toolkit.models.tiny import tiny_hf_model
        >>> prefer_matrix_free(estimate_jacobian(tiny_hf_model("llama"), 8, available_bytes=2**30)) is None
        True
        >>> prefer_matrix_free(estimate_jacobian(tiny_hf_model("llama"), 8, available_bytes=1))[:17]
        'it would not fit:'
    """
    if not estimate.fits:
        return f"it would not fit: {estimate.describe()}"
    if estimate.seconds > max_seconds:
        return f"it would take over {_duration(max_seconds)}: {estimate.describe()}"
    return None
