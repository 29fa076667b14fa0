"""Triton kernels of the fused shift-scale (:mod:`surgeon.ops.fused`); imported only when used.

Every kernel reads the activation as a flat buffer in memory order, so any dense layout
works (NCHW, channels-last, (N, C), (N, L, C)). A parameter's index at flat offset ``f`` is
``0`` (layer), ``(f // s_c) % C`` (channel: ``s_c`` is the channel dim's stride) or
``f % S`` (element: ``S`` is the sample size; the parameter is laid out like one sample).

Forward is one pass. Backward is one pass that writes the input gradient and reduces both
parameter gradients to fp32 partial sums, one per row of a ``[rows, row length]`` view
(the ``rows`` kernel: layer mode, channel mode with ``s_c > 1``) or one per column block of
an ``[outer, K]`` view (the ``cols`` kernel: channel mode with ``s_c == 1``, element mode).
The partials are param-sized; the host sums them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MODE_ID = {"none": 0, "layer": 1, "channel": 2, "element": 3}
_NUM_SMS: dict[int, int] = {}


@triton.jit
def _param(ptr, f, mask, MODE: tl.constexpr, s_c, C, S):
    """The parameter value at flat offsets ``f`` (fp32)."""
    if MODE == 1:
        p = tl.load(ptr)
    elif MODE == 2:
        p = tl.load(ptr + (f // s_c) % C, mask=mask, other=0.0)
    else:
        p = tl.load(ptr + f % S, mask=mask, other=0.0)
    return p.to(tl.float32)


@triton.jit
def _fwd_kernel(
    x_ptr, y_ptr, b_ptr, a_ptr, n, s_c, C, S,
    SHIFT: tl.constexpr, SCALE: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        v = tl.maximum(v, 0.0)
    if SHIFT != 0:
        v = v + _param(b_ptr, offs, mask, SHIFT, s_c, C, S)
    if SCALE != 0:
        v = v * _param(a_ptr, offs, mask, SCALE, s_c, C, S)
    tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(
    g_ptr, x_ptr, gx_ptr, b_ptr, a_ptr, f, m, s_c, C, S,
    SHIFT: tl.constexpr, SCALE: tl.constexpr, RELU: tl.constexpr,
    NEED_GX: tl.constexpr, NEED_GA: tl.constexpr,
):  # fmt: skip
    """Write ``grad_x`` for one tile; return its scale- and shift-gradient terms."""
    g = tl.load(g_ptr + f, mask=m, other=0.0).to(tl.float32)
    if SCALE != 0:  # noqa: SIM108 (a constexpr branch, not a runtime select)
        ga = g * _param(a_ptr, f, m, SCALE, s_c, C, S)
    else:
        ga = g
    ca = g * 0.0
    if NEED_GA or RELU:
        x = tl.load(x_ptr + f, mask=m, other=0.0).to(tl.float32)
        if NEED_GA:
            xs = x
            if RELU:
                xs = tl.maximum(x, 0.0)
            if SHIFT != 0:
                xs = xs + _param(b_ptr, f, m, SHIFT, s_c, C, S)
            ca = g * xs
    if NEED_GX:
        gx = ga
        if RELU:
            gx = tl.where(x > 0.0, ga, 0.0)
        tl.store(gx_ptr + f, gx.to(gx_ptr.dtype.element_ty), mask=m)
    return ca, ga


@triton.jit
def _bwd_rows_kernel(
    g_ptr, x_ptr, gx_ptr, b_ptr, a_ptr, pa_ptr, pb_ptr, n, R, L, s_c, C, S,
    SHIFT: tl.constexpr, SCALE: tl.constexpr, RELU: tl.constexpr, NEED_GX: tl.constexpr,
    NEED_GA: tl.constexpr, NEED_GB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Rows of length ``L``: one partial sum per row."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    acc_a = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        f = rows[:, None] * L + cols[None, :]
        m = rmask[:, None] & (cols[None, :] < L) & (f < n)
        ca, cb = _bwd_tile(
            g_ptr, x_ptr, gx_ptr, b_ptr, a_ptr, f, m, s_c, C, S,
            SHIFT, SCALE, RELU, NEED_GX, NEED_GA,
        )  # fmt: skip
        acc_a += ca
        acc_b += cb
    if NEED_GA:
        tl.store(pa_ptr + rows, tl.sum(acc_a, axis=1), mask=rmask)
    if NEED_GB:
        tl.store(pb_ptr + rows, tl.sum(acc_b, axis=1), mask=rmask)


@triton.jit
def _bwd_cols_kernel(
    g_ptr, x_ptr, gx_ptr, b_ptr, a_ptr, pa_ptr, pb_ptr, n_outer, K, O_PER, s_c, C, S,
    SHIFT: tl.constexpr, SCALE: tl.constexpr, RELU: tl.constexpr, NEED_GX: tl.constexpr,
    NEED_GA: tl.constexpr, NEED_GB: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """An ``[n_outer, K]`` view: program ``(k block, o chunk)`` sums ``O_PER`` rows per column."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    o_start = tl.program_id(1) * O_PER
    acc_a = tl.zeros([BLOCK_O, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_O, BLOCK_K], dtype=tl.float32)
    for o0 in range(0, O_PER, BLOCK_O):
        rows = o_start + o0 + tl.arange(0, BLOCK_O)
        m = (rows < n_outer)[:, None] & kmask[None, :]
        f = rows[:, None] * K + ks[None, :]
        ca, cb = _bwd_tile(
            g_ptr, x_ptr, gx_ptr, b_ptr, a_ptr, f, m, s_c, C, S,
            SHIFT, SCALE, RELU, NEED_GX, NEED_GA,
        )  # fmt: skip
        acc_a += ca
        acc_b += cb
    out = tl.program_id(1) * K + ks
    if NEED_GA:
        tl.store(pa_ptr + out, tl.sum(acc_a, axis=0), mask=kmask)
    if NEED_GB:
        tl.store(pb_ptr + out, tl.sum(acc_b, axis=0), mask=kmask)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter (TRITON_INTERPRET=1) on CPU
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def supports(x: torch.Tensor) -> bool:
    """Dtypes and sizes the kernels handle (int32 offsets)."""
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and 0 < x.numel() < 2**31


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if its memory is dense with the batch dim outermost, else a contiguous copy."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly ``x``'s strides (a copy if they differ)."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _geometry(x: torch.Tensor, channel_dim: int) -> tuple[int, int, int]:
    cd = channel_dim
    C = x.shape[cd] if x.dim() > 1 else 1
    s_c = max(1, x.stride(cd)) if x.dim() > 1 else 1
    S = x.numel() // max(1, x.shape[0])
    return s_c, C, S


