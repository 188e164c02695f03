"""Leaner backward for Llama-family layers: the SwiGLU MLP and RMSNorm.

MLP, ``down_proj(silu(gate_proj(x)) * up_proj(x))``:

Run eagerly, autograd keeps four (tokens, intermediate) tensors per layer for backward: ``gate``
(for silu), ``silu(gate)`` and ``up`` (for the product) and the product (for down_proj's weight
gradient). ``_SwiGLUDown`` keeps only ``gate`` and ``up`` and recomputes the other two in backward,
elementwise work next to three matmuls. The values are the same ops on the same inputs, so the
results equal the eager ones (the tests hold them to it, values and every parameter gradient).
For SmolLM2-135M (intermediate 1536, hidden 576) that is 12 KB less per token per layer, about
a third of the activations a step keeps.

RMSNorm, ``weight * (x * rsqrt(mean(x^2) + eps))``: eager autograd keeps x (float32) and the
normalized x; ``_RMSNorm`` keeps x in its own dtype and the (tokens, 1) rsqrt, and rebuilds the
normalized x in backward (the gradient formula is written out, so it equals autograd's to rounding).

``fuse_layers(model)`` swaps the ``forward`` of each such module instance (the classes in
``SWIGLU_MLP_CLASSES`` with ``hidden_act`` silu, and ``RMSNORM_CLASSES``); nothing else in the
model changes, and ``unfuse_layers`` puts the class forwards back. A peft LoRA ``down_proj`` joins
the fusion too (``base(prod) + scaling * B(A(drop(prod)))`` in the same node, which keeps the (tokens,
r) ``A(prod)`` and, with the dropout on, its one-byte keep-mask, and rebuilds the product for A's
gradient): otherwise its A would keep the (tokens, intermediate) product, 2.6 GB of a 0.5B model's
batch of 8 x 1408 tokens in bfloat16. Other down_projs (DoRA, a bias, ...) keep their own module;
only silu(gate) * up is fused then (``_SiluMul``).
Without autograd (inference, the reference pass) the class forwards run.

``fuse_layers(..., recompute_mlp=True)`` (opt-in): an MLP of three plain projections keeps only its
input and makes gate and up again in backward (``_SwiGLURecompute``): two (tokens, intermediate)
tensors less per layer for two more matmuls per layer in backward.

``recompute_norm_outputs()`` (on in ``model_logps``'s forwards with autograd): the norm's output,
which the next projections keep for their backward (q/k/v, gate/up, LoRA's A), is made again in
backward from the norm's input instead: two (tokens, hidden) tensors less per decoder layer.

peft LoRA ``Linear`` (kind "lora"): ``addmm(base(x), A(x), B^T, alpha=scaling)``, see
``_lora_linear_forward``: no scaled or summed copies, and the input is read as it is instead of
through a float32 copy and back (which peft keeps, in bfloat16, per adapted layer under autocast).

On a GPU (``fuse_layers(..., triton=True)``, the trainer's ``triton_kernels``), the elementwise
work of both runs as ``preftune.kernels`` Triton kernels: one per RMSNorm and per silu(gate) * up
forward (with or without autograd) and one each in backward, in place of 2-10 eager kernels.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from preftune import kernels

SWIGLU_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
RMSNORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# their modeling modules' apply_rotary_pos_emb is the rotate-half form that kernels.rope computes
ATTENTION_CLASSES = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"})
RECOMPUTE_MLP = "_preftune_recompute_mlp"  # attribute on a fused MLP: _SwiGLURecompute (fuse_layers(recompute_mlp=))


def _matmul_dtype(t: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would run in here: autocast's when it is on, else the promoted one."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(t.dtype, weight.dtype)


def _silu_mul_backward(grad, gate, up, act, need_gate: bool, need_up: bool):
    """Gradients of silu(gate) * up given d loss / d product; act = silu(gate). Eager's own formulas."""
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if need_gate else None
    grad_up = grad * act if need_up else None
    return grad_gate, grad_up


