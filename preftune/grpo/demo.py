"""The bundled demo prompts for GRPO: the demo tasks' prompts with the columns their verifiers read.

Rows are the preference demo rows (``preftune.data.demo``) without ``chosen``/``rejected``: a conversational
``prompt`` and ``task``, ``answer``, ``constraint``, ``max_words``, which the demo rewards
(``preftune.rewards.demo_reward`` and its dense companion) receive as keyword lists.
"""

from __future__ import annotations

from preftune.data.demo import demo_dataset


def demo_prompts(split: str = "train", n: int | None = None, tasks=None, seed: int = 0) -> list[dict]:
    """n prompt rows of one demo split (train and eval disjoint), the same for the same seed."""
    return [{k: v for k, v in row.items() if k not in ("chosen", "rejected")}
            for row in demo_dataset(split, n=n, seed=seed, tasks=tasks)]
