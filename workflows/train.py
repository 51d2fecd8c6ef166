#!/usr/bin/env python
"""Train a policy with DPO on Ray.

    python workflows/train.py                               # embedded default: bundled HH data, tiny model
    python workflows/train.py --config configs/default.yaml --set dpo.beta=0.2
    ray job submit --working-dir . -- python workflows/train.py --config configs/default.yaml
"""

from dpo_ray.cli import main_train

if __name__ == "__main__":
    main_train()