def _param_arg(p: torch.Tensor | None, mode: str, x: torch.Tensor) -> torch.Tensor:
    """An fp32 buffer indexed as the kernels expect (element mode: ``x[0]``'s memory order)."""
    if p is None:
        return x.new_empty((1,), dtype=torch.float32)
    p = p.detach()
    if mode == "element":
        sample = x[0]
        if sample.stride() != p.stride() or p.dtype != torch.float32:
            return torch.empty_like(sample, dtype=torch.float32).copy_(p)
        return p
    return p.float().contiguous()


def forward(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift_mode: str,
    scale_mode: str,
    channel_dim: int,
    relu: bool,
) -> torch.Tensor:
    """``(x + shift) * scale`` (``relu(x)`` first with ``relu``) in one pass; ``x`` dense."""
    s_c, C, S = _geometry(x, channel_dim)
    y = torch.empty_like(x)
    n, block = x.numel(), 1024
    _fwd_kernel[(triton.cdiv(n, block),)](
        x, y, _param_arg(shift, shift_mode, x), _param_arg(scale, scale_mode, x), n, s_c, C, S,
        SHIFT=MODE_ID[shift_mode], SCALE=MODE_ID[scale_mode], RELU=relu, BLOCK=block,
        num_warps=4,
    )  # fmt: skip
    return y


def _finest(shift_mode: str, scale_mode: str) -> str:
    order = ("none", "layer", "channel", "element")
    return max(shift_mode, scale_mode, key=order.index)


