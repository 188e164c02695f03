"""GRPOConfig: the GRPO fields on top of TrainConfig's shared training fields (``preftune.config_base``).

Every field name of TRL 1.16's GRPOConfig is taken: honoured, or accepted only at the value preftune does
(``SUPPORTED_ONLY``, any other value refused with what to do instead), or refused by name when set
(``REFUSED``). Defaults are TRL's, except the measured ones docs/differences_from_trl.md lists. Fields
that exist only in preftune say ``[preftune]`` in their help text.

``per_device_train_batch_size`` counts completions, as in TRL. One generation batch of
``generation_batch_size`` completions (whole groups of ``num_generations``) serves ``steps_per_generation``
micro-steps; ``generation_layout(num_processes)`` derives both from the fields as TRL does.
"""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar, Optional, Union

from preftune.config_base import Checks, ConfigError, TrainConfig, config_dataclass, config_field, logger

__all__ = ["GRPOConfig", "LOSS_TYPES", "SCALE_REWARDS", "MULTI_OBJECTIVE_AGGREGATIONS"]

# the loss formulations (the same names as preftune.grpo.objective.LOSS_TYPES; a test keeps them equal)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

_f = config_field

# Fields that apply to vLLM generation only, with TRL's defaults: set to anything else, they need use_vllm=True.
VLLM_ONLY_DEFAULTS: dict[str, Any] = {
    "vllm_model_impl": "vllm", "vllm_enable_sleep_mode": False, "vllm_structured_outputs_regex": None,
    "vllm_gpu_memory_utilization": 0.3, "vllm_max_model_length": None, "vllm_tensor_parallel_size": 1,
    "vllm_importance_sampling_correction": True, "vllm_importance_sampling_mode": "sequence_mask",
    "vllm_importance_sampling_clip_max": 3.0, "vllm_importance_sampling_clip_min": None,
    "vllm_importance_sampling_cap": None,
}

_VLLM_SERVER = ("vLLM's server mode is not supported (nor, yet, use_vllm=True): preftune generates in the training "
                "processes with its own batched decoding, which needs no server, host or port")


