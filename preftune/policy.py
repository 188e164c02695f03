"""The model a run trains, ready for its loop: loaded (or given), its tokenizer, LoRA adapters,
activation checkpointing, the lean fused layers and the Triton head, in that order."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from preftune import kernels
from preftune.logps import _unwrap, use_tied_embedding_grad, use_triton_head

logger = logging.getLogger("preftune")


def attention_heads(config) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head dim) of a decoder config, or None where it does not say."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not heads or not hidden:
        return None
    dim = getattr(config, "head_dim", None) or hidden // heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, dim


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    model_id: str | None  # what the user named (path or hub id), for cache keys and model cards
    model_path: str | None  # a local folder to reload it from, when there is one
    is_peft: bool


def load_policy(model, args, *, processing_class=None, peft_config=None, device: torch.device) -> Policy:
    """`model` may be a model object, a local path or hub id, or None (the config's `model_name_or_path`,
    else the embedded default SmolLM2-135M-Instruct)."""
    from preftune import models

    model_id = model if isinstance(model, (str, os.PathLike)) or model is None else None
    if model_id is None and model is None:
        model_id = args.model_name_or_path
    name = str(model_id) if model_id is not None else getattr(getattr(model, "config", None), "_name_or_path", None)
    if model is None or isinstance(model, (str, os.PathLike)):
        path = models.resolve_model_path(model_id, cache_dir=args.cache_dir)
        model_path = str(path)
        model = models.load_model(path, dtype=args.dtype, bf16=args.bf16, fp16=args.fp16,
                                  model_init_kwargs=args.model_init_kwargs, trust_remote_code=args.trust_remote_code,
                                  allow_pickle=args.allow_pickle)
    else:
        model_path = getattr(model.config, "_name_or_path", None) or None
    tokenizer = _tokenizer(processing_class, model_path, args)
    model = _adapt(model, args, peft_config, device)
    return Policy(model, tokenizer, name, model_path, peft_config is not None or hasattr(model, "peft_config"))


def _tokenizer(tokenizer, model_path: str | None, args):
    from preftune import models

    if tokenizer is None:
        if not model_path:
            raise ValueError("processing_class (the tokenizer) is required when the model has no path to load it from")
        tokenizer = models.load_tokenizer(model_path, trust_remote_code=args.trust_remote_code)
    elif tokenizer.pad_token_id is None:
        tokenizer = models.ensure_pad_token(tokenizer)
    if args.chat_template:
        tokenizer.chat_template = args.chat_template
    return tokenizer


def _adapt(model, args, peft_config, device: torch.device):
    """Dropout off, LoRA, activation checkpointing, fused layers and the Triton head, as the config asks."""
    from preftune import models

    if args.disable_dropout:
        models.disable_dropout(model)
    if peft_config is None and args.use_peft:
        peft_config = models.lora_config_from_args(args.lora_r, args.lora_alpha, args.lora_dropout,
                                                   args.lora_target_modules)
    if peft_config is not None:
        model = models.apply_peft(model, peft_config, gradient_checkpointing=args.gradient_checkpointing)
    if args.gradient_checkpointing:
        models.set_activation_checkpointing(model, True, args.gradient_checkpointing_kwargs or {"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False
    if args.fused_layers:
        from preftune.fused import fuse_layers

        counts = fuse_layers(model, triton=args.triton_kernels, recompute_mlp=args.recompute_mlp)
        logger.info("lean backward in %s", counts)
        if args.recompute_mlp and not counts.get("mlp_recompute"):
            logger.warning("recompute_mlp=True, but none of the %d SwiGLU MLPs has three plain projections "
                           "(LoRA-adapted ones keep theirs): nothing is recomputed", counts["mlp"])
    mark_head(model, args)
    if args.triton_kernels and device.type == "cuda":
        warm_up_kernels(model, device)
    return model


def mark_head(model, args) -> None:
    """The config's choices that ``model_logps`` reads from a model's output head: the Triton kernels
    (``triton_kernels``) and the tied input embedding's gradient (``tied_embedding_grad``). For the
    policy and for a separate reference model alike."""
    use_triton_head(model, args.triton_kernels)
    use_tied_embedding_grad(model, args.tied_embedding_grad)


def warm_up_kernels(model, device: torch.device) -> None:
    """Compile (or load from Triton's cache) the kernel variants this model's widths run, in the
    background while the data is tokenized (``kernels.warm_up_async``)."""
    base = _unwrap(model)
    config = getattr(base, "config", None)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None  # marked by mark_head just before
    param = next(base.parameters(), None)
    kernels.warm_up_async(
        device,
        param.dtype if param is not None else torch.bfloat16,
        norm_width=getattr(config, "hidden_size", None),
        mlp_width=getattr(config, "intermediate_size", None),
        vocab=head.weight.shape[0] if hasattr(head, "weight") else None,
        heads=attention_heads(config),
    )
