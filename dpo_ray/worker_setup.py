"""Set-up hooks Ray runs in every worker process of a dpo-ray job (``runtime_env["worker_process_setup_hook"]``).

Every Ray worker of the job imports this module, Ray Data's task workers included, so it imports nothing but
``logging``: importing torch or Ray Train here would add their memory to each of those processes.
"""

from __future__ import annotations

import logging

# Ray Train 2.60's PlacementGroupCleaner (one detached actor per run) asks the State API every second whether the
# run's controller lives, and logs this warning each time the query fails; without the dashboard every query fails.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_state_api_warnings() -> None:
    """For a local instance without the dashboard: keep the cleaner's once-a-second warning out of the run's log.

    What the cleaner guards against, a controller that dies while its driver lives on, needs no cleaner there: the
    failed ``fit`` ends the command, and a local instance ends with its driver, placement groups and all. The
    cleaner's errors still show.
    """
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