def _add_adapter(result: torch.Tensor, x: torch.Tensor, a, b, scaling: float, dt: torch.dtype):
    """(``addmm(result, x @ a^T, b^T, alpha=scaling)`` in dt, back in result's dtype; ``x @ a^T``), x in dt:
    a LoRA adapter's product, scaling and sum in one matmul."""
    xa = F.linear(x, a.to(dt))
    out = torch.addmm(result.reshape(-1, result.shape[-1]).to(dt), xa.reshape(-1, xa.shape[-1]), b.to(dt).t(),
                      alpha=scaling)
    return out.view(result.shape).to(result.dtype), xa


def _adapter_grads(g: torch.Tensor, xa: torch.Tensor, b, scaling: float, need_b: bool):
    """(d loss / d xa, d loss / d b) of ``_add_adapter`` given the (rows, out) output gradient in xa's dtype."""
    grad_b = (scaling * (g.t() @ xa.reshape(-1, xa.shape[-1]))).to(b.dtype) if need_b else None
    return scaling * (g @ b.to(g.dtype)), grad_b


def _fused_dropout(t: torch.Tensor) -> bool:
    """Whether torch's dropout takes its fused kernel for t (``native_dropout``) rather than a noise tensor."""
    return t.is_cuda or t.device.type == "xpu"