def _bins_to_param(bins: torch.Tensor, finest: str, mode: str, x: torch.Tensor, cd: int):
    """Reduce per-bin sums of the ``finest`` mode to a parameter of ``mode``."""
    if mode == "layer":
        return bins.sum()
    if mode == finest:
        if mode == "element":  # bins are in x[0]'s memory order
            sample = x[0]
            return bins.as_strided(sample.shape, sample.stride()).contiguous()
        return bins
    # channel parameter, element bins
    sample = x[0]
    per_sample = bins.as_strided(sample.shape, sample.stride())
    dims = [d for d in range(sample.dim()) if d != cd - 1]
    return per_sample.sum(dims) if dims else per_sample.contiguous()


def backward(
    g: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift_mode: str,
    scale_mode: str,
    channel_dim: int,
    relu: bool,
    need_gx: bool,
    need_gb: bool,
    need_ga: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_x, grad_shift, grad_scale)`` in one pass over ``g`` and ``x`` (``x`` dense,
    ``g`` with ``x``'s strides); parameter gradients are fp32 sums."""
    cd = channel_dim
    s_c, C, S = _geometry(x, cd)
    n = x.numel()
    finest = _finest(shift_mode if need_gb else "none", scale_mode if need_ga else "none")
    gx = torch.empty_like(x) if need_gx else x.new_empty((1,))
    b = _param_arg(shift, shift_mode, x)
    a = _param_arg(scale, scale_mode, x)
    flags = dict(
        SHIFT=MODE_ID[shift_mode], SCALE=MODE_ID[scale_mode], RELU=relu,
        NEED_GX=need_gx, NEED_GA=need_ga, NEED_GB=need_gb,
    )  # fmt: skip
    programs = 4 * _num_sms(x.device)
    if finest in ("none", "layer") or (finest == "channel" and s_c > 1):
        if finest == "channel":
            L, K = s_c, C
            block_l = min(triton.next_power_of_2(L), 1024)
            block_r = max(1, 2048 // block_l)
        else:
            K, block_l, block_r = 1, 1024, 2
            L = block_l * max(1, triton.cdiv(n, block_l * block_r * programs))
        R = triton.cdiv(n, L)
        pa = torch.empty(R if need_ga else 1, device=x.device, dtype=torch.float32)
        pb = torch.empty(R if need_gb else 1, device=x.device, dtype=torch.float32)
        _bwd_rows_kernel[(triton.cdiv(R, block_r),)](
            g, x, gx, b, a, pa, pb, n, R, L, s_c, C, S,
            BLOCK_R=block_r, BLOCK_L=block_l, num_warps=4, **flags,
        )  # fmt: skip
        bins_a = pa.view(-1, K).sum(0) if need_ga else None
        bins_b = pb.view(-1, K).sum(0) if need_gb else None
        if K == 1:
            bins_a = bins_a[0] if need_ga else None
            bins_b = bins_b[0] if need_gb else None
    else:
        K = C if finest == "channel" else S
        n_outer = n // K
        # whole rows when they are short (one contiguous span per tile), else 128 columns
        block_k = triton.next_power_of_2(K) if K <= 256 else 128
        block_o = max(1, 2048 // block_k)
        k_blocks = triton.cdiv(K, block_k)
        chunks = max(1, min(triton.cdiv(n_outer, block_o), programs // k_blocks))
        o_per = triton.cdiv(triton.cdiv(n_outer, chunks), block_o) * block_o
        chunks = triton.cdiv(n_outer, o_per)
        pa = torch.empty((chunks, K) if need_ga else (1,), device=x.device, dtype=torch.float32)
        pb = torch.empty((chunks, K) if need_gb else (1,), device=x.device, dtype=torch.float32)
        _bwd_cols_kernel[(k_blocks, chunks)](
            g, x, gx, b, a, pa, pb, n_outer, K, o_per, s_c, C, S,
            BLOCK_O=block_o, BLOCK_K=block_k, num_warps=4, **flags,
        )  # fmt: skip
        bins_a = pa.sum(0) if need_ga else None
        bins_b = pb.sum(0) if need_gb else None
    grad_a = _bins_to_param(bins_a, finest, scale_mode, x, cd) if need_ga else None
    grad_b = _bins_to_param(bins_b, finest, shift_mode, x, cd) if need_gb else None
    return (gx if need_gx else None), grad_b, grad_a
