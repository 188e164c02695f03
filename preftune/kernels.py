"""Triton kernels for the elementwise work of ``preftune.fused`` and of the log-prob head on a GPU.

Eager PyTorch runs an RMSNorm as 6-7 kernels forward and ~10 backward (upcast, square, mean,
rsqrt, scale, downcast, weight product, ...), and SwiGLU's ``silu(gate) * up`` as 2 forward and 5
backward, each reading and writing whole activations. For a model of hidden size ~1000 these
memory-bound kernels took more GPU time than the matmuls in a DPO step (``docs/benchmarks.md``).
Here each is one kernel:

- ``rmsnorm_forward`` / ``rmsnorm_backward``: one program per row forward; backward, each program
  walks a block of rows and writes its float32 partial sum of the weight gradient (summed after).
- ``silu_mul`` / ``silu_mul_backward``: elementwise; the backward returns d gate, d up and, when
  asked, the recomputed product (for the down projection's weight gradient) in one pass; d gate
  may overwrite d product's memory.
- ``head_logps_forward`` / ``head_logps_backward_`` (for ``preftune.logps``' chunked head): the
  log-softmax of one chunk of logits at the targets, read once in the matmul's dtype with an online
  log-sum-exp, and its gradient written over the logits' own memory. Eager does this in float32
  with a (chunk, vocab) float32 copy and 4-6 passes over it each way.

Each kernel rounds where the eager ops round (to the activation dtype after silu, after the
weight product, ...), so results equal the eager ones up to the order of float32 sums and the
exp/rsqrt approximations: within one bfloat16 rounding (``tests/test_kernels.py`` holds them to
the eager modules). The kernels run on CUDA tensors; the tests run them on CPU tensors in Triton's
interpreter (``TRITON_INTERPRET=1`` from ``tests/conftest.py``, plus ``INTERPRET_ON_CPU``). ``usable``
says whether they apply; everything else falls back to the eager ops.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

import torch

try:  # Triton ships with PyTorch's CUDA wheels; CPU-only installs may not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Under Triton's interpreter (TRITON_INTERPRET=1 before triton is first imported) kernels run on the
# host, one program at a time: GPU tensors never take them then, CPU tensors only when a test sets
# INTERPRET_ON_CPU.
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
INTERPRET_ON_CPU = False


# The norm kernels hold one row in registers: wider rows (no known model) keep the eager ops.
MAX_NORM_WIDTH = 32768


def usable(*tensors: torch.Tensor) -> bool:
    """True when the kernels can run on these tensors: Triton is installed and every tensor is a
    plain CUDA tensor, not a tensor subclass such as DTensor (see INTERPRET_ON_CPU for the tests).
    Waits for a running ``warm_up_async`` first."""
    if _warming is not None:
        wait_warm_up()
    return _usable_now(*tensors)


def _usable_now(*tensors: torch.Tensor) -> bool:
    if triton is None or (INTERPRETED and not INTERPRET_ON_CPU):
        return False
    device = "cpu" if INTERPRETED else "cuda"
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == device for t in tensors)


logger = logging.getLogger(__name__)
_warming: threading.Thread | None = None  # the latest warm_up_async thread (it waits for the one before)


def warm_up_async(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, *, norm_width: int | None = None,
                  mlp_width: int | None = None, vocab: int | None = None,
                  heads: tuple[int, int, int] | None = None) -> bool:
    """Start Triton's one-time set-up and the kernels' compiles in a background thread, so that they
    overlap the caller's work (model loading, tokenizing) instead of stalling the first forward.

    The first kernel a process launches pays Triton's set-up (much of it hashing Triton's own library
    for cache keys, which releases the GIL), and with an empty disk cache each kernel its compile: times
    in docs/benchmarks.md ("the job's fixed costs"). The widths given compile the variants a model of those
    widths runs (SwiGLU's and the head's forward and backward, the norm's forward, the rotary embedding
    both ways for ``heads`` = (query heads, key/value heads, head dim)); without them only
    the set-up runs. Returns whether a thread started (tensors on ``device`` can take the kernels). A
    second call queues behind the first. ``usable``, which every caller asks before running a kernel,
    waits for the thread first (``wait_warm_up``), so no kernel of the caller's runs beside it; a
    failure in it is logged at debug level and met again, with its real error, by the call that
    needs the kernel.
    """
    global _warming
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cuda", "cpu") or not _usable_now(torch.empty(0, device=device)):
        return False
    before = _warming
    _warming = threading.Thread(target=_warm_up, args=(before, device, dtype, norm_width, mlp_width, vocab, heads),
                                name="preftune-triton-warm-up", daemon=True)
    _warming.start()
    return True


def wait_warm_up() -> None:
    """Block until the background warm-up (if any) is done."""
    global _warming
    thread = _warming
    if thread is not None and thread is not threading.current_thread():
        thread.join()
        if _warming is thread:
            _warming = None


def _warm_up(before, device, dtype, norm_width, mlp_width, vocab, heads) -> None:
    if before is not None:
        before.join()
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        new = functools.partial(torch.ones, dtype=dtype, device=device)
        gate = new(16, mlp_width or 1)  # without a width: the smallest launch there is, for Triton's set-up
        prod = silu_mul(gate, gate)
        if mlp_width:  # the training step's variant
            silu_mul_backward(prod, gate, gate, want_prod=True, prod_dtype=dtype, inplace=True)
        if norm_width and norm_width <= MAX_NORM_WIDTH:  # the backward's row split follows the batch: not warmed
            rmsnorm_forward(new(16, norm_width), new(norm_width), 1e-6)
        if heads and heads[2] % 2 == 0:  # rows padded to a multiple of 64 on a GPU: T = 16 specializes alike
            cos = new(2, 16, heads[2])
            for h in heads[:2]:
                x = new(2, 16, h, heads[2]).transpose(1, 2)
                rope(rope(x, cos, cos), cos, cos, backward=True, dtype=dtype)
        if vocab:
            z, targets = new(2, vocab), torch.zeros(2, dtype=torch.long, device=device)
            _, lse = head_logps_forward(z, targets)
            head_logps_backward_(z, targets, lse, torch.ones(2, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 - the call that needs the kernel raises it again
        logger.debug("Triton warm-up failed: %r", err)


if triton is not None:

    @triton.jit
    def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # eager: (x * rstd).to(input dtype)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW, stride_dy, stride_x, stride_dx, M, N, BLOCK: tl.constexpr,
                     ROWS: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid.to(tl.int64) * ROWS
        for i in range(0, ROWS):
            row = start + i
            in_row = cols < tl.where(row < M, N, 0)  # the last program's block may run past the last row
            dy = tl.load(DY + row * stride_dy + cols, mask=in_row, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
            n = x * rstd  # the normalized row, float32
            if NEED_DW:  # sum over rows of dy * n.to(x dtype), in float32 (eager rounds each product first)
                dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
            if NEED_DX:
                gn = (dy * w).to(DY.dtype.element_ty).to(tl.float32)  # d loss / d n
                dx = rstd * (gn - n * (tl.sum(gn * n, axis=0) / N))
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=in_row)
        if NEED_DW:
            tl.store(DW + pid.to(tl.int64) * N + cols, dw, mask=mask)

    @triton.jit
    def _round(x, MODE: tl.constexpr):
        """x (float32) rounded to the result dtype's precision, kept in float32. MODE 1, bfloat16:
        round-to-nearest-even done on the bits (a float32 -> bfloat16 -> float32 round trip did not give
        eager's results on an H200, and the interpreter truncates); 2: float16 (a cast there and back);
        0: float32."""
        if MODE == 1:
            bits = x.to(tl.uint32, bitcast=True)
            r = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            return tl.where(x != x, x, r.to(tl.float32, bitcast=True))
        elif MODE == 2:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _rope(X, C, S, Y, T, H, sxb, sxh, sxt, syb, syh, syt, scb, sct, ssb, sst, HALF: tl.constexpr,
              BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr, MODE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one (batch row, position): every head of it
        b, t = row // T, row % T
        d = tl.arange(0, BLOCK_D)
        h = tl.arange(0, BLOCK_H)
        in_d = d < HALF
        mask = (h[:, None] < H) & in_d[None, :]
        c1 = tl.load(C + b * scb + t * sct + d, mask=in_d, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(C + b * scb + t * sct + HALF + d, mask=in_d, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(S + b * ssb + t * sst + d, mask=in_d, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(S + b * ssb + t * sst + HALF + d, mask=in_d, other=0.0).to(tl.float32)[None, :]
        x = X + b * sxb + t * sxt + h[:, None] * sxh + d[None, :]
        x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
        # eager rounds each product, then their sum, to the result's dtype
        if BACKWARD:  # the transpose: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
            y1 = _round(_round(x1 * c1, MODE) + _round(x2 * s2, MODE), MODE)
            y2 = _round(_round(x2 * c2, MODE) - _round(x1 * s1, MODE), MODE)
        else:  # q * cos + cat(-q2, q1) * sin
            y1 = _round(_round(x1 * c1, MODE) - _round(x2 * s1, MODE), MODE)
            y2 = _round(_round(x2 * c2, MODE) + _round(x1 * s2, MODE), MODE)
        y = Y + b * syb + t * syt + h[:, None] * syh + d[None, :]
        tl.store(y, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(y + HALF, y2.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu(g):
        return g / (1.0 + tl.exp(-g))

    @triton.jit
    def _silu_mul_fwd(G, U, P, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        act = _silu(g).to(G.dtype.element_ty).to(tl.float32)  # eager: silu(gate) in gate's dtype
        tl.store(P + offs, (act * u).to(P.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_bwd(DP, G, U, P, DG, DU, n, BLOCK: tl.constexpr, STORE_P: tl.constexpr,
                      NEED_DG: tl.constexpr, NEED_DU: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dp = tl.load(DP + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        denom = 1.0 + tl.exp(-g)
        sig = 1.0 / denom
        act = (g / denom).to(G.dtype.element_ty).to(tl.float32)  # the forward's silu, to the bit
        if STORE_P:
            tl.store(P + offs, (act * u).to(P.dtype.element_ty), mask=mask)
        if NEED_DG:  # eager: silu_backward(dp * up, gate)
            t = (dp * u).to(DP.dtype.element_ty).to(tl.float32)
            tl.store(DG + offs, (t * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
        if NEED_DU:
            tl.store(DU + offs, (dp * act).to(DU.dtype.element_ty), mask=mask)

    @triton.jit
    def _capped(z, scale, softcap, HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr):
        """(logit, tanh(logit / softcap)) of the float32 head output z: z * scale, then softcap * tanh(. / softcap)."""
        if HAS_SCALE:
            z = z * scale
        t = z  # unused without soft-capping
        if HAS_CAP:
            e = tl.exp(-2.0 * tl.abs(z / softcap))  # tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): no overflow
            t = tl.where(z < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)
            z = softcap * t
        return z, t

    @triton.jit
    def _head_fwd(Z, T, OUT, LSE, stride_z, scale, softcap, V: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):  # V constexpr: one compile per vocabulary
        row = tl.program_id(0).to(tl.int64)
        base = Z + row * stride_z
        cols = tl.arange(0, BLOCK)
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)  # running max (a float32 scalar)
        s = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)  # running sum of exp(z - m)
        for start in range(0, V, BLOCK):
            idx = start + cols
            z, _t = _capped(tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32), scale, softcap,
                            HAS_SCALE, HAS_CAP)
            z = tl.where(idx < V, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far: nothing to rescale
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
            m = m_new
        lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(s)
        tgt = tl.load(T + row)
        ok = (tgt >= 0) & (tgt < V)  # a target outside the vocabulary gives nan (the trainer's non-finite check)
        zt, _t = _capped(tl.load(base + tl.where(ok, tgt, 0)).to(tl.float32), scale, softcap, HAS_SCALE, HAS_CAP)
        tl.store(OUT + row, tl.where(ok, zt - lse, float("nan")))
        tl.store(LSE + row, lse)

    @triton.jit
    def _head_bwd(Z, T, LSE, G, stride_z, scale, softcap, V: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):  # d logits written over Z
        row = tl.program_id(0).to(tl.int64)
        idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < V
        z, t = _capped(tl.load(Z + row * stride_z + idx, mask=mask, other=0.0).to(tl.float32), scale, softcap,
                       HAS_SCALE, HAS_CAP)
        d = tl.where(idx == tl.load(T + row), 1.0, 0.0) - tl.exp(z - tl.load(LSE + row))  # onehot - softmax
        g = tl.load(G + row)
        if HAS_SCALE:
            g = g * scale
        d = d * g
        if HAS_CAP:
            d = d * (1.0 - t * t)
        tl.store(Z + row * stride_z + idx, d.to(Z.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dim) with a unit stride along the last dim (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.cache
def _sm_count(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count if device_index is not None else 1


def _rows_per_program(rows: int, device: torch.device) -> int:
    """Rows each backward program walks: about four programs per multiprocessor, a power of two in
    [16, 256] (few compiled variants; the float32 partial weight gradients stay small)."""
    want = -(-rows // (4 * _sm_count(device.index if device.type == "cuda" else None)))
    return min(256, max(16, triton.next_power_of_2(max(want, 1))))


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` -> (y, rstd (rows,) float32)."""
    n = x.shape[-1]
    x2 = _rows(x)
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        _rmsnorm_fwd[(x2.shape[0],)](x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0), n, eps,
                                      BLOCK=triton.next_power_of_2(n))
    return y.view(*x.shape[:-1], n), rstd


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, *,
                     need_dx: bool = True, need_dw: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d x, d weight) of ``rmsnorm_forward`` given d y; d weight is summed in float32."""
    n = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    rows = x2.shape[0]
    per_program = _rows_per_program(rows, x.device)
    programs = -(-rows // per_program)
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if need_dx else None
    partial = torch.empty(programs, n, dtype=torch.float32, device=x.device) if need_dw else None
    if rows:
        _rmsnorm_bwd[(programs,)](dy2, x2, weight.contiguous(), rstd, dx if need_dx else x2,
                                  partial if need_dw else rstd, dy2.stride(0), x2.stride(0),
                                  dx.stride(0) if need_dx else 0, rows, n, BLOCK=triton.next_power_of_2(n),
                                  ROWS=per_program, NEED_DX=need_dx, NEED_DW=need_dw)
    dw = None
    if need_dw:
        dw = partial.sum(0).to(weight.dtype) if rows else torch.zeros_like(weight)
    return (dx.view(x.shape) if need_dx else None), dw


_BLOCK = 1024


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (same shapes) in one pass."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = gate.numel()
    if n:
        _silu_mul_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK)
    return out


def silu_mul_backward(dprod: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, need_gate: bool = True,
                      need_up: bool = True, want_prod: bool = False, prod_dtype: torch.dtype | None = None,
                      inplace: bool = False):
    """(prod or None, d gate, d up) of ``silu_mul`` given d prod, in one pass. ``prod`` is the
    recomputed ``silu(gate) * up`` in ``prod_dtype`` (for the next matmul's weight gradient).
    inplace=True writes d gate into ``dprod`` (when the dtypes agree) instead of new memory."""
    dprod, gate, up = dprod.contiguous(), gate.contiguous(), up.contiguous()
    n = gate.numel()
    prod = torch.empty(gate.shape, dtype=prod_dtype or torch.promote_types(gate.dtype, up.dtype),
                       device=gate.device) if want_prod else None
    dgate = None
    if need_gate:
        dgate = dprod if inplace and dprod.dtype == gate.dtype else torch.empty_like(gate)
    dup = torch.empty_like(up) if need_up else None
    if n:
        _silu_mul_bwd[(triton.cdiv(n, _BLOCK),)](dprod, gate, up, prod if want_prod else gate,
                                                 dgate if need_gate else gate, dup if need_up else up, n,
                                                 BLOCK=_BLOCK, STORE_P=want_prod, NEED_DG=need_gate,
                                                 NEED_DU=need_up)
    return prod, dgate, dup


def rope_usable(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether ``rope`` takes these shapes: x (B, H, T, D), cos and sin (B or 1, T, D), D even."""
    return (x.dim() == 4 and cos.dim() == 3 and x.shape[-1] % 2 == 0 and cos.shape[-1] == x.shape[-1]
            and cos.shape[1] == x.shape[2] and cos.shape[0] in (1, x.shape[0]) and x.shape[1] <= 1024)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backward: bool = False,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotary embedding of x (B, H, T, D) with cos, sin (B or 1, T, D), as transformers' Llama does it:
    ``x * cos + cat(-x2, x1) * sin`` (x1, x2 the halves of D), each product and the sum rounded to
    the result's dtype (``dtype``, default the promoted one) as the eager ops round. backward=True:
    the gradient of that map at d y = x, ``d y * cos + cat(d y2, -d y1) * sin`` term by term. The
    result has x's strides (the transposed projection layout stays as it is)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = (c if c.stride(-1) == 1 else c.contiguous() for c in (cos, sin))
    out = torch.empty_like(x, dtype=dtype or torch.promote_types(x.dtype, cos.dtype))
    B, H, T, D = x.shape
    if x.numel():
        cb = cos.stride(0) if cos.shape[0] > 1 else 0
        sb = sin.stride(0) if sin.shape[0] > 1 else 0
        _rope[(B * T,)](x, cos, sin, out, T, H, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
                        out.stride(2), cb, cos.stride(1), sb, sin.stride(1), HALF=D // 2,
                        BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D // 2), BACKWARD=backward,
                        MODE={torch.bfloat16: 1, torch.float16: 2}.get(out.dtype, 0))
    return out


_HEAD_BLOCK = 4096


def _head_args(z: torch.Tensor, scale: float | None, softcap: float | None) -> dict:
    return dict(scale=1.0 if scale is None else float(scale), softcap=1.0 if softcap is None else float(softcap),
                HAS_SCALE=scale is not None, HAS_CAP=softcap is not None,
                BLOCK=min(_HEAD_BLOCK, triton.next_power_of_2(z.shape[1])))


def head_logps_forward(z: torch.Tensor, targets: torch.Tensor, scale: float | None = None,
                       softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs and log-sum-exps of one chunk of head outputs z (n, V) in their own dtype
    (the matmul's): logits = softcap * tanh(z * scale / softcap) in float32, then
    (logits[k, targets[k]] - logsumexp(logits[k]), logsumexp(logits[k])), both (n,) float32.
    One read of z (an online log-sum-exp per row); no float32 (n, V) copy."""
    n, v = z.shape
    out = torch.empty(n, dtype=torch.float32, device=z.device)
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    if n:
        _head_fwd[(n,)](z, targets.contiguous(), out, lse, z.stride(0), V=v, **_head_args(z, scale, softcap))
    return out, lse


def head_logps_backward_(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                         scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """d loss / d z of ``head_logps_forward`` given d loss / d token log-prob ``grad`` (n,) float32,
    written over z (same dtype, z is returned): (onehot(target) - softmax) * grad, chained through
    soft-capping and scaling in float32, rounded to z's dtype once."""
    n, v = z.shape
    if n:
        args = _head_args(z, scale, softcap)
        _head_bwd[(n, triton.cdiv(v, args["BLOCK"]))](z, targets.contiguous(), lse, grad.contiguous(), z.stride(0),
                                                       V=v, **args)
    return z