def _drop(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Dropout(p)`` in training drawn as torch draws it, and its keep-mask (bool, one byte an
    element) to make it again: the fused kernel on a GPU (``native_dropout``), a Bernoulli noise tensor
    on CPU (``at::dropout``'s own choice), so the random stream and the values are eager's."""
    if _fused_dropout(x):
        return torch.ops.aten.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p)
    keep = noise.bool()
    return x * noise.div_(1 - p), keep


def _drop_again(t: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """``t * keep / (1 - p)`` as the dropout computes it: its backward for t = the output's gradient, and
    its forward's output again for t = x. On CPU the same noise tensor, bit for bit (tested). On a GPU
    the dropout's own backward kernel, whose arithmetic (one float32 product, one rounding) is its
    forward's as torch writes them; not yet run there."""
    if _fused_dropout(t):
        return torch.ops.aten.native_dropout_backward(t, keep, 1.0 / (1.0 - p))
    return t * keep.to(t.dtype).div_(1 - p)


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up (one Triton kernel each way when ``triton``)."""

    @staticmethod
    def forward(ctx, gate, up, triton):
        ctx.save_for_backward(gate, up)
        ctx.triton = triton
        return kernels.silu_mul(gate, up) if triton else F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        need_gate, need_up, _ = ctx.needs_input_grad
        if ctx.triton:
            _, grad_gate, grad_up = kernels.silu_mul_backward(grad, gate, up, need_gate=need_gate, need_up=need_up)
            return grad_gate, grad_up, None
        return (*_silu_mul_backward(grad, gate, up, F.silu(gate), need_gate, need_up), None)


class _SwiGLUDown(torch.autograd.Function):
    """F.linear(silu(gate) * up, weight), saving only gate, up and the weight; with a LoRA
    ``down_proj`` (a, b, scaling given) ``addmm(base, prod @ a^T, b^T, alpha=scaling)`` as the lean
    LoRA linear computes it, saving also the (tokens, r) ``prod @ a^T``: the (tokens, intermediate)
    product, which the adapter's A reads, is rebuilt in backward like the base weight's gradient's.

    The matmuls run in the dtype F.linear would use (autocast's under autocast), with autocast
    off inside, so forward and backward do the same casts as the eager module.
    """

    @staticmethod
    def forward(ctx, gate, up, weight, a, b, scaling, triton, p=0.0):
        dt = _matmul_dtype(gate, weight)
        # the adapter in the lean LoRA linear's dtype: autocast's, else the base output's promoted with a's
        dta = dt if a is None or torch.is_autocast_enabled(gate.device.type) else torch.promote_types(dt, a.dtype)
        keep = None
        with torch.autocast(gate.device.type, enabled=False):
            prod = kernels.silu_mul(gate, up) if triton else F.silu(gate) * up
            out = F.linear(prod.to(dt), weight.to(dt))
            xa = None
            if a is not None:
                if p:  # the adapter's dropout: only its keep-mask is kept, the dropped product is made again
                    dropped, keep = _drop(prod, p)
                else:
                    dropped = prod
                out, xa = _add_adapter(out, dropped.to(dta), a, b, scaling, dta)
        ctx.save_for_backward(gate, up, weight, a, b, xa, keep)
        ctx.dt, ctx.triton, ctx.scaling, ctx.p = dt, triton, scaling, p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight, a, b, xa, keep = ctx.saved_tensors
        grads = _swiglu_down_backward(grad_out, gate, up, weight, a, b, xa, keep, ctx.dt, ctx.triton, ctx.scaling,
                                      ctx.p, ctx.needs_input_grad[:5])
        return (*grads, None, None, None)


def _swiglu_down_backward(grad_out, gate, up, weight, a, b, xa, keep, dt, triton, scaling, p, needs):
    """``_SwiGLUDown``'s gradients (gate, up, weight, a, b) from its saved tensors; ``needs`` says which."""
    need_gate, need_up, need_w, need_a, need_b = needs
    grad_gate = grad_up = grad_w = grad_a = grad_b = grad_xa = None
    pdt = torch.promote_types(gate.dtype, up.dtype)
    want_prod = need_w or need_a
    with torch.autocast(gate.device.type, enabled=False):
        g = grad_out.to(dt).reshape(-1, grad_out.shape[-1])
        if a is not None:  # the adapter: d xa and d b from the output gradient alone
            ga = grad_out.to(xa.dtype).reshape(-1, grad_out.shape[-1])
            grad_xa, grad_b = _adapter_grads(ga, xa, b, scaling, need_b)

        def d_prod():  # d loss / d prod: the base weight's share plus the adapter's
            gp = (g @ weight.to(dt)).to(pdt)
            if grad_xa is None:
                return gp
            ga_prod = (grad_xa @ a.to(grad_xa.dtype)).to(pdt)
            return gp + (ga_prod if keep is None else _drop_again(ga_prod, keep.view(ga_prod.shape), p))

        prod = None
        if triton:  # one pass: the product for the weight gradients, d gate (into d prod's memory), d up
            if need_gate or need_up:
                prod, grad_gate, grad_up = kernels.silu_mul_backward(
                    d_prod().view(gate.shape), gate, up, need_gate=need_gate, need_up=need_up,
                    want_prod=want_prod, prod_dtype=dt, inplace=True)
            elif want_prod:
                prod = kernels.silu_mul(gate, up).to(dt)
        else:
            act = F.silu(gate)
            if want_prod:
                prod = (act * up).to(dt)
            if need_gate or need_up:
                grad_gate, grad_up = _silu_mul_backward(d_prod().view(gate.shape), gate, up, act, need_gate,
                                                        need_up)
        if want_prod:
            prod = prod.reshape(-1, prod.shape[-1])
        if need_w:
            grad_w = (g.t() @ prod).to(weight.dtype)
        if need_a:
            read = prod if keep is None else _drop_again(prod.to(pdt), keep.view(prod.shape), p)
            grad_a = (grad_xa.t() @ read.to(grad_xa.dtype)).to(a.dtype)
    return grad_gate, grad_up, grad_w, grad_a, grad_b


class _SwiGLURecompute(torch.autograd.Function):
    """The whole SwiGLU MLP of plain projections, ``F.linear(silu(x Wg^T) * (x Wu^T), Wd)``, keeping only
    its input x (which ``recompute_norm_outputs`` does not keep either: it is the norm's output) and
    making gate and up again in backward: two (tokens, hidden) x (hidden, intermediate) matmuls more
    per layer in backward, two (tokens, intermediate) tensors less kept (``recompute_mlp``).

    The same ops as the eager projections (autocast's dtype, autocast off inside): gate and up made
    again are bit for bit the forward's, so the gradients are ``_SwiGLUDown``'s.
    """

    @staticmethod
    def forward(ctx, x, wg, wu, wd, triton):
        autocast = torch.is_autocast_enabled(x.device.type)
        dt = _matmul_dtype(x, wg)  # the projections' dtype; down_proj's below, as F.linear on the product
        with torch.autocast(x.device.type, enabled=False):
            gate, up = _gate_up(x, wg, wu, dt)
            prod = kernels.silu_mul(gate, up) if triton else F.silu(gate) * up
            dd = dt if autocast else torch.promote_types(gate.dtype, wd.dtype)  # as _SwiGLUDown's
            out = F.linear(prod.to(dd), wd.to(dd))
        ctx.save_for_backward(x, wg, wu, wd)
        ctx.dt, ctx.dd, ctx.triton = dt, dd, triton
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, wg, wu, wd = ctx.saved_tensors
        dt = ctx.dt
        need_x, need_wg, need_wu, need_wd = ctx.needs_input_grad[:4]
        with torch.autocast(x.device.type, enabled=False):
            gate, up = _gate_up(x, wg, wu, dt)
            grad_gate, grad_up, grad_wd, _, _ = _swiglu_down_backward(
                grad_out, gate, up, wd, None, None, None, None, ctx.dd, ctx.triton, 1.0, 0.0,
                (True, True, need_wd, False, False))
            del gate, up
            xd = x.to(dt).reshape(-1, x.shape[-1])
            gg, gu = grad_gate.reshape(-1, grad_gate.shape[-1]), grad_up.reshape(-1, grad_up.shape[-1])
            grad_wg = (gg.t() @ xd).to(wg.dtype) if need_wg else None
            grad_wu = (gu.t() @ xd).to(wu.dtype) if need_wu else None
            grad_x = None
            if need_x:  # as autograd: each projection's input gradient cast back to x's dtype, then summed
                grad_x = ((gg @ wg.to(dt)).to(x.dtype) + (gu @ wu.to(dt)).to(x.dtype)).view(x.shape)
        return grad_x, grad_wg, grad_wu, grad_wd, None


def _gate_up(x, wg, wu, dt):
    xd = x.to(dt)
    return F.linear(xd, wg.to(dt)), F.linear(xd, wu.to(dt))


def _rmsnorm_value(x, weight, eps: float, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * (x * rstd).to(x.dtype), rstd): ``_RMSNorm``'s forward, also its recompute."""
    if triton:
        return kernels.rmsnorm_forward(x, weight, eps)
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


class _NormOutput:
    """One RMSNorm output under ``recompute_norm_outputs``: weak references to it and to the tensor its
    storage came with (an id is theirs while they live), what makes it again, and the value made
    again in backward."""

    __slots__ = ("ref", "owner", "dtype", "x", "x_version", "weight", "eps", "triton", "value", "__weakref__")

    def __init__(self, y, x, weight, eps, triton):
        # owner: the tensor y's storage came with (y, or what y is a view of: the kernel's 2-D output)
        self.ref, self.owner = weakref.ref(y), weakref.ref(y if y._base is None else y._base)
        self.dtype = y.dtype
        self.x, self.x_version, self.weight, self.eps, self.triton = x, x._version, weight, eps, triton
        self.value = None

    def recomputed(self) -> torch.Tensor:
        if self.value is None:
            if self.x._version != self.x_version:
                raise RuntimeError("recompute_norm_outputs: an RMSNorm's input was modified in place after the "
                                   "forward; its output cannot be made again for backward")
            with torch.no_grad():
                self.value = _rmsnorm_value(self.x, self.weight, self.eps, self.triton)[0]
        return self.value


_norm_outputs: dict[int, _NormOutput] | None = None  # by id of the output, while recompute_norm_outputs is on


@contextlib.contextmanager
def recompute_norm_outputs():
    """While on, a fused RMSNorm's output that a later op keeps for backward (the q/k/v or gate/up
    projections' input, the LoRA adapters' A) is not kept: backward makes it again from the norm's
    input, which the norm keeps anyway, with the same kernel (bit for bit the same values), once for
    all the ops that read it. Two (tokens, hidden) tensors less per decoder layer. Other saved tensors
    are kept as they are; under gradient checkpointing the checkpoint's own hooks take precedence."""
    global _norm_outputs
    if _norm_outputs is not None:  # already on (an outer forward)
        yield
        return
    outputs: dict[int, _NormOutput] = {}

    def pack(t):
        # the output itself, or a view of it (a linear's 2-D view of its 3-D input), whose _base is the
        # tensor the output's storage came with (the output, or the one it is a view of)
        entry = outputs.get(id(t))
        if entry is None or entry.ref() is not t:  # (an id of a freed tensor, reused)
            base = t._base
            if base is None or (entry := outputs.get(id(base))) is None or entry.owner() is not base:
                return t
        if t.dtype != entry.dtype:  # a view as another dtype
            return t
        return entry, t.size(), t.stride(), t.storage_offset()

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        entry, size, stride, offset = packed
        return entry.recomputed().as_strided(size, stride, offset)

    _norm_outputs = outputs
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _norm_outputs = None
        # autograd keeps the hooks with what they packed: emptied, so an output made again in backward
        # lives only until the last op that read it has run its backward
        outputs.clear()


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rstd).to(x.dtype), rstd = rsqrt(mean(x^2) + eps) in float32; saves x, weight, rstd.
    With ``triton`` forward and backward are one Triton kernel each."""

    @staticmethod
    def forward(ctx, x, weight, eps, triton):
        y, rstd = _rmsnorm_value(x, weight, eps, triton)
        ctx.save_for_backward(x, weight, rstd)
        ctx.triton = triton
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if ctx.triton:
            grad_x, grad_w = kernels.rmsnorm_backward(grad, x, weight, rstd, need_dx=need_x, need_dw=need_w)
            return grad_x, grad_w, None, None
        n = x.float() * rstd  # the normalized x, float32
        grad_x = grad_w = None
        if need_w:
            grad_w = (grad * n.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        if need_x:
            gn = (grad * weight).float()  # d loss / d n
            # d n / d x = rstd * (I - n n^T / H): grad_x = rstd * (gn - n * mean(gn * n))
            grad_x = (rstd * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None, None


class _Rope(torch.autograd.Function):
    """transformers' ``apply_rotary_pos_emb`` for q and k as two kernels each way (eager: ~14 forward
    and ~16 backward per layer); cos and sin are the model's, shared by every layer, kept by reference."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = q.dtype, k.dtype
        return kernels.rope(q, cos, sin), kernels.rope(k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        grads = [None if g is None or not need else kernels.rope(g, cos, sin, backward=True, dtype=dt)
                 for g, need, dt in zip((dq, dk), ctx.needs_input_grad, ctx.dtypes)]
        return grads[0], grads[1], None, None


_rope_on = 0  # > 0 inside fast_rope(): the patched apply_rotary_pos_emb may take the kernels


@contextlib.contextmanager
def fast_rope():
    """Within: the ``apply_rotary_pos_emb`` of the modeling modules ``fuse_layers(triton=True)`` patched
    runs as ``preftune.kernels.rope`` where the tensors allow (``model_logps`` turns it on for the
    forwards of a model marked for the Triton kernels, ``logps.use_triton_head``). Outside, and for
    any other caller, those functions are transformers' own."""
    global _rope_on
    _rope_on += 1
    try:
        yield
    finally:
        _rope_on -= 1


def _rope_entry(original):
    """The modeling module's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``, with the kernels
    inside ``fast_rope()``; every other call (other arguments, CPU tensors, a cos that needs a gradient)
    goes to ``original``."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if (_rope_on and not args and kwargs.get("unsqueeze_dim", 1) == 1 and len(kwargs) <= 1
                and not (cos.requires_grad or sin.requires_grad) and kernels.usable(q, k, cos, sin)
                and kernels.rope_usable(q, cos) and kernels.rope_usable(k, cos) and sin.shape == cos.shape):
            return _Rope.apply(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._preftune_original = original
    return apply_rotary_pos_emb


def _patch_rope(module: nn.Module) -> bool:
    """Patch the ``apply_rotary_pos_emb`` that a Llama-family attention module's own modeling module
    calls (once per modeling module); True if it is patched now."""
    if type(module).__name__ not in ATTENTION_CLASSES:
        return False
    namespace = sys.modules.get(type(module).__module__)
    fn = getattr(namespace, "apply_rotary_pos_emb", None)
    if fn is None or not callable(fn):
        return False
    if not hasattr(fn, "_preftune_original"):
        namespace.apply_rotary_pos_emb = _rope_entry(fn)
    return True


def _use_triton(module: nn.Module, *tensors: torch.Tensor) -> bool:
    return getattr(module, "_preftune_triton", False) and kernels.usable(*tensors)


def _rmsnorm_forward(self, x):
    triton = x.shape[-1] <= kernels.MAX_NORM_WIDTH and _use_triton(self, x, self.weight)
    if not torch.is_grad_enabled():
        return kernels.rmsnorm_forward(x, self.weight, self.variance_epsilon)[0] if triton else type(self).forward(self, x)
    y = _RMSNorm.apply(x, self.weight, self.variance_epsilon, triton)
    if _norm_outputs is not None and y.is_contiguous() and y.storage_offset() == 0:
        entry = _NormOutput(y, x, self.weight, self.variance_epsilon, triton)
        _norm_outputs[id(y)] = _norm_outputs[id(entry.owner())] = entry
    return y


def _swiglu_forward(self, x):
    triton = _use_triton(self, x)
    if not torch.is_grad_enabled() and not triton:
        return type(self).forward(self, x)
    if torch.is_grad_enabled() and getattr(self, RECOMPUTE_MLP, False) and _plain_mlp(self):  # still plain
        return _SwiGLURecompute.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, triton)
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if not torch.is_grad_enabled():
        return down(kernels.silu_mul(gate, up))
    if type(down) is nn.Linear and down.bias is None:
        return _SwiGLUDown.apply(gate, up, down.weight, None, None, 1.0, triton)
    name = _lean_adapter(down) if _is_lora_linear(down) and down.base_layer.bias is None else None
    p = _dropout_p(down.lora_dropout[name]) if name is not None else None
    if p is not None:
        # a LoRA down_proj: its A reads the product (dropped, with its dropout on), which is rebuilt in
        # backward from gate, up (and the dropout's keep-mask), not kept
        return _SwiGLUDown.apply(gate, up, down.base_layer.weight, down.lora_A[name].weight,
                                 down.lora_B[name].weight, down.scaling[name], triton, p)
    return down(_SiluMul.apply(gate, up, triton))


_NO_CONTEXT = contextlib.nullcontext()


def _lora_linear_forward(self, x, *args, **kwargs):
    """peft ``lora.Linear``: ``base(x) + scaling * B(A(dropout(x)))`` as ``addmm(base(x), A(x), B^T,
    alpha=scaling)``: the adapter's product, scaling and sum in one matmul, in the dtype the base
    layer's matmul uses (autocast's under mixed precision). peft's own forward writes B's output,
    its scaled copy and the sum as three activation-sized tensors, and with float32 adapters under
    autocast first casts x to float32 and back: two more copies per adapted layer, the bfloat16 one
    kept for backward, so q, k and v each keep their own copy of one input. Here A's matmul reads
    x itself (kept once however many adapted layers read it). Anything else (adapters
    disabled or merged, several active adapters, DoRA and other variants, a bias on B, extra
    arguments) runs peft's forward."""
    if self._disable_adapters and not self.merged and not args and not kwargs:
        return self.base_layer(x)  # what peft's forward does then, without its argument checks
    name = None if args or kwargs else _lean_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    dt = _matmul_dtype(result, a)
    drop = self.lora_dropout[name]
    # the autocast switch and an identity dropout's module call only where they do something (host
    # time: 168 adapted layers run this twice a step)
    with torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else _NO_CONTEXT:
        if type(drop) is not nn.Identity and torch.is_grad_enabled():
            p = _dropout_p(drop)
            if p:  # keeps x (one tensor for every adapter that reads it) and a one-byte mask, not a dropped copy
                return _KeptInputAdapter.apply(result, x, a, b, self.scaling[name], dt, p)
        xin = x if type(drop) is nn.Identity else drop(x)
        if xin.dtype != dt and torch.is_grad_enabled():
            return _KeptInputAdapter.apply(result, xin, a, b, self.scaling[name], dt)
        return _add_adapter(result, xin.to(dt), a, b, self.scaling[name], dt)[0]


class _KeptInputAdapter(torch.autograd.Function):
    """``addmm(result.to(dt), drop(x).to(dt) @ a^T, b^T, alpha=scaling).to(result.dtype)`` keeping x as it
    is, with ``drop`` a LoRA dropout in training (0 < p < 1) or none (p = 0). Eager autograd keeps, per
    adapted layer (three for q, k and v's one input), the copy A's matmul reads: x cast to the adapter's
    dtype where it differs from x's (a bfloat16 model with peft's float32 adapters and no autocast,
    float32 inputs under autocast), the dropped x and the dropout's noise or mask with dropout on. Here
    only x and, with dropout, its one-byte keep-mask are kept; the cast and the dropped x are made again
    in backward (``_drop_again``)."""

    @staticmethod
    def forward(ctx, result, x, a, b, scaling, dt, p=0.0):
        dropped, keep = _drop(x, p) if p else (x, None)
        out, xa = _add_adapter(result, dropped.to(dt), a, b, scaling, dt)
        ctx.save_for_backward(x, keep, a, b, xa)
        ctx.scaling, ctx.p, ctx.dt, ctx.result_dtype = scaling, p, dt, result.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, keep, a, b, xa = ctx.saved_tensors
        dt = ctx.dt
        need_result, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        g = grad.reshape(-1, grad.shape[-1]).to(dt)
        grad_result = g.view(grad.shape).to(ctx.result_dtype) if need_result else None
        grad_xa, grad_b = _adapter_grads(g, xa, b, ctx.scaling, need_b)
        grad_x = grad_a = None
        if need_x:
            grad_x = (grad_xa @ a.to(dt)).view(x.shape).to(x.dtype)
            if keep is not None:
                grad_x = _drop_again(grad_x, keep, ctx.p)
        if need_a:
            read = x if keep is None else _drop_again(x, keep, ctx.p)
            grad_a = (grad_xa.t() @ read.reshape(-1, x.shape[-1]).to(dt)).to(a.dtype)
        return grad_result, grad_x, grad_a, grad_b, None, None, None


def _lean_adapter(layer: nn.Module) -> str | None:
    """The name of a peft LoRA ``Linear``'s adapter when the layer computes ``base(x) + scaling * B(A(x))``
    and nothing else: adapters on and not merged, one active adapter, plain LoRA (no DoRA or other
    variant), no bias on B, an ``nn.Linear`` base. None otherwise."""
    names = layer.active_adapters
    name = names[0] if len(names) == 1 else None
    if (layer.disable_adapters or layer.merged or name not in layer.lora_A
            or name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name)
            or layer.lora_B[name].bias is not None or type(layer.base_layer) is not nn.Linear):
        return None
    return name


