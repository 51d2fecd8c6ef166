"""dpo-ray side of benchmarks/compare_trl.py: ``python workflows/train.py --set ...`` (or ``sweep.py``) plus timestamps.

    python benchmarks/_dpo_ray_worker.py RESULT.json [--command train|sweep] [--ray-init JSON] -- --set key=value ...

Everything after ``--`` goes to ``dpo_ray.cli.main_train`` (``--command sweep``: ``main_sweep``), the function
``workflows/train.py`` (``workflows/sweep.py``) calls, so the run is the same as the command line a user types.
This wrapper only records when each phase ends (it wraps the library functions with timers; nothing in the
library changes) and writes them, with the summary, to RESULT.json. ``--ray-init`` passes extra ``ray.init``
keyword arguments; it exists to measure suggested library changes and is off in the comparison.
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


def parse_wrapper_args(argv: list[str]) -> tuple[str, str, dict, list[str]]:
    """(result file, command, extra ray.init kwargs, the command's own arguments) from this wrapper's argv."""
    split = argv.index("--") if "--" in argv else len(argv)
    result_file, extra, command_args = argv[0], argv[1:split], argv[split + 1 :]
    options = dict(zip(extra[::2], extra[1::2]))
    unknown = set(options) - {"--command", "--ray-init"}
    if unknown or len(extra) % 2:
        raise SystemExit(f"_dpo_ray_worker.py: unexpected arguments {extra}")
    command = options.get("--command", "train")
    if command not in ("train", "sweep"):
        raise SystemExit(f"_dpo_ray_worker.py: --command must be train or sweep, got {command!r}")
    return result_file, command, json.loads(options.get("--ray-init", "{}")), command_args


def add_ray_init_extras(ray_init_kwargs: dict) -> None:
    """Make ``ray.init`` take ``ray_init_kwargs`` on top of what the library passes (experiments only)."""
    import ray

    original_init = ray.init

    @functools.wraps(original_init)
    def init_with_extras(*args, **kwargs):
        return original_init(*args, **{**kwargs, **ray_init_kwargs})

    ray.init = init_with_extras


def main(argv: list[str]) -> None:
    result_file, command, ray_init_kwargs, command_args = parse_wrapper_args(argv)
    import ray  # noqa: F401

    import dpo_ray.cli
    import dpo_ray.data.pipeline
    import dpo_ray.sweep.trial
    import dpo_ray.trainer

    MARKS["imports_done"] = time.time()
    if ray_init_kwargs:
        add_ray_init_extras(ray_init_kwargs)
    timed(dpo_ray.cli, "init_ray", "ray_init")  # the name the CLI calls
    timed(dpo_ray.data.pipeline, "prepare_data", "prepare_data")  # read, tokenize, split, reference pass
    timed(dpo_ray.sweep.trial, "prepare_data", "prepare_data")  # the same, as the sweep's driver calls it
    timed(dpo_ray.data.pipeline, "prepare_reference_logps", "reference")  # the reference pass alone
    timed(dpo_ray.trainer, "build_trainer", "build_trainer")
    import ray.train.torch

    timed(ray.train.torch.TorchTrainer, "fit", "fit")  # worker group, model load, train, eval, checkpoint

    main_command = dpo_ray.cli.main_train if command == "train" else dpo_ray.cli.main_sweep
    summary = main_command(command_args)
    MARKS["run_done"] = time.time()
    with open(result_file, "w") as f:
        json.dump({"marks": MARKS, "summary": summary, "command": command}, f, indent=2, default=str)


if __name__ == "__main__":
    main(sys.argv[1:])
