#!/usr/bin/env python
"""Supervised fine-tuning on preferred responses, on Ray Train: the DPO paper's reference policy when no
SFT model exists (maximum likelihood on the chosen responses of data.train; rejected is ignored).

    python workflows/sft.py --set data.train=pairs.jsonl --set train.max_steps=600 --set output_dir=outputs/sft
    python workflows/sft.py --config configs/demo.yaml --set data.train=outputs/demo/task/sft_train.jsonl \
        --set model.name_or_path=outputs/demo/model_stage/model --set output_dir=outputs/sft --set run_name=sft

The result is <output_dir>/final_model (a Hugging Face directory) and <output_dir>/summary.json.
"""

from dpo_ray.cli import main_sft

if __name__ == "__main__":
    main_sft()