def _dropout_p(drop: nn.Module) -> float | None:
    """The probability a LoRA dropout module drops with now: 0.0 when it is off (identity, p = 0 or
    eval mode), None when it is not one the fused paths take (another module, p = 1)."""
    if type(drop) is nn.Identity:
        return 0.0
    if type(drop) is nn.Dropout and not drop.inplace:
        return 0.0 if not drop.training or drop.p == 0 else (drop.p if drop.p < 1 else None)
    return None


def _is_lora_linear(module: nn.Module) -> bool:
    # a LoRA layer exists only once peft is imported: no import here for models without one (importing
    # peft is a visible share of a trainer's construction, docs/benchmarks.md); the class is looked up
    # once, as the fused MLP asks this of its down_proj in every forward
    return "peft" in sys.modules and type(module) is _lora_linear_class()


@functools.cache
def _lora_linear_class() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


def _is_swiglu_mlp(module: nn.Module) -> bool:
    return (
        type(module).__name__ in SWIGLU_MLP_CLASSES
        and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish")
    )


def _is_rmsnorm(module: nn.Module) -> bool:
    return type(module).__name__ in RMSNORM_CLASSES and hasattr(module, "variance_epsilon") \
        and isinstance(getattr(module, "weight", None), torch.Tensor)


_FORWARDS = ((_is_swiglu_mlp, _swiglu_forward), (_is_rmsnorm, _rmsnorm_forward), (_is_lora_linear, _lora_linear_forward))


