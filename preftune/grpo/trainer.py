"""GRPOTrainer: Group Relative Policy Optimization on preftune's training loop.

One optimizer step of the loop (`preftune.loop.TrainLoop`) is ``gradient_accumulation_steps`` micro-batches of
``per_device_train_batch_size`` completions per process, as in TRL. A *generation round* produces the completions
of ``generation_batch_size`` (over all processes; = ``per_device_train_batch_size x processes x
steps_per_generation``) for ``generation_batch_size / num_generations`` prompts, and serves ``steps_per_generation
x num_iterations`` micro-batches of every process:

    prompts of the round -> rollout (each prompt's forward once, G completions decoded as one batch) ->
    rewards (every reward function, every process's completions gathered) -> group advantages (pure function)
    -> [dynamic sampling: groups whose rewards are all equal replaced by new prompts' groups] -> this process's
    slice, groups kept whole, shuffled group-wise, cut into micro-batches -> old log-probs (only when the round
    outlives an optimizer step, as TRL) and the reference's (beta > 0) -> per micro-batch: the policy's per-token
    log-probs with the group's prompt computed once (the shared-prompt layout) -> policy loss (pure function)

The sampling seed of each completion is fixed by the run's seed, the round and the completion's place in the
round, not by the process that draws it or the other rows of its batch: so one process with accumulation and
several processes draw the same completions, and a resumed run draws what the uninterrupted run drew. A
checkpoint holds the round being trained on (its completions, advantages and old/reference log-probs).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from preftune.data.pipeline import FROM_CONFIG, is_stream
from preftune.grpo.data import PromptSet, prepare_prompts, prompt_order, row_seed
from preftune.loop import TrainLoop

logger = logging.getLogger("preftune")

REFUSED_ARGS = {
    "tools": "preftune's GRPO does not run tool calls during generation yet; train without tools",
    "environment_factory": "preftune's GRPO has no environments yet; score completions with reward_funcs",
    "quantization_config": "load the quantized model yourself (transformers' from_pretrained with the "
    "quantization config) and pass it as model=, with peft_config= for QLoRA",
}


@dataclass
class _Round:
    """One generation round, as this process holds it."""

    index: int
    micro: list[list[dict]]  # this process's micro-batches of completion records
    metrics: dict[str, float]  # the round's generation and reward metrics (over every process)
    num_items: int  # completion tokens of the round's loss mask over every process (TRL's num_items_in_batch)
    table: list[dict] = field(default_factory=list)  # log_completions rows (main process)


class GRPOTrainer(TrainLoop):
    """TRL's ``GRPOTrainer`` interface on preftune's core. ``model``: a path / hub id or a model (None: the config's
    ``model_name_or_path``, else the embedded SmolLM2-135M-Instruct); ``reward_funcs``: a callable, a path / id
    of a sequence-classification reward model, or a list of those (None: the config's ``reward_funcs`` names)."""

    sample_name = "completions"
    algorithm = "GRPO"
    progress_desc = "grpo"

    def __init__(self, model=None, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None, tools=None, rollout_func=None,
                 environment_factory=None):
        from preftune.grpo.config import GRPOConfig
        from preftune.grpo.rewards import RewardFunctions

        for name, value in (("tools", tools), ("environment_factory", environment_factory),
                            ("quantization_config", quantization_config)):
            if value is not None:
                raise ValueError(f"GRPOTrainer({name}=...) is not supported: {REFUSED_ARGS[name]}")
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
            args = GRPOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-GRPO")
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a preftune GRPOConfig, got {type(args).__name__}; build it with "
                            "preftune.GRPOConfig(...) (it takes TRL's GRPOConfig field names)")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: a datasets.Dataset / IterableDataset or a list of rows "
                             "with a 'prompt' column (the command line reads the config's dataset_name)")
        self.rollout_func = rollout_func
        if args.use_vllm:
            _refuse_vllm()
        super().__init__(model, args, processing_class=processing_class, peft_config=peft_config, callbacks=callbacks,
                         optimizers=optimizers)
        self.num_generations = int(args.num_generations)
        self.num_generations_eval = int(args.num_generations_eval or args.num_generations)
        self.generation_batch_size, self.steps_per_generation = args.generation_layout(self.accelerator.num_processes)
        self.num_iterations = int(args.num_iterations)
        self.eos_token_ids = self._eos_token_ids()
        if reward_funcs is None:
            reward_funcs = self._config_rewards()
        self.rewards = RewardFunctions(reward_funcs, reward_processing_classes=reward_processing_classes,
                                       device=self.accelerator.device, model_init_kwargs=args.model_init_kwargs,
                                       chat_template_kwargs=args.chat_template_kwargs)
        self.reward_funcs = self.rewards.funcs
        self.reward_func_names = list(self.rewards.names)
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_func_names):
            raise ValueError(f"reward_weights has {len(args.reward_weights)} values but there are "
                             f"{len(self.reward_func_names)} reward functions ({', '.join(self.reward_func_names)}); "
                             "give one weight per function")
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.train_prompts = self._prompts(train_dataset, "train_dataset")
        self.eval_prompts = self._eval_prompt_sets(eval_dataset)
        self.reference = self._build_reference()
        self._round: _Round | None = None
        self._num_tokens = 0  # prompt + completion tokens of the rounds so far, over every process (TRL's num_tokens)
        self._micro_index = 0
        self._timings = None  # seconds of the current round's generation, scoring and log-probs
        # entropy bonus: the coefficient of the current step (use_adaptive_entropy moves it between steps) and the
        # controller's last measured entropy over every process (inf: no bonus before the first measurement)
        self._entropy_coef = float(args.entropy_coef)
        self._last_world_entropy = float("inf")
        self._entropy_window = torch.zeros(2, dtype=torch.float64)
        self._completions_path = Path(args.output_dir) / "completions.jsonl"

    # --- set-up -----------------------------------------------------------------------------------------------
    def _config_rewards(self) -> list:
        from preftune.rewards import load_reward

        names = list(self.args.reward_funcs or [])
        if not names:
            raise ValueError("GRPO needs at least one reward function: pass reward_funcs= (a callable, a reward "
                             "model's path, or a list of them), or set reward_funcs in the config (--reward NAME or "
                             "--reward module:function on the command line)")
        return [load_reward(name, self.args) for name in names]

    def _eos_token_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        model = self.accelerator.unwrap_model(self.model)
        extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for i in extra if isinstance(extra, (list, tuple)) else [extra]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
        if not ids:
            raise ValueError("the tokenizer has no eos_token_id and the model's generation_config names none: "
                             "completions could never end; set tokenizer.eos_token")
        return ids

    def _prompts(self, dataset, name: str) -> PromptSet:
        args = self.args
        if dataset is FROM_CONFIG:
            dataset = self._config_dataset()
        need = None
        if is_stream(dataset):
            if not args.max_steps or args.max_steps <= 0:
                raise ValueError(f"{name} is an IterableDataset (a stream has no length): set max_steps")
            rounds = math.ceil(args.max_steps * args.gradient_accumulation_steps
                               / (self.steps_per_generation * self.num_iterations))
            need = rounds * self.generation_batch_size // self.num_generations
        return prepare_prompts(dataset, self.tokenizer, name=name, chat_template_kwargs=args.chat_template_kwargs,
                               need=need, bad_rows=getattr(args, "bad_rows", "error"))

    def _config_dataset(self):
        """The config's dataset_name (split dataset_split), else the bundled demo prompts."""
        from preftune.data.formats import load_rows

        args = self.args
        if args.dataset_name is None:
            from preftune.grpo.demo import demo_prompts

            return demo_prompts("train", n=getattr(args, "demo_train_size", None), tasks=args.demo_tasks)
        return load_rows(args.dataset_name, split=args.dataset_split or "train",
                         bad_rows=getattr(args, "bad_rows", "error"), config=args.dataset_config)

    def _eval_prompt_sets(self, eval_dataset) -> dict[str, PromptSet] | None:
        if eval_dataset is None:
            return None
        if isinstance(eval_dataset, dict) or type(eval_dataset).__name__ in ("DatasetDict", "IterableDatasetDict"):
            return {str(k): self._prompts(v, f"eval_dataset[{k!r}]") for k, v in eval_dataset.items()}
        return {"": self._prompts(eval_dataset, "eval_dataset")}

    def _build_reference(self):
        """None when beta == 0 (no KL term, no reference built); the policy with its adapters off under LoRA;
        else a frozen copy of the starting policy. sync_ref_model mixes the policy into it (TR-DPO's rule)."""
        from preftune import models
        from preftune.reference import (
            EMAReferenceSync,
            make_reference,
            prepare_reference_model,
            sharded_parameters,
        )

        args = self.args
        if args.beta == 0:
            if args.sync_ref_model:
                raise ValueError("sync_ref_model=True but beta=0.0: there is no reference to sync; set beta > 0 or "
                                 "drop sync_ref_model")
            return None
        sync = EMAReferenceSync(args.ref_model_mixup_alpha, args.ref_model_sync_steps) if args.sync_ref_model else None
        if sync is not None and sharded_parameters(self.accelerator):
            raise ValueError("sync_ref_model=True is not supported with sharded parameters (FSDP or DeepSpeed ZeRO-3); "
                             "use DDP or drop sync_ref_model")
        ref_model = None
        if not self.is_peft:
            ref_model = copy.deepcopy(self.accelerator.unwrap_model(self.model))
            models.disable_dropout(ref_model)
            ref_model = prepare_reference_model(ref_model, self.accelerator,
                                                micro_batch=self.args.per_device_train_batch_size,
                                                accumulation=self.args.gradient_accumulation_steps)
        return make_reference(loss_needs_reference=True, policy=self.model, ref_model=ref_model, sync=sync)

    @property
    def ref_model(self):
        return getattr(self.reference, "model", None) if not self.is_peft else None

    # --- what the loop asks for -------------------------------------------------------------------------------
    @property
    def _prompts_per_round(self) -> int:
        return self.generation_batch_size // self.num_generations

    def _rounds_per_epoch(self) -> int:
        return len(self.train_prompts) // self._prompts_per_round

    def _num_train_samples(self) -> int:
        rounds = self._rounds_per_epoch()
        if rounds == 0:
            raise ValueError(
                f"the training set has {len(self.train_prompts)} prompts, fewer than one generation batch of "
                f"{self._prompts_per_round} prompts (generation_batch_size {self.generation_batch_size} / "
                f"num_generations {self.num_generations}); lower per_device_train_batch_size, steps_per_generation "
                "or generation_batch_size, or add prompts")
        return rounds * self.generation_batch_size * self.num_iterations

    def _train_in_order(self) -> bool:
        return True  # the loop's plan only counts completions; rounds draw the prompts (prompt_order)

    def _has_eval(self) -> bool:
        return self.eval_prompts is not None

    def _loss_scale(self, plan) -> float:
        return 1.0  # policy_loss normalizes each micro-batch as TRL does (DDP averages over processes)

    def _host_collate(self):
        raise ValueError("dataloader_num_workers > 0 does not apply to GRPO: its batches are generated by the policy "
                         "during training; set dataloader_num_workers=0")

    def _progress_fields(self, row: dict) -> dict:
        fields = super()._progress_fields(row)
        if "reward" in row:
            fields["reward"] = f"{row['reward']:.3f}"
        return fields

    def _log_fields(self) -> dict:
        return {"num_tokens": float(self._num_tokens)}

    def _after_good_step(self, step: int, policy: torch.nn.Module) -> None:
        if self.reference is not None:
            self.reference.on_optimizer_step(step, policy)

    def _host_acts_after_good_steps(self) -> bool:
        return getattr(self.reference, "sync", None) is not None

    def _algorithm_state(self) -> dict | None:
        r = self._round
        return {"num_tokens": self._num_tokens, "entropy_coef": self._entropy_coef,
                "last_world_entropy": self._last_world_entropy,
                "round": None if r is None else {"index": r.index, "micro": r.micro, "metrics": r.metrics,
                                                 "num_items": r.num_items}}

    def _load_algorithm_state(self, state: dict) -> None:
        self._num_tokens = int(state.get("num_tokens", 0))
        self._entropy_coef = float(state.get("entropy_coef", self.args.entropy_coef))
        self._last_world_entropy = float(state.get("last_world_entropy", float("inf")))
        r = state.get("round")
        self._round = None if r is None else _Round(r["index"], r["micro"], r["metrics"], r["num_items"])

    # --- one micro-batch --------------------------------------------------------------------------------------
    def _sample_losses(self, indices: list[int]):
        args = self.args
        m = self.train_state.global_step * args.gradient_accumulation_steps + self._micro_index
        per_round = self.steps_per_generation * self.num_iterations
        r = m // per_round
        if self._round is None or self._round.index != r:
            self._round = self._make_round(r)
        records = self._round.micro[(m % per_round) % self.steps_per_generation]
        out, metrics, tokens = self._micro_loss(records, self._round)
        ids = torch.tensor([rec["row"] for rec in records], dtype=torch.long)
        # the loss couples the micro-batch's completions (its normalizers), so each carries an equal share: a
        # non-finite loss names all of them (the loop sums these)
        losses = out.loss.reshape(1).expand(len(records)) / len(records)
        return losses, {**self._round.metrics, **metrics}, tokens, ids

    def _micro_loss(self, records: list[dict], rnd: _Round, *, train: bool = True):
        """(PolicyLoss, metrics, tokens) of one micro-batch of completion records."""
        from preftune.grpo.objective import policy_loss
        from preftune.logps import model_token_logps

        args = self.args
        batch = self._collate(records)
        tok = model_token_logps(self.model, batch, chunk_size=args.logps_chunk_size, temperature=args.temperature,
                                entropies=True)
        logps, valid = tok.padded()  # (B, T) in record order
        entropies, _ = tok.padded(tok.entropies)
        mask = self._loss_mask(records, valid)
        old = self._padded(records, "old_logps", logps)
        ref = self._padded(records, "ref_logps", logps)
        adv = torch.tensor([rec["advantage"] for rec in records], dtype=torch.float32, device=logps.device)
        threshold = self._entropy_threshold(entropies, mask) if train else None
        out = policy_loss(
            logps, old, adv, mask, loss_type=args.loss_type, epsilon=args.epsilon, epsilon_high=args.epsilon_high,
            delta=args.delta, importance_sampling_level=args.importance_sampling_level, beta=args.beta,
            ref_per_token_logps=ref, use_bias_correction_kl=args.use_bias_correction_kl,
            max_completion_length=args.max_completion_length, sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg, vespo_k_pos=args.vespo_k_pos,
            vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg,
            entropies=entropies, top_entropy_quantile=args.top_entropy_quantile, entropy_threshold_value=threshold,
            entropy_coef=self._applied_entropy_coef(),
            off_policy_mask_threshold=args.off_policy_mask_threshold,
            num_items_in_batch=rnd.num_items if train else None,
            num_processes=self.accelerator.num_processes if train else 1,
            gradient_accumulation_steps=args.gradient_accumulation_steps if train else 1,
            steps_per_generation=self.steps_per_generation if train else 1)
        metrics = {"entropy": _masked_mean(entropies, valid)}
        if train and args.use_adaptive_entropy:
            self._adapt_entropy_coef(entropies, mask, threshold if threshold is not None else (
                _call_threshold(entropies, mask, args.top_entropy_quantile)))
        if train and (args.entropy_coef != 0.0 or args.use_adaptive_entropy):
            metrics["entropy_coef"] = torch.tensor(self._entropy_coef)
        for name, key in (("kl", "kl"), ("clip_ratio/low_mean", "clip_ratio_low"),
                          ("clip_ratio/high_mean", "clip_ratio_high"), ("clip_ratio/region_mean", "clip_ratio_region")):
            value = getattr(out, key, None)
            if value is not None:
                metrics[name] = value.detach()
        return out, metrics, int(batch["num_tokens"])

    def _applied_entropy_coef(self) -> float:
        """The entropy bonus's coefficient for this micro-batch: entropy_coef, or with use_adaptive_entropy the
        controller's coefficient while the last measured entropy is at most entropy_target, else 0 (TRL's rule)."""
        if not self.args.use_adaptive_entropy:
            return float(self.args.entropy_coef)
        return self._entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0

    def _adapt_entropy_coef(self, entropies: torch.Tensor, mask: torch.Tensor, threshold) -> None:
        """use_adaptive_entropy: add this micro-batch's entropy over the tokens the bonus acts on to the step's window;
        at the step's last micro-batch, measure the window's mean over every process and move the coefficient by
        entropy_coef_delta toward entropy_target (up when the entropy is at or below it), within [entropy_coef_min,
        entropy_coef_max]. It applies from the next step on."""
        args, acc = self.args, self.accelerator
        keep = mask.bool()
        if threshold is not None:
            keep = keep & (entropies >= threshold)
        self._entropy_window += torch.tensor([float(entropies[keep].sum()), float(keep.sum())], dtype=torch.float64)
        if self._micro_index != args.gradient_accumulation_steps - 1:
            return
        window = self._entropy_window.to(acc.device)
        if acc.num_processes > 1:
            window = acc.reduce(window, reduction="sum")
        world = float(window[0] / window[1].clamp(min=1.0))
        step = args.entropy_coef_delta
        if world <= args.entropy_target:
            self._entropy_coef = min(self._entropy_coef + step, args.entropy_coef_max)
        else:
            self._entropy_coef = max(self._entropy_coef - step, args.entropy_coef_min)
        self._last_world_entropy = world
        self._entropy_window = torch.zeros(2, dtype=torch.float64)

    def _entropy_threshold(self, entropies: torch.Tensor, mask: torch.Tensor):
        """top_entropy_quantile < 1: the entropy a token needs to stay in the loss, over this micro-batch's tokens of
        every process (TRL's rule); None with one process (policy_loss takes the call's own tokens)."""
        from preftune.grpo.objective import entropy_threshold

        acc = self.accelerator
        if self.args.top_entropy_quantile >= 1.0 or acc.num_processes == 1:
            return None
        flat = entropies[mask.bool()].float()
        flat = acc.pad_across_processes(flat, pad_index=float("nan"))
        every = acc.gather(flat)
        return entropy_threshold(every[~torch.isnan(every)], self.args.top_entropy_quantile)

    def _loss_mask(self, records: list[dict], mask: torch.Tensor) -> torch.Tensor:
        if self.args.mask_truncated_completions:
            keep = torch.tensor([not rec["truncated"] for rec in records], device=mask.device)
            mask = mask & keep[:, None]
        return mask.to(torch.float32)

    @staticmethod
    def _padded(records: list[dict], key: str, like: torch.Tensor) -> torch.Tensor | None:
        if records[0].get(key) is None:
            return None
        out = torch.zeros_like(like, dtype=torch.float32)
        for i, rec in enumerate(records):
            v = rec[key]
            out[i, : v.numel()] = v.to(out.device)
        return out

    def _collate(self, records: list[dict]) -> dict:
        """The micro-batch as one batch: consecutive completions of the same prompt form a group whose prompt is
        computed once (the shared-prompt layout; ``batch_layout`` padded / packed put one row per completion)."""
        from preftune.data.batching import collate_groups

        groups: list[dict] = []
        for rec in records:
            if groups and groups[-1]["key"] == rec["group"]:
                groups[-1]["completions"].append(rec["completion_ids"])
            else:
                groups.append({"key": rec["group"], "prompt_ids": rec["prompt_ids"],
                               "completions": [rec["completion_ids"]], "index": rec["row"]})
        return collate_groups([{k: v for k, v in g.items() if k != "key"} for g in groups], layout=self.layout,
                              pad_token_id=self.tokenizer.pad_token_id, pad_to_multiple_of=self.pad_multiple,
                              device=self.accelerator.device)

    # --- a generation round -----------------------------------------------------------------------------------
    def _round_prompts(self, r: int) -> list[int]:
        per_epoch = self._rounds_per_epoch()
        epoch, j = divmod(r, per_epoch)
        seed = int(self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        order = prompt_order(len(self.train_prompts), epoch, seed, bool(self.args.shuffle_dataset))
        P = self._prompts_per_round
        return order[j * P:(j + 1) * P]

    def _make_round(self, r: int) -> _Round:
        args, acc = self.args, self.accelerator
        G, n_proc, rank = self.num_generations, acc.num_processes, acc.process_index
        prompts = self._round_prompts(r)
        slots = [(row, g, k) for k, (row, g) in enumerate((row, g) for row in prompts for g in range(G))]
        L = self.generation_batch_size // n_proc
        self._timings = defaultdict(float)
        records = self._generate_and_score(self.train_prompts, slots[rank * L:(rank + 1) * L], r)
        records = self._gather(records)  # every process's, in slot order
        metrics = self._generation_metrics(records, prefix="")
        records = self._with_advantages(records, G)
        if args.dynamic_sampling:
            records, ds_metrics = self._dynamic_sampling(records, r)
            metrics.update(ds_metrics)
        mine = records[rank * L:(rank + 1) * L]
        num_items = sum(self._loss_tokens(rec) for rec in records)
        # TRL's num_tokens: prompt + completion tokens of every completion trained on, over every process, counted
        # once per round from the gathered records (no collective per micro-batch; the same in every batch layout)
        self._num_tokens += sum(len(rec["prompt_ids"]) + len(rec["completion_ids"]) for rec in records)
        micro = self._split(mine, r)
        t = time.perf_counter()
        self._attach_logps(micro)
        self._timings["timing/logps_s"] += time.perf_counter() - t
        metrics.update(self._timings)  # this process's seconds of the round's generation, scoring and log-probs
        if args.log_completions and acc.is_main_process:
            self._write_completions(records, r)
        return _Round(r, micro, metrics, num_items)

    def _loss_tokens(self, rec: dict) -> int:
        if self.args.mask_truncated_completions and rec["truncated"]:
            return 0
        return len(rec["completion_ids"])

    def _gather(self, records: list[dict]) -> list[dict]:
        if self.accelerator.num_processes == 1:
            return records
        from accelerate.utils import gather_object

        return gather_object(records)

    def _generate_and_score(self, prompts: PromptSet, slots: list[tuple[int, int, int]], r: int) -> list[dict]:
        """Completion records of these slots ((row, g, slot) triples, a prompt's consecutive), with their rewards."""
        t0 = time.perf_counter()
        records = self._generate(prompts, slots, r)
        t1 = time.perf_counter()
        if records:
            self._score(prompts, records)
        timings = getattr(self, "_timings", None)
        if timings is not None:
            timings["timing/generation_s"] += t1 - t0
            timings["timing/scoring_s"] += time.perf_counter() - t1
        return records

    def _generate(self, prompts: PromptSet, slots: list[tuple[int, int, int]], r: int) -> list[dict]:
        args = self.args
        runs: list[tuple[int, list[tuple[int, int, int]]]] = []  # (row, its slots) for consecutive slots
        for s in slots:
            if runs and runs[-1][0] == s[0] and runs[-1][1][-1][1] + 1 == s[1]:
                runs[-1][1].append(s)
            else:
                runs.append((s[0], [s]))
        seed = int(args.seed)
        by_count: dict[int, list[int]] = defaultdict(list)
        for i, (_, run) in enumerate(runs):
            by_count[len(run)].append(i)
        done: dict[int, tuple[list[list[int]], list[bool]]] = {}
        model = self.accelerator.unwrap_model(self.model)
        if self.rollout_func is not None:
            return self._rollout_func_records(prompts, runs, r)
        from preftune.grpo.rollout import generate_groups

        if args.use_transformers_continuous_batching:
            ids, trunc = self._generate_continuous(model, [prompts.prompt_ids[row] for row, run in runs for _ in run])
            k = 0
            for i, (_, run) in enumerate(runs):
                done[i] = (ids[k:k + len(run)], trunc[k:k + len(run)])
                k += len(run)
            by_count = {}
        for count, which in by_count.items():
            out = generate_groups(
                model, [prompts.prompt_ids[runs[i][0]] for i in which], count,
                max_new_tokens=args.max_completion_length, eos_token_ids=self.eos_token_ids,
                pad_token_id=self.tokenizer.pad_token_id, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k or 0, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                seeds=[row_seed(seed, r, k) for i in which for (_, _, k) in runs[i][1]],
                generation_kwargs=args.generation_kwargs)
            for j, i in enumerate(which):
                done[i] = (out.completion_ids[j * count:(j + 1) * count], out.truncated[j * count:(j + 1) * count])
        records = []
        for i, (row, run) in enumerate(runs):
            ids, trunc = done[i]
            for (_, g, k), c, t in zip(run, ids, trunc):
                records.append({"row": row, "g": g, "slot": k, "group": (r, row, run[0][2] - run[0][1]),
                                "prompt_ids": prompts.prompt_ids[row], "completion_ids": list(c),
                                "truncated": bool(t)})
        return records

    def _generate_continuous(self, model, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[bool]]:
        """use_transformers_continuous_batching: transformers' continuous-batching engine (``generate_batch``), one
        request per completion, with transformers' own sampling (its draws are not the per-completion seeded ones
        of preftune's decoding, so a run is not reproducible across process layouts). On CPU it is far slower than
        preftune's decoding (docs/benchmarks.md)."""
        from transformers import GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        args = self.args
        cb = args.transformers_continuous_batching_config
        if isinstance(cb, str):
            import json

            cb = json.loads(cb)
        cb = dict(cb or {})
        cb.setdefault("max_memory_percent", 0.5)  # room for the update's backward (TRL's training default)
        config = GenerationConfig(max_new_tokens=args.max_completion_length, do_sample=True,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or 0,
                                  min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                  eos_token_id=self.eos_token_ids, pad_token_id=self.tokenizer.pad_token_id,
                                  **(args.generation_kwargs or {}))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.generate_batch(prompt_ids, generation_config=config,
                                           continuous_batching_config=ContinuousBatchingConfig(**cb), progress_bar=False)
        finally:
            model.train(was_training)
        results = [out[k] for k in sorted(out, key=lambda k: int(str(k).rsplit("_", 1)[-1]))]
        failed = [getattr(o, "error", None) for o in results if getattr(o, "error", None)]
        if len(results) != len(prompt_ids) or failed:
            raise RuntimeError(f"transformers' continuous batching returned {len(results)} of {len(prompt_ids)} "
                               f"completions{f' ({failed[0]})' if failed else ''}; adjust "
                               "transformers_continuous_batching_config or set use_transformers_continuous_batching"
                               "=False")
        ids, trunc = [], []
        for o in results:
            c = [int(t) for t in o.generated_tokens]
            end = next((j for j, t in enumerate(c) if t in self.eos_token_ids), None)
            ids.append(c if end is None else c[: end + 1])
            trunc.append(end is None)
        return ids, trunc

    def _rollout_func_records(self, prompts: PromptSet, runs, r: int) -> list[dict]:
        counts = {len(run) for _, run in runs}
        if counts != {self.num_generations}:
            raise ValueError("rollout_func needs every process to hold whole groups: make per_device_train_batch_size "
                             "x steps_per_generation a multiple of num_generations")
        raw = [prompts.rows[row]["prompt"] for row, _ in runs]
        out = self.rollout_func(raw, self)
        missing = {"prompt_ids", "completion_ids", "logprobs"} - set(out)
        if missing:
            raise ValueError(f"rollout_func must return keys {sorted(missing)} in its output dict")
        n = len(runs) * self.num_generations
        if len(out["completion_ids"]) != n:
            raise ValueError(f"rollout_func returned {len(out['completion_ids'])} completions for {len(runs)} prompts; "
                             f"expected {n} (num_generations={self.num_generations} per prompt)")
        extra = {k: v for k, v in out.items() if k not in ("prompt_ids", "completion_ids", "logprobs")}
        records, k = [], 0
        for row, run in runs:
            for (_, g, slot) in run:
                c = [int(t) for t in out["completion_ids"][k]]
                p = out["prompt_ids"][k] if len(out["prompt_ids"]) == n else out["prompt_ids"][k // self.num_generations]
                truncated = not c or c[-1] not in self.eos_token_ids
                records.append({"row": row, "g": g, "slot": slot, "group": (r, row, run[0][2] - run[0][1]),
                                "prompt_ids": [int(t) for t in p], "completion_ids": c, "truncated": truncated,
                                "extra": {key: v[k] for key, v in extra.items()}})
                k += 1
        return records

    def _score(self, prompts: PromptSet, records: list[dict]) -> None:
        tok = self.tokenizer
        texts = tok.batch_decode([rec["completion_ids"] for rec in records], skip_special_tokens=True)
        raw = [prompts.rows[rec["row"]]["prompt"] for rec in records]
        if prompts.conversational:
            completions = [[{"role": "assistant", "content": t}] for t in texts]
        else:
            completions = texts
        columns = prompts.column_lists([rec["row"] for rec in records])
        for key in records[0].get("extra", {}):
            columns[key] = [rec["extra"][key] for rec in records]
        out = self.rewards(raw, completions, [rec["completion_ids"] for rec in records], columns,
                           trainer_state=self.state)
        rewards = out.rewards.detach().to("cpu", torch.float32)
        for i, rec in enumerate(records):
            rec["rewards"] = rewards[i].tolist()
            rec["text"] = texts[i]
        for key, values in (out.logs or {}).items():
            for rec, v in zip(records, values):
                rec.setdefault("logs", {})[key] = v
        for key, values in (out.metrics or {}).items():  # log_metric: averaged over the round
            vals = values if isinstance(values, (list, tuple)) else [values]
            records[0].setdefault("metrics", {}).setdefault(key, []).extend(float(v) for v in vals)

    def _with_advantages(self, records: list[dict], G: int) -> list[dict]:
        from preftune.grpo.objective import group_advantages

        args = self.args
        rewards = torch.tensor([rec["rewards"] for rec in records], dtype=torch.float32)
        adv = group_advantages(rewards, G, reward_weights=args.reward_weights, scale_rewards=args.scale_rewards,
                               multi_objective_aggregation=args.multi_objective_aggregation)
        for i, rec in enumerate(records):
            rec["advantage"] = float(adv.advantages[i])
            rec["reward"] = float(adv.rewards[i])
            rec["zero_std"] = bool(adv.zero_std[i])
        return records

    def _dynamic_sampling(self, records: list[dict], r: int) -> tuple[list[dict], dict]:
        """DAPO's dynamic sampling: groups whose rewards are all equal (no signal) are replaced by the groups of
        new prompts, drawn with a seed of (run seed, round, attempt), until the round is full of groups with
        signal or ``max_resample_rounds`` attempts are spent; the rest is filled with the dropped groups (their
        advantages are 0) and counted."""
        args, acc = self.args, self.accelerator
        G = self.num_generations
        groups = [records[i:i + G] for i in range(0, len(records), G)]
        if any(len({rec["row"] for rec in grp}) != 1 for grp in groups):
            raise ValueError("dynamic_sampling needs each group's completions together: keep generation_batch_size "
                             "a multiple of num_generations")
        kept = [grp for grp in groups if not grp[0]["zero_std"]]
        dropped = [grp for grp in groups if grp[0]["zero_std"]]
        need, attempts, generated = len(groups) - len(kept), 0, 0
        rng = random.Random(row_seed(int(args.seed), r, -1))
        while need > 0 and attempts < int(args.max_resample_rounds):
            attempts += 1
            rows = [rng.randrange(len(self.train_prompts)) for _ in range(need)]
            base = self.generation_batch_size * attempts
            slots = [(row, g, base + j * G + g) for j, row in enumerate(rows) for g in range(G)]
            per = -(-len(slots) // acc.num_processes)
            per = -(-per // G) * G  # whole groups per process
            mine = slots[acc.process_index * per:(acc.process_index + 1) * per]
            new = self._gather(self._generate_and_score(self.train_prompts, mine, r))
            generated += len(new) // G
            new = self._with_advantages(new, G)
            for grp in (new[i:i + G] for i in range(0, len(new), G)):
                if not grp[0]["zero_std"] and need > 0:
                    kept.append(grp)
                    need -= 1
        filled = dropped[:need]
        final = kept + filled
        out = [rec for grp in final for rec in grp]
        # the advantages of the final batch (scale_rewards="batch" normalizes over it)
        out = self._with_advantages(out, G)
        return out, {"dynamic_sampling/resample_rounds": float(attempts),
                     "dynamic_sampling/generated_groups": float(generated),
                     "dynamic_sampling/frac_filled_zero_std": len(filled) / max(1, len(groups))}

    def _split(self, mine: list[dict], r: int) -> list[list[dict]]:
        """This process's completions cut into ``steps_per_generation`` micro-batches, after shuffling whole groups
        (seeded by the run and the round): a group stays together unless it spans a micro-batch boundary."""
        groups: list[list[dict]] = []
        for rec in mine:
            if groups and groups[-1][0]["group"] == rec["group"]:
                groups[-1].append(rec)
            else:
                groups.append([rec])
        if self.steps_per_generation > 1:
            random.Random(row_seed(int(self.args.seed), r, -2)).shuffle(groups)
        flat = [rec for grp in groups for rec in grp]
        B = self.args.per_device_train_batch_size
        return [flat[i * B:(i + 1) * B] for i in range(self.steps_per_generation)]

    def _needs_old_logps(self) -> bool:
        """TRL's rule: the round outlives the optimizer step it began in (gradient_accumulation_steps is not a
        multiple of steps_per_generation x num_iterations), so the policy that sampled is not the one trained."""
        return self.args.gradient_accumulation_steps % (self.steps_per_generation * self.num_iterations) != 0

    def _attach_logps(self, micro: list[list[dict]]) -> None:
        """Old-policy (when needed) and reference (beta > 0) per-token log-probs, without autograd, per micro-batch."""
        old, ref = self._needs_old_logps(), self.reference is not None
        if not (old or ref):
            return
        from preftune.reference import forward_token_logps

        kw = dict(chunk_size=self.args.logps_chunk_size, temperature=self.args.temperature)
        for records in micro:
            if not records:
                continue
            batch = self._collate(records)
            outs = []
            if old:
                outs.append(("old_logps", forward_token_logps(self.model, batch, **kw)))
            if ref:
                outs.append(("ref_logps", self.reference.token_logps(batch, **kw)))
            for key, tok in outs:
                values, mask = tok.padded()
                for i, rec in enumerate(records):
                    rec[key] = values[i, : int(mask[i].sum())].detach().cpu()

    # --- metrics ----------------------------------------------------------------------------------------------
    def _generation_metrics(self, records: list[dict], *, prefix: str) -> dict[str, float]:
        """TRL's generation metrics over every process's completions of a round."""
        from preftune.grpo.objective import nanstd

        G = self.num_generations if not prefix else self.num_generations_eval
        lengths = torch.tensor([len(rec["completion_ids"]) for rec in records], dtype=torch.float32)
        trunc = torch.tensor([rec["truncated"] for rec in records])
        rewards = torch.tensor([rec["rewards"] for rec in records], dtype=torch.float32)  # (N, F)
        weights = torch.tensor(self.args.reward_weights if self.args.reward_weights is not None
                               else [1.0] * rewards.shape[1], dtype=torch.float32)
        total = (rewards * weights).nansum(dim=1)
        total[torch.isnan(rewards).all(dim=1)] = float("nan")
        m: dict[str, float] = {}
        m["completions/mean_length"] = float(lengths.mean())
        m["completions/min_length"] = float(lengths.min())
        m["completions/max_length"] = float(lengths.max())
        m["completions/clipped_ratio"] = float(trunc.float().mean())
        term = lengths[~trunc]
        m["completions/mean_terminated_length"] = float(term.mean()) if term.numel() else 0.0
        m["completions/min_terminated_length"] = float(term.min()) if term.numel() else 0.0
        m["completions/max_terminated_length"] = float(term.max()) if term.numel() else 0.0
        for j, name in enumerate(self.reward_func_names):
            col = rewards[:, j]
            col = col[~torch.isnan(col)]
            m[f"rewards/{name}/mean"] = float(col.mean()) if col.numel() else float("nan")
            m[f"rewards/{name}/std"] = float(col.std()) if col.numel() > 1 else float("nan")
        logged: dict[str, list[float]] = defaultdict(list)
        for rec in records:
            for key, vals in rec.get("metrics", {}).items():
                logged[key].extend(vals)
        for key, vals in logged.items():
            m[key] = sum(vals) / len(vals)
        n_groups = len(records) // G
        grouped = total[: n_groups * G].view(n_groups, G)
        m["reward"] = float(total.nanmean())
        group_std = nanstd(grouped, dim=1) if n_groups else None
        m["reward_std"] = float(group_std.nanmean()) if n_groups else float("nan")
        m["frac_reward_zero_std"] = float((group_std == 0).float().mean()) if n_groups else float("nan")
        return m

    def _write_completions(self, records: list[dict], r: int) -> None:
        import json

        n = self.args.num_completions_to_print
        rows = records
        if self.args.log_unique_prompts:  # one row per prompt
            seen: set = set()
            rows = [rec for rec in records if not (rec["row"] in seen or seen.add(rec["row"]))]
        rows = rows if n is None else rows[: int(n)]
        self._completions_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._completions_path, "a", encoding="utf-8") as f:
            for rec in rows:
                prompt = self.train_prompts.rows[rec["row"]]["prompt"]
                f.write(json.dumps({"step": self.train_state.global_step, "round": r, "prompt": prompt,
                                    "completion": rec["text"], "rewards": dict(zip(self.reward_func_names, rec["rewards"])),
                                    "advantage": rec["advantage"]}, default=str) + "\n")

    # --- evaluation -------------------------------------------------------------------------------------------
    def _eval_metrics(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict:
        sets = self.eval_prompts if eval_dataset is None else self._eval_prompt_sets(eval_dataset)
        if not sets:
            raise ValueError("evaluate() needs an eval dataset: pass eval_dataset= to the trainer or to evaluate()")
        out = {}
        for name, prompts in sets.items():
            prefix = f"{metric_key_prefix}_{name}_" if name else f"{metric_key_prefix}_"
            out.update({prefix + k: v for k, v in self._evaluate(prompts).items()})
        return out

    @torch.no_grad()
    def _evaluate(self, prompts: PromptSet) -> dict[str, float]:
        """Completions of every eval prompt (``num_generations_eval`` each, fixed seeds), their rewards and the
        on-policy loss; prompts spread over processes, metrics over all of them."""
        acc, G = self.accelerator, self.num_generations_eval
        was_training = self.model.training
        self.model.eval()
        try:
            rows = list(range(len(prompts)))
            mine = rows[acc.process_index::acc.num_processes]
            per_chunk = max(1, self.args.per_device_eval_batch_size // G)
            records: list[dict] = []
            for c in range(0, len(mine), per_chunk):
                chunk = mine[c:c + per_chunk]
                slots = [(row, g, row * G + g) for row in chunk for g in range(G)]
                records += self._generate_and_score(prompts, slots, -1)
            loss_sum, n_loss = 0.0, 0
            if records:  # this process's whole groups: their advantages, and the on-policy loss
                records = self._with_advantages(records, G)
                B, rnd = self.args.per_device_eval_batch_size, _Round(-1, [], {}, 0)
                for i in range(0, len(records), B):
                    out, _, _ = self._micro_loss(records[i:i + B], rnd, train=False)
                    loss_sum, n_loss = loss_sum + float(out.loss), n_loss + 1
            records = self._gather([{k: v for k, v in rec.items() if k not in ("old_logps", "ref_logps")}
                                    for rec in records])
            sums = self._gather([(loss_sum, n_loss)])
            records.sort(key=lambda rec: rec["slot"])
            metrics = self._generation_metrics(records, prefix="eval")
            metrics["loss"] = sum(s for s, _ in sums) / max(1, sum(n for _, n in sums))
            return metrics
        finally:
            self.model.train(was_training)


def _refuse_vllm() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError("use_vllm=True needs the vllm package, which is not installed (it runs on a GPU: pip install "
                          "vllm); without it set use_vllm=False: preftune generates with its own batched decoding "
                          "(each prompt's forward once, its cache shared by its completions)")
    raise ValueError("use_vllm=True: preftune has no vLLM engine yet; set use_vllm=False (preftune's own batched "
                     "decoding) or use_transformers_continuous_batching=True")


def _call_threshold(entropies: torch.Tensor, mask: torch.Tensor, quantile: float):
    from preftune.grpo.objective import entropy_threshold

    return entropy_threshold(entropies[mask.bool()], quantile) if quantile < 1.0 else None


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


__all__ = ["GRPOTrainer"]
