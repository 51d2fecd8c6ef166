#!/usr/bin/env python
"""Sweep DPO's beta and learning rate with Ray Tune; the best trial's model lands in <output_dir>/best_model.

    python workflows/sweep.py --config configs/sweep.yaml
    python workflows/sweep.py --config configs/sweep.yaml --set sweep.num_samples=8 --set output_dir=outputs/sweep8
    ray job submit --working-dir . -- python workflows/sweep.py --config configs/sweep.yaml

Running the same command again resumes an interrupted sweep (finished trials are not redone).
"""

from dpo_ray.cli import main_sweep

if __name__ == "__main__":
    main_sweep()
