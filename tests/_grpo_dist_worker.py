"""A GRPO job for tests/test_grpo_distributed.py, run in one process or under torchrun.

argv[1]: a JSON spec {"model": dir, "config": {...GRPOConfig fields...}, "out": json path, "rows": n}.
The reward is a fixed function of each completion's characters, so every process scores alike.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def reward(completions, **kwargs):
    return [len(set(c)) / 10.0 + (0.5 if "a" in c else 0.0) for c in completions]


def main(spec_path: str) -> None:
    import torch

    from preftune import GRPOConfig, GRPOTrainer

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("fsdp_on_cpu"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _dist_worker import force_fsdp_on_cpu

        force_fsdp_on_cpu()
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    rows = [{"prompt": f"Q{i}: name a {words[i % len(words)]} thing"} for i in range(spec["rows"])]
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=reward, args=GRPOConfig(**spec["config"]),
                          train_dataset=rows)
    trainer.train(resume_from_checkpoint=spec.get("resume"))
    full = trainer._full_state_dict()  # gathered under FSDP (a collective), None otherwise
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        state = full if full is not None else model.state_dict()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, spec["out"])
        Path(spec["out"] + ".json").write_text(json.dumps({"distributed_type": str(trainer.accelerator.distributed_type)}))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
