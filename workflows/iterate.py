#!/usr/bin/env python
"""Iterative DPO on a verifiable task: rounds of sample -> verify -> pair -> DPO with an NLL term on chosen.

    python workflows/iterate.py                                        # 3 rounds on the embedded arithmetic task
    python workflows/iterate.py --seeds 3                              # mean and spread over 3 seeds
    python workflows/iterate.py --iterate rounds=2 --iterate reference=sft --set dpo.rpo_alpha=0.5
    python workflows/iterate.py --set model.name_or_path=my-sft-model --set task.verifier=mypkg.checks:grade \
        --set task.prompts=train.jsonl --set task.heldout_prompts=heldout.jsonl --iterate max_new_tokens=256

Each round samples from the last round's policy, checks the answers (task.verifier), pairs wrong against
verified answers and trains DPO from that policy. Preferred-FT and one-round DPO run at the same budget.
Re-running resumes at the round and step reached. Results: <output_dir>/rounds.csv, rounds.png, summary.json.
"""

from dpo_ray.cli import main_iterate

if __name__ == "__main__":
    main_iterate()
