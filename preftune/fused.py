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
model changes, and ``unfuse_layers`` puts the class forwards back. A LoRA-wrapped ``down_proj``
(not a plain ``nn.Linear``) keeps its own module; only silu(gate) * up is fused then (``_SiluMul``).
Without autograd (inference, the reference pass) the class forwards run.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

SWIGLU_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
RMSNORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


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


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return _silu_mul_backward(grad, gate, up, F.silu(gate), *ctx.needs_input_grad)


class _SwiGLUDown(torch.autograd.Function):
    """F.linear(silu(gate) * up, weight), saving only gate, up and the weight.

    The matmuls run in the dtype F.linear would use (autocast's under autocast), with autocast
    off inside, so forward and backward do the same casts as the eager module.
    """

    @staticmethod
    def forward(ctx, gate, up, weight):
        dt = _matmul_dtype(gate, weight)
        with torch.autocast(gate.device.type, enabled=False):
            prod = F.silu(gate) * up
            out = F.linear(prod.to(dt), weight.to(dt))
        ctx.save_for_backward(gate, up, weight)
        ctx.dt = dt
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight = ctx.saved_tensors
        dt = ctx.dt
        need_gate, need_up, need_w = ctx.needs_input_grad
        grad_gate = grad_up = grad_w = None
        with torch.autocast(gate.device.type, enabled=False):
            act = F.silu(gate)
            g = grad_out.to(dt)
            if need_w:
                prod = (act * up).to(dt)
                grad_w = (g.reshape(-1, g.shape[-1]).t() @ prod.reshape(-1, prod.shape[-1])).to(weight.dtype)
            if need_gate or need_up:
                grad_prod = (g @ weight.to(dt)).to(torch.promote_types(gate.dtype, up.dtype))
                grad_gate, grad_up = _silu_mul_backward(grad_prod, gate, up, act, need_gate, need_up)
        return grad_gate, grad_up, grad_w


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rstd).to(x.dtype), rstd = rsqrt(mean(x^2) + eps) in float32; saves x, weight, rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        n = x.float() * rstd  # the normalized x, float32
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * n.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gn = (grad * weight).float()  # d loss / d n
            # d n / d x = rstd * (I - n n^T / H): grad_x = rstd * (gn - n * mean(gn * n))
            grad_x = (rstd * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


def _rmsnorm_forward(self, x):
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x):
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if type(down) is nn.Linear and down.bias is None:
        return _SwiGLUDown.apply(gate, up, down.weight)
    return down(_SiluMul.apply(gate, up))


def _is_swiglu_mlp(module: nn.Module) -> bool:
    return (
        type(module).__name__ in SWIGLU_MLP_CLASSES
        and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish")
    )


def _is_rmsnorm(module: nn.Module) -> bool:
    return type(module).__name__ in RMSNORM_CLASSES and hasattr(module, "variance_epsilon") \
        and isinstance(getattr(module, "weight", None), torch.Tensor)


_FORWARDS = ((_is_swiglu_mlp, _swiglu_forward), (_is_rmsnorm, _rmsnorm_forward))


def fuse_layers(model: nn.Module, kinds: tuple[str, ...] = ("mlp", "rmsnorm")) -> dict[str, int]:
    """Give every Llama-family SwiGLU MLP and RMSNorm in ``model`` (of ``kinds``) the lean
    backward; returns how many of each ({"mlp": n, "rmsnorm": m})."""
    counts = {"mlp": 0, "rmsnorm": 0}
    for module in model.modules():
        for (test, forward), kind in zip(_FORWARDS, counts):
            if kind in kinds and test(module):
                module.forward = types.MethodType(forward, module)
                counts[kind] += 1
    return counts


def unfuse_layers(model: nn.Module) -> int:
    """Undo ``fuse_layers``; returns how many modules got their class forward back."""
    n = 0
    ours = {f for _, f in _FORWARDS}
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) in ours:
            del module.forward
            n += 1
    return n
