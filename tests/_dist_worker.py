"""Run by tests/test_distributed.py under `accelerate launch` (or plain python): train runs from a JSON spec.

    python tests/_dist_worker.py SPEC.json

SPEC: {"model": dir, "jobs": [{"config": {DPOConfig fields}, "resume": path or null, "out": json path,
"expect_error": text or absent}]}.
Each job trains with the DPOTrainer API, saves the final model, and (main process) writes the process
count and the evaluation results to "out". Launching this file under several processes is exactly
what a user does; nothing here knows how many processes there are.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    from preftune.config import DPOConfig
    from preftune.trainer import DPOTrainer

    spec = json.loads(Path(spec_path).read_text())
    for job in spec["jobs"]:
        trainer = DPOTrainer(model=spec["model"], args=DPOConfig(**job["config"]))
        if job.get("expect_error"):  # the job must fail with a ValueError naming this text
            try:
                trainer.train()
            except ValueError as e:
                assert job["expect_error"] in str(e), str(e)
                print(f"expected error: {e}")
                continue
            raise AssertionError(f"expected a ValueError with {job['expect_error']!r}")
        trainer.train(resume_from_checkpoint=job.get("resume"))
        trainer.save_model()
        if trainer.accelerator.is_main_process:
            Path(job["out"]).write_text(json.dumps({
                "num_processes": trainer.accelerator.num_processes,
                "initial_eval": getattr(trainer, "initial_eval", None),
                "final_eval": getattr(trainer, "final_eval", None),
            }))
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
