#!/usr/bin/env python
"""Show that DPO changes what a model does, and by how much, in a few minutes on a laptop CPU.

    python workflows/demo.py                                  # the embedded default (configs/demo.yaml)
    python workflows/demo.py --set dpo.beta=0.5 --demo sft_steps=800 --set output_dir=outputs/demo-b05

Stages: tiny model -> SFT reference -> self-generated pairs -> DPO -> Preferred-FT -> evaluation.
Re-running skips stages whose outputs exist. Results: <output_dir>/summary.json and <output_dir>/demo.png.
"""

from dpo_ray.cli import main_demo

if __name__ == "__main__":
    main_demo()