def _world_size() -> int:
    """The number of training processes a launcher (accelerate launch, torchrun) announced; 1 without one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _titles() -> dict[str, str]:
    """TrainConfig's --help groups with GRPO's own after "data"."""
    out: dict[str, str] = {}
    for key, title in TrainConfig.GROUP_TITLES.items():
        out[key] = title
        if key == "data":
            out.update(generation="generation", engine="generation engines (vLLM, continuous batching)",
                       rewards="rewards and advantages")
    return out


@config_dataclass
class GRPOConfig(TrainConfig):
    """Everything one GRPO run needs. See ``preftune grpo --help`` for every field with its default."""

    ACCEPTED_IGNORED: ClassVar[dict[str, str]] = {
        **TrainConfig.ACCEPTED_IGNORED,
        "remove_unused_columns": "the reward functions receive every dataset column (as keyword lists) and the "
                                 "model the prompt only, whatever this says",
        "label_names": "GRPO rows have no label columns: the targets are the sampled completions",
        "eval_accumulation_steps": "evaluation keeps per-completion numbers only, never logits, so there are no "
                                   "output tensors to move to the CPU in chunks",
        "average_tokens_across_devices": "the loss's normalizer is loss_type's (dapo: the completion tokens of the "
                                         "whole global batch, every process's), whatever the number of devices",
        "log_multimodal": "preftune trains text-only models: there are no images or videos to log with the "
                          "completions",
    }
    SUPPORTED_ONLY: ClassVar[dict[str, tuple[tuple, str]]] = {
        **TrainConfig.SUPPORTED_ONLY,
        "label_smoothing_factor": ((0.0,), "GRPO's loss has no label smoothing"),
        "include_for_metrics": (([],), "evaluation metrics are computed from the rewards of the sampled "
                                "completions"),
        "cast_lm_head_to_fp32": ((False,), "the output head's matmul runs in the training precision and its logits "
                                 "are upcast to float32 after it; for a float32 head train in float32 "
                                 "(dtype='float32', bf16=False), preftune's default on CPU"),
        "ds3_gather_for_generation": ((True,), "generation from DeepSpeed ZeRO-3 shards without gathering the "
                                      "weights is not implemented"),
        "cache_implementation": ((None,), "generation runs preftune's own decoding loop (each prompt's forward "
                                 "once, its key/value cache shared by its num_generations rows), which keeps its "
                                 "own cache"),
        "vllm_mode": (("colocate",), "the server mode and its fields are not supported (use_vllm=True is refused "
                      "for now: preftune generates with its own batched decoding in the training processes)"),
    }
    # vLLM's own settings can differ from TRL's defaults only with use_vllm=True, which the trainer refuses while
    # preftune has no vLLM engine: every value the run can have is the one it does not use
    VALIDATED_ONLY: ClassVar[tuple[str, ...]] = (*SUPPORTED_ONLY, *VLLM_ONLY_DEFAULTS)
    REFUSED: ClassVar[dict[str, str]] = {
        **TrainConfig.REFUSED,
        **dict.fromkeys(("vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
                         "vllm_group_port"), _VLLM_SERVER),
        "max_tool_calling_iterations": "tool calling is not supported (GRPOTrainer takes no tools or "
                                       "environment_factory)",
        "log_completions_hub_repo": "uploading the logged completions to the Hub is not implemented; "
                                    "log_completions=True writes them to the run folder (output_dir)",
    }
    REFUSED_UNSET: ClassVar[dict[str, Any]] = {
        **TrainConfig.REFUSED_UNSET, "vllm_server_host": "0.0.0.0", "vllm_server_port": 8000,
        "vllm_server_timeout": 240.0, "vllm_group_port": 51216}
    # TRL's deprecated names (old -> new): the config moves a set value to the new name, which the code reads.
    RENAMED: ClassVar[dict[str, str]] = {
        "use_transformers_paged": "use_transformers_continuous_batching",
        "vllm_importance_sampling_cap": "vllm_importance_sampling_clip_max"}
    ALIASES: ClassVar[dict[str, str]] = {**TrainConfig.ALIASES, "reward": "reward_funcs"}
    GROUP_TITLES: ClassVar[dict[str, str]] = _titles()
    CLI_DESCRIPTION: ClassVar[str] = ("Train with GRPO. Every field below is also a key of the --config YAML file; "
                                      "--reward is repeatable.")
    CLI_PROG: ClassVar[str] = "preftune grpo"

    # ---- model (TrainingArguments' and TrainConfig's fields whose GRPO default or meaning differs) ----------
    disable_dropout: bool = _f(False, "Turn dropout off in the policy and the reference.", group="run")
    router_aux_loss_coef: Optional[float] = _f(
        None, "Weight of a mixture-of-experts model's router load-balancing loss, added to the training loss. None "
        "= the coefficient the model's config declares (0.0 where none); 0.0 = off. Refused for a model without "
        "router logits.", group="loss")
    cast_lm_head_to_fp32: bool = _f(False, "Only false: the head's logits are upcast to float32 after its matmul; "
                                    "train in float32 for a float32 head.", group="run")

    # ---- data: prompts, the demo tasks ---------------------------------------------------------------------
    remove_unused_columns: bool = _f(False, "Accepted and ignored: the reward functions receive every dataset "
                                     "column.", group="data")
    shuffle_dataset: bool = _f(True, "Shuffle the training prompts.", group="data")
    batch_layout: str = _f("auto", "How a micro-batch's completions sit in the update's forward: 'prefix' = one "
                           "sequence per prompt, the prompt once and then its completions, each seeing the prompt "
                           "and itself only (the group's shared prompt computed once); 'prefix_packed' = those rows "
                           "end to end without padding, attention as variable-length sequences; 'padded' = one row "
                           "per completion, the prompt repeated (TRL's); 'packed' = those rows end to end; 'auto' = "
                           "'prefix'. All give the same log-probs.", group="batch",
                           choices=("auto", "padded", "packed", "prefix", "prefix_packed"), extra=True)
    demo_train_size: Optional[int] = _f(None, "Number of bundled demo training prompts (None = the demo's own).",
                                        group="data", extra=True)
    demo_eval_size: Optional[int] = _f(None, "Number of bundled demo eval prompts (None = the demo's own).",
                                       group="data", extra=True)
    demo_tasks: Optional[list[str]] = _f(None, "Bundled demo tasks to train on and score (None = all: number_only, "
                                         "arithmetic, concise, constraint).", group="data", extra=True)
    demo_generation_prompts: int = _f(32, "With the demo data: held-out prompts answered greedily and scored by "
                                      "each task's verifier before and after training (0 = skip).", group="data",
                                      extra=True)

    # ---- batching ------------------------------------------------------------------------------------------
    per_device_train_batch_size: int = _f(8, "Completions per device per micro-step (a prompt's group may span "
                                          "micro-steps and processes).", group="batch")
    per_device_eval_batch_size: int = _f(8, "Completions per device per evaluation batch.", group="batch")
    generation_batch_size: Optional[int] = _f(
        None, "Completions generated at once, whole groups of num_generations. None = per_device_train_batch_size "
        "x processes x steps_per_generation. Exclusive with steps_per_generation.", group="batch")
    steps_per_generation: Optional[int] = _f(
        None, "Micro-steps one generation batch serves. None = gradient_accumulation_steps (one generation batch "
        "per optimizer step), or from generation_batch_size. Exclusive with generation_batch_size.", group="batch")
    ds3_gather_for_generation: bool = _f(True, "Only true: under ZeRO-3 the weights are gathered for generation.",
                                         group="batch")

    # ---- generation ----------------------------------------------------------------------------------------
    num_generations: int = _f(8, "Completions sampled per prompt (G, >= 2): the group whose rewards make the "
                              "baseline.", group="generation")
    num_generations_eval: Optional[int] = _f(None, "Completions per prompt in evaluation (None = num_generations).",
                                             group="generation")
    max_completion_length: Optional[int] = _f(512, "Max tokens of each completion; one that reaches it without EOS is "
                                    "truncated.", group="generation")
    temperature: float = _f(1.0, "Sampling temperature (> 0); the log-probs of the loss use the same.",
                            group="generation")
    top_p: float = _f(1.0, "Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1].",
                      group="generation")
    top_k: int = _f(0, "Keep the k most likely tokens (0 = all).", group="generation")
    min_p: Optional[float] = _f(None, "Drop tokens less likely than min_p x the most likely one's probability "
                                "(None = off).", group="generation")
    repetition_penalty: float = _f(1.0, "Penalty (> 1) or bonus (< 1) on tokens already in the prompt or "
                                   "completion.", group="generation")
    generation_kwargs: Optional[Union[dict, str]] = _f(
        None, "More generation settings (JSON on the command line); they override the fields above.",
        group="generation")
    chat_template_kwargs: Optional[Union[dict, str]] = _f(None, "Keyword arguments (JSON) for apply_chat_template "
                                                          "of conversational prompts.", group="generation")
    cache_implementation: Optional[str] = _f(None, "Only None: preftune's decoding loop keeps its own key/value "
                                             "cache.", group="generation")

    # ---- generation engines ---------------------------------------------------------------------------------
    use_vllm: bool = _f(False, "Generate with vLLM colocated in the training processes (a GPU and the vllm package "
                        "needed; weights synced after each update).", group="engine")
    vllm_mode: str = _f("colocate", "Only 'colocate': the server mode is not supported.", group="engine")
    vllm_model_impl: str = _f("vllm", "vLLM's model implementation (with use_vllm).", group="engine",
                              choices=("vllm", "transformers"))
    vllm_enable_sleep_mode: bool = _f(False, "Offload vLLM's weights and cache during the update (with use_vllm).",
                                      group="engine")
    vllm_structured_outputs_regex: Optional[str] = _f(None, "Regex that vLLM's completions must match (with "
                                                      "use_vllm).", group="engine")
    vllm_gpu_memory_utilization: float = _f(0.3, "Fraction of GPU memory vLLM may take (with use_vllm).",
                                            group="engine")
    vllm_max_model_length: Optional[int] = _f(None, "vLLM's context window (with use_vllm; None = the model's).",
                                              group="engine")
    vllm_tensor_parallel_size: int = _f(1, "vLLM's tensor-parallel size (with use_vllm).", group="engine")
    vllm_importance_sampling_correction: bool = _f(
        True, "Correct the mismatch between vLLM's sampling log-probs and the trainer's by importance sampling "
        "(with use_vllm).", group="engine")
    vllm_importance_sampling_mode: str = _f("sequence_mask", "How the vLLM importance ratios are bounded (with "
                                            "use_vllm).", group="engine", choices=VLLM_IS_MODES)
    vllm_importance_sampling_clip_max: Optional[float] = _f(3.0, "Upper bound of the vLLM importance ratio (with "
                                                            "use_vllm).", group="engine")
    vllm_importance_sampling_clip_min: Optional[float] = _f(None, "Lower bound of the vLLM importance ratio (with "
                                                            "use_vllm).", group="engine")
    vllm_importance_sampling_cap: Optional[float] = _f(None, "TRL's older name of "
                                                       "vllm_importance_sampling_clip_max.", group="engine")
    use_transformers_continuous_batching: bool = _f(False, "Generate with transformers' continuous batching "
                                                    "engine.", group="engine")
    transformers_continuous_batching_config: Optional[Union[dict, str]] = _f(
        None, "Keyword arguments (JSON) for transformers' ContinuousBatchingConfig (with "
        "use_transformers_continuous_batching).", group="engine")
    use_transformers_paged: bool = _f(False, "TRL's older name of use_transformers_continuous_batching.",
                                      group="engine")

    # ---- rewards and advantages -----------------------------------------------------------------------------
    reward_funcs: list[str] = _f(None, "Reward functions by name (`preftune.rewards`), 'module:function' or "
                                 "'path.py:function' (alias and repeatable flag --reward); in Python pass "
                                 "reward_funcs= to GRPOTrainer. Empty = the trainer's; the demo's verifiers on the "
                                 "demo data.", group="rewards", factory=list, extra=True)
    reward_weights: Optional[list[float]] = _f(None, "One weight per reward function (None = 1.0 each).",
                                               group="rewards")
    multi_objective_aggregation: str = _f(
        "sum_then_normalize", "Several rewards: weighted sum then normalize, or normalize each then sum (GDPO).",
        group="rewards", choices=MULTI_OBJECTIVE_AGGREGATIONS)
    scale_rewards: str = _f("group", "Divide advantages by the group's reward std (group, or true), the batch's "
                            "(batch), or not at all (none, or false: Dr. GRPO).", group="rewards",
                            choices=SCALE_REWARDS)
    dynamic_sampling: bool = _f(False, "DAPO's dynamic sampling: drop groups whose rewards are all equal and "
                                "generate for more prompts to fill the batch, up to max_resample_rounds.",
                                group="rewards", extra=True)
    max_resample_rounds: int = _f(3, "With dynamic_sampling: at most this many more generation rounds per batch.",
                                  group="rewards", extra=True)

    # ---- loss ----------------------------------------------------------------------------------------------
    loss_type: str = _f("dapo", "Loss formulation: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo or vespo.",
                        group="loss", choices=LOSS_TYPES)
    beta: float = _f(0.0, "KL coefficient against the reference (0 = no reference model is built).", group="loss")
    num_iterations: int = _f(1, "Updates per generation batch (mu).", group="loss")
    epsilon: float = _f(0.2, "Lower clipping epsilon of the importance ratio.", group="loss")
    epsilon_high: Optional[float] = _f(None, "Upper clipping epsilon (None = epsilon; DAPO's clip-higher: 0.28; "
                                       "cispo's cap).", group="loss")
    delta: Optional[float] = _f(None, "Two-sided GRPO: cap the ratio at delta for negative advantages (None = "
                                "off).", group="loss")
    importance_sampling_level: str = _f("token", "Importance ratios per token, or one per sequence (GSPO).",
                                        group="loss", choices=IMPORTANCE_SAMPLING_LEVELS)
    sapo_temperature_neg: float = _f(1.05, "sapo: gate temperature for non-positive advantages.", group="loss")
    sapo_temperature_pos: float = _f(1.0, "sapo: gate temperature for positive advantages.", group="loss")
    vespo_k_pos: float = _f(2.0, "vespo: power exponent for positive advantages.", group="loss")
    vespo_lambda_pos: float = _f(3.0, "vespo: decay factor for positive advantages.", group="loss")
    vespo_k_neg: float = _f(3.0, "vespo: power exponent for negative advantages.", group="loss")
    vespo_lambda_neg: float = _f(2.0, "vespo: decay factor for negative advantages.", group="loss")
    mask_truncated_completions: bool = _f(False, "Leave completions that hit max_completion_length out of the "
                                          "loss.", group="loss")
    top_entropy_quantile: float = _f(1.0, "Keep in the policy loss only the top quantile of tokens by entropy, in "
                                     "[0, 1] (1 = all).", group="loss")
    entropy_coef: float = _f(0.0, "Weight of the mean per-token entropy bonus (0 = off; with "
                             "use_adaptive_entropy the initial value).", group="loss")
    use_adaptive_entropy: bool = _f(False, "Adapt entropy_coef each optimizer step toward entropy_target "
                                    "(Skywork-OR1).", group="loss")
    entropy_coef_min: float = _f(0.0, "Adaptive entropy: lower bound of entropy_coef.", group="loss")
    entropy_coef_max: float = _f(1.0, "Adaptive entropy: upper bound of entropy_coef.", group="loss")
    entropy_coef_delta: float = _f(0.005, "Adaptive entropy: change of entropy_coef per optimizer step.",
                                   group="loss")
    entropy_target: float = _f(0.2, "Adaptive entropy: target mean per-token entropy in nats.", group="loss")
    off_policy_mask_threshold: Optional[float] = _f(
        None, "Mask sequences with negative advantage whose KL to the sampling policy exceeds this (None = off).",
        group="loss")
    use_bias_correction_kl: bool = _f(True, "Multiply the KL term by the importance ratio (unbiased reverse-KL "
                                      "gradient).", group="loss")

    # ---- reference -----------------------------------------------------------------------------------------
    sync_ref_model: bool = _f(False, "TR-DPO-style: move the reference toward the policy every "
                              "ref_model_sync_steps (needs beta > 0).", group="reference")
    ref_model_mixup_alpha: float = _f(0.6, "alpha in [0, 1]: ref = alpha * policy + (1 - alpha) * ref.",
                                      group="reference")
    ref_model_sync_steps: int = _f(512, "Optimizer steps between reference updates.", group="reference")

    # ---- logging -------------------------------------------------------------------------------------------
    log_completions: bool = _f(False, "Log a table of prompts, completions, rewards and advantages every "
                               "logging_steps.", group="log")
    log_multimodal: bool = _f(True, "Accepted and ignored: text-only models have no images to log.", group="log")
    num_completions_to_print: Optional[int] = _f(None, "Completions printed per logged table (None = all).",
                                                 group="log")
    log_unique_prompts: bool = _f(False, "Log each prompt once instead of once per completion.", group="log")

    # ---- derived values ------------------------------------------------------------------------------------
    @property
    def resolved_epsilon_high(self) -> float:
        """The upper clipping epsilon: epsilon_high, or epsilon when it is None (TRL's rule)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def eval_num_generations(self) -> int:
        """Completions per prompt in evaluation: num_generations_eval, or num_generations when it is None."""
        return self.num_generations_eval or self.num_generations

    def generation_layout(self, num_processes: int = 1) -> tuple[int, int]:
        """(generation_batch_size, steps_per_generation) for a run on ``num_processes`` processes, with TRL's
        derivation: both unset, steps_per_generation = gradient_accumulation_steps and the generation batch is
        per_device_train_batch_size x processes x that; one set, the other follows from it. Raises ConfigError
        naming the numbers to change when the batch does not divide into micro-steps or whole groups."""
        layout, errors = self._layout(int(num_processes))
        if errors:
            raise ConfigError(errors)
        return layout

    generation_batch = generation_layout  # the same, under the name the design notes use

    def describe_batch(self, num_processes: int = 1) -> str:
        """One start-of-run log line: the generation batch, its groups and the micro-steps it serves."""
        gen, steps = self.generation_layout(num_processes)
        return (f"generation batch {gen} completions = {gen // self.num_generations} prompts x {self.num_generations} "
                f"generations, serving {steps} micro-step{'s' if steps != 1 else ''} of "
                f"{self.per_device_train_batch_size} per device x {num_processes} process"
                f"{'es' if num_processes != 1 else ''}; {self.gradient_accumulation_steps} accumulation step"
                f"{'s' if self.gradient_accumulation_steps != 1 else ''} per optimizer step")

    def _layout(self, procs: int) -> tuple[tuple[int, int], list[tuple[str, str]]]:
        per_step = self.per_device_train_batch_size * procs
        where = (f"per_device_train_batch_size={self.per_device_train_batch_size} x {procs} process"
                 f"{'es' if procs != 1 else ''}")
        gen, steps = self.generation_batch_size, self.steps_per_generation
        if gen is not None and steps is not None:
            return (0, 0), [("generation_batch_size", f"generation_batch_size={gen} and steps_per_generation={steps} "
                             "are both set: each follows from the other; keep one")]
        if gen is None:
            derived = " (= gradient_accumulation_steps)" if steps is None else ""
            steps = self.gradient_accumulation_steps if steps is None else steps
            gen = per_step * steps
            source = f"{where} x steps_per_generation={steps}{derived}"
        else:
            if gen % per_step:
                return (0, 0), [("generation_batch_size", f"generation_batch_size={gen} must be a multiple of the "
                                 f"completions of one micro-step on all processes, {where} = {per_step}: set it "
                                 f"to {max(per_step, gen // per_step * per_step)} or "
                                 f"{(gen // per_step + 1) * per_step}, or change per_device_train_batch_size")]
            steps = gen // per_step
            source = f"generation_batch_size={gen}"
        if gen % self.num_generations:
            return (0, 0), [("num_generations", f"the generation batch of {gen} completions ({source}) must hold "
                             f"whole groups of num_generations={self.num_generations}: make it a multiple of "
                             f"{self.num_generations} (per_device_train_batch_size, steps_per_generation or "
                             f"generation_batch_size), or choose num_generations dividing {gen}")]
        return (gen, steps), []

    @staticmethod
    def demo_defaults() -> dict[str, Any]:
        """Overrides for the no-argument `preftune grpo` run: the embedded model on the demo prompts, scored by
        the demo tasks' verifiers."""
        return {"output_dir": "runs/grpo-demo", "learning_rate": 5e-5, "max_steps": 40, "num_generations": 8,
                "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16, "gradient_accumulation_steps": 1,
                "max_completion_length": 48, "logging_steps": 1, "save_strategy": "no", "warmup_ratio": 0.0,
                "reward_funcs": ["demo", "demo_shaping"], "demo_tasks": ["concise", "constraint"],
                "demo_generation_prompts": 64, "demo_eval_size": 64}

    # ---- checks --------------------------------------------------------------------------------------------
    def _before_coercion(self) -> None:
        super()._before_coercion()
        for name in ("loss_type", "importance_sampling_level", "multi_objective_aggregation", "vllm_mode",
                     "vllm_importance_sampling_mode", "vllm_model_impl"):
            if hasattr(getattr(self, name), "value"):  # an enum member from other tooling
                setattr(self, name, getattr(self, name).value)
        # TRL maps scale_rewards=True to 'group' and False to 'none' (the command line spells them as text)
        value = self.scale_rewards
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if isinstance(value, bool):
            self.scale_rewards = "group" if value else "none"

    def _after_coercion(self) -> None:
        super()._after_coercion()
        if self.use_transformers_paged:
            self.use_transformers_continuous_batching = True
        cap = self.vllm_importance_sampling_cap
        if cap is not None and self.vllm_importance_sampling_clip_max == VLLM_ONLY_DEFAULTS[
                "vllm_importance_sampling_clip_max"]:
            self.vllm_importance_sampling_clip_max = cap

    def checks(self) -> list[tuple[str, str]]:
        """TrainConfig's checks, then GRPO's ranges and combinations (TRL's rules, each naming its fields)."""
        errors = super().checks()
        c, k = self, Checks(self)
        k.need(c.num_generations >= 2, "num_generations", "GRPO needs at least 2 completions per prompt: the "
               "group's rewards are the baseline")
        k.need(c.max_completion_length is not None and c.max_completion_length >= 1, "max_completion_length",
               "must be an integer >= 1: generation needs a length limit, and dr_grpo's normalizer is this number")
        for name in ("num_iterations", "ref_model_sync_steps", "vllm_tensor_parallel_size",
                     "max_resample_rounds"):
            k.need(getattr(c, name) >= 1, name, "must be an integer >= 1")
        for name in ("num_generations_eval", "generation_batch_size", "steps_per_generation", "demo_train_size",
                     "demo_eval_size", "vllm_max_model_length"):
            k.need(getattr(c, name) is None or getattr(c, name) >= 1, name, "must be None or an integer >= 1")
        k.need(c.num_completions_to_print is None or c.num_completions_to_print >= 0, "num_completions_to_print",
               "must be None or an integer >= 0")
        k.need(c.top_k >= 0, "top_k", "must be an integer >= 0 (0 = no top-k filtering)")
        k.need(c.demo_generation_prompts >= 0, "demo_generation_prompts", "must be >= 0")
        from preftune.data.demo import TASKS as DEMO_TASKS

        k.need(c.demo_tasks is None or (len(c.demo_tasks) > 0 and all(t in DEMO_TASKS for t in c.demo_tasks)),
               "demo_tasks", f"must be None or a non-empty list of {', '.join(DEMO_TASKS)}")
        k.number("temperature", 0, lo_open=True)
        k.number("top_p", 0, 1, lo_open=True)
        k.number("min_p", 0, 1, optional=True)
        k.number("repetition_penalty", 0, lo_open=True)
        k.number("beta", 0)
        k.number("epsilon", 0)
        k.number("epsilon_high", 0, optional=True)
        k.number("delta", 0, lo_open=True, optional=True)
        for name in ("sapo_temperature_neg", "sapo_temperature_pos"):
            k.number(name, 0, lo_open=True)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef",
                     "entropy_coef_min", "entropy_coef_delta", "entropy_target"):
            k.number(name, 0)
        k.number("entropy_coef_max", c.entropy_coef_min, why="entropy_coef_min is its lower bound")
        k.number("top_entropy_quantile", 0, 1)
        k.number("off_policy_mask_threshold", 0, lo_open=True, optional=True)
        k.number("ref_model_mixup_alpha", 0, 1)
        k.number("router_aux_loss_coef", 0, optional=True)
        k.number("vllm_gpu_memory_utilization", 0, 1, lo_open=True)
        k.number("vllm_importance_sampling_clip_max", 0, lo_open=True, optional=True)
        k.number("vllm_importance_sampling_clip_min", 0, optional=True)
        if c.reward_weights is not None:
            k.need(all(math.isfinite(w) for w in c.reward_weights), "reward_weights", "must be finite numbers")
            if c.reward_funcs and len(c.reward_weights) != len(c.reward_funcs):
                k.add("reward_weights", f"reward_weights={c.reward_weights!r}: needs {len(c.reward_funcs)} value(s), "
                      f"one per reward function {c.reward_funcs}")
        k.need(all(isinstance(r, str) and r.strip() for r in c.reward_funcs), "reward_funcs",
               "each entry must be a non-empty name, 'module:function' or 'path.py:function'")
        # the generation batch: whole micro-steps on every process, whole groups (TRL checks this when the config
        # is built, with the launcher's process count; generation_layout() checks the trainer's)
        k.errors += self._layout(_world_size())[1]
        if c.eval_strategy != "no":
            procs = _world_size()
            g = c.eval_num_generations
            if (c.per_device_eval_batch_size * procs) % g:
                k.add("per_device_eval_batch_size", f"per_device_eval_batch_size={c.per_device_eval_batch_size} x "
                      f"{procs} process{'es' if procs != 1 else ''} must be a multiple of the generations per prompt "
                      f"in evaluation ({'num_generations_eval' if c.num_generations_eval else 'num_generations'}="
                      f"{g}): whole groups are scored together")
        if c.sync_ref_model and c.beta == 0:
            k.add("sync_ref_model", "sync_ref_model=True with beta=0.0: no reference model is built without a KL "
                  "term, so there is nothing to synchronize; set beta > 0 or sync_ref_model=False")
        self._check_engines(k)
        return errors + k.errors

    def _check_engines(self, k: Checks) -> None:
        c = self
        if not c.use_vllm:
            for name, default in VLLM_ONLY_DEFAULTS.items():
                if getattr(c, name) != default and not (name == "vllm_importance_sampling_clip_max"
                                                        and c.vllm_importance_sampling_cap == getattr(c, name)):
                    k.add(name, f"{name}={getattr(c, name)!r} applies to vLLM generation only: set use_vllm=True, or "
                          f"leave it at {default!r}")
        if c.use_vllm and c.use_transformers_continuous_batching:
            k.add("use_vllm", "use_vllm=True with use_transformers_continuous_batching=True: choose one generation "
                  "engine")
        if c.transformers_continuous_batching_config is not None and not c.use_transformers_continuous_batching:
            k.add("transformers_continuous_batching_config", "transformers_continuous_batching_config is set but "
                  "use_transformers_continuous_batching=False: set it to True, or unset the config")
        cap, hi, lo = (c.vllm_importance_sampling_cap, c.vllm_importance_sampling_clip_max,
                       c.vllm_importance_sampling_clip_min)
        if cap is not None and cap != hi:
            k.add("vllm_importance_sampling_cap", f"vllm_importance_sampling_cap={cap!r} contradicts "
                  f"vllm_importance_sampling_clip_max={hi!r}: the first is the older name of the second; keep one")
        if lo is not None and hi is not None and lo >= hi:
            k.add("vllm_importance_sampling_clip_min", f"vllm_importance_sampling_clip_min={lo!r} must be less than "
                  f"vllm_importance_sampling_clip_max={hi!r}")
        truncating = c.vllm_importance_sampling_mode.endswith("_truncate")
        if c.vllm_importance_sampling_correction and truncating and lo is None and hi is None:
            k.add("vllm_importance_sampling_mode", f"vllm_importance_sampling_mode="
                  f"{c.vllm_importance_sampling_mode!r} clips the ratio: set vllm_importance_sampling_clip_min or "
                  "vllm_importance_sampling_clip_max")
        if (c.loss_type == "vespo" and c.use_vllm and c.vllm_importance_sampling_correction
                and c.vllm_importance_sampling_mode not in ("token_truncate", "token_mask")):
            k.add("vllm_importance_sampling_mode", f"loss_type='vespo' with vLLM importance sampling needs "
                  f"vllm_importance_sampling_mode 'token_truncate' or 'token_mask', not "
                  f"{c.vllm_importance_sampling_mode!r}")

    def _warn_ignored(self) -> None:
        super()._warn_ignored()
        c = self
        # combinations TRL runs but warns about: they train, not as their paper does
        if c.loss_type == "luspo" and c.importance_sampling_level != "sequence":
            logger.warning("loss_type='luspo' with importance_sampling_level=%r: LUSPO's paper uses 'sequence'",
                           c.importance_sampling_level)
        if c.loss_type == "vespo" and c.importance_sampling_level != "token":
            logger.warning("loss_type='vespo' computes sequence-level weights itself; importance_sampling_level "
                           "should be 'token' (the default)")
        if c.importance_sampling_level == "sequence" and c.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
            logger.warning("importance_sampling_level='sequence' with loss_type=%r sums per-token terms, which "
                           "weights each sequence by its length; GSPO's setup is loss_type='grpo'", c.loss_type)