def fuse_layers(model: nn.Module, kinds: tuple[str, ...] = ("mlp", "rmsnorm", "lora", "rope"), *,
                triton: bool = True, recompute_mlp: bool = False) -> dict[str, int]:  # fmt: skip
    """Give every Llama-family SwiGLU MLP and RMSNorm in ``model`` (of ``kinds``) the lean
    backward, and every peft LoRA ``Linear`` the one-matmul adapter; returns how many of each
    ({"mlp": n, "rmsnorm": m, "lora": k, "rope": a}). triton=True: the MLPs' and norms' elementwise
    work runs as ``preftune.kernels`` Triton kernels wherever those apply (CUDA tensors, Triton
    installed), forward (also without autograd) and backward; and the rotary embedding of the a
    attention modules, inside ``fast_rope()`` (its modeling module's function is patched, see there).
    recompute_mlp=True: MLPs whose three projections are plain bias-free Linears keep only their input
    and make gate and up again in backward (``_SwiGLURecompute``; counted as "mlp_recompute")."""
    counts = {"mlp": 0, "rmsnorm": 0, "lora": 0, "rope": 0}
    recomputed = 0
    for module in model.modules():
        for (test, forward), kind in zip(_FORWARDS, counts):
            if kind in kinds and test(module):
                module.forward = types.MethodType(forward, module)
                module._preftune_triton = bool(triton)
                counts[kind] += 1
                if kind == "mlp":
                    on = recompute_mlp and _plain_mlp(module)
                    setattr(module, RECOMPUTE_MLP, on)
                    recomputed += on
        if triton and "rope" in kinds and _patch_rope(module):
            counts["rope"] += 1
    if recompute_mlp:
        counts["mlp_recompute"] = recomputed
    return counts


def _plain_mlp(mlp: nn.Module) -> bool:
    """Whether the MLP's three projections are bias-free nn.Linear (no adapter wrapped around them)."""
    return all(type(p) is nn.Linear and p.bias is None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))


def unfuse_layers(model: nn.Module) -> int:
    """Undo ``fuse_layers``; returns how many modules got their class forward back."""
    n = 0
    ours = {f for _, f in _FORWARDS}
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) in ours:
            del module.forward
            vars(module).pop("_preftune_triton", None)
            vars(module).pop(RECOMPUTE_MLP, None)
            n += 1
    return n
