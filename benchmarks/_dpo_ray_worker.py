"""dpo-ray side of benchmarks/compare_trl.py: ``python workflows/train.py --set ...`` plus timestamps.

    python benchmarks/_dpo_ray_worker.py RESULT.json [--ray-init JSON] -- --set key=value ...

Everything after ``--`` goes to ``dpo_ray.cli.main_train``, the function ``workflows/train.py`` calls,
so the run is the same as the command line a user types. This wrapper only records when each phase ends
(it wraps the library functions with timers; nothing in the library changes) and writes them, with the
summary, to RESULT.json. ``--ray-init`` passes extra ``ray.init`` keyword arguments; it exists to measure
suggested library changes (e.g. ``{"include_dashboard": false}``) and is off in the comparison.
"""

from __future__ import annotations

import time

T_PROCESS = time.time()

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

MARKS: dict[str, float] = {"process_start": T_PROCESS}


def timed(module, name: str, label: str) -> None:
    """Replace ``module.name`` with a wrapper that records ``<label>_start`` / ``<label>_done``."""
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        MARKS.setdefault(f"{label}_start", time.time())
        try:
            return original(*args, **kwargs)
        finally:
            MARKS[f"{label}_done"] = time.time()

    setattr(module, name, wrapper)


def main(argv: list[str]) -> None:
    result_file = argv[0]
    split = argv.index("--") if "--" in argv else len(argv)
    extra = argv[1:split]
    train_args = argv[split + 1 :]
    ray_init_kwargs = {}
    if extra[:1] == ["--ray-init"]:
        ray_init_kwargs = json.loads(extra[1])

    import ray

    import dpo_ray.cli
    import dpo_ray.data.pipeline
    import dpo_ray.trainer

    MARKS["imports_done"] = time.time()
    if ray_init_kwargs:
        original_init = ray.init

        @functools.wraps(original_init)
        def init_with_extras(*args, **kwargs):
            return original_init(*args, **{**kwargs, **ray_init_kwargs})

        ray.init = init_with_extras
    timed(dpo_ray.cli, "init_ray", "ray_init")  # the name the CLI calls
    timed(dpo_ray.data.pipeline, "prepare_data", "prepare_data")  # read, tokenize, split, reference pass
    timed(dpo_ray.data.pipeline, "prepare_reference_logps", "reference")  # the reference pass alone
    timed(dpo_ray.trainer, "build_trainer", "build_trainer")
    import ray.train.torch

    timed(ray.train.torch.TorchTrainer, "fit", "fit")  # worker group, model load, train, eval, checkpoint

    summary = dpo_ray.cli.main_train(train_args)
    MARKS["run_done"] = time.time()
    with open(result_file, "w") as f:
        json.dump({"marks": MARKS, "summary": summary}, f, indent=2, default=str)


if __name__ == "__main__":
    main(sys.argv[1:])
