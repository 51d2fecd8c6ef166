"""Workarounds for Ray 2.60 (Train V2 with Tune), in one place; each says what it works around.

Checked against the installed Ray 2.60.0 source. When Ray is upgraded, re-check each one and delete what the
new version fixes:

* placement groups a stopped trial's Train controller leaves behind (:func:`release_orphaned_train_placement_groups`,
  :class:`PlacementGroupReleaser`, :func:`release_placement_groups_after_sweep`);
* placement groups created in the instant a driver job ends (:func:`release_leaked_placement_groups`, limited
  to this run's own jobs);
* SIGTERM, which Tune does not treat as a stop request (:func:`forward_sigterm_as_sigint`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import ray
from ray import tune
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.state import list_actors, list_placement_groups

from dpo_ray.cluster import RUN_METADATA_KEY

logger = logging.getLogger("dpo_ray")

TRAIN_WORKER_CLASS = "RayTrainWorker"
FINISHED_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


def remove_placement_group_by_id(group: str) -> None:
    remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))


# ------------------------------------------------------------------------------------ groups of finished jobs


def find_leaked_placement_groups(groups, jobs) -> list[str]:
    """Ids of placement groups that outlived their job: not detached, still holding (or waiting for)
    resources, created by one of ``jobs`` that has finished.

    Ray removes a job's placement groups when the job ends, but a group created in the same instant
    (a Train controller starting its workers while the driver is being stopped) survives that cleanup
    and holds its CPUs for as long as the cluster lives. ``groups``: Ray State API records; ``jobs``:
    records with ``job_id`` and ``status`` (pass only this run's jobs, see :func:`select_jobs_of_run`).
    """
    finished = {str(j.job_id) for j in jobs if getattr(j.status, "value", j.status) in FINISHED_JOB_STATES}
    return [g.placement_group_id for g in groups
            if g.creator_job_id in finished and not g.is_detached and g.state in ("CREATED", "PENDING")]


@dataclass(frozen=True)
class JobRecord:
    """One driver job of the cluster, from the GCS job table."""

    job_id: str  # hex, as in the State API's placement group records
    status: str  # "RUNNING" or "SUCCEEDED": the job table only knows alive or dead (Ray's list_jobs says the same)
    metadata: dict[str, str] = field(default_factory=dict)


def list_job_records() -> list[JobRecord]:
    """Every driver job the cluster knows, with the metadata its driver passed to ``ray.init``.

    Not ``ray.util.state.list_jobs``: for a job started by ``ray job submit`` that lists the submission's
    metadata, not the driver's, so dpo-ray's mark (set in ``init_ray``) would be missing. The GCS job
    table holds both; Ray's own autoscaler and usage stats read it the same way.
    """
    gcs = ray._private.worker.global_worker.gcs_client
    table = gcs.get_all_job_info(skip_submission_job_info_field=True, skip_is_running_tasks_field=True)
    return [JobRecord(job_id=entry.job_id.hex(), status="SUCCEEDED" if entry.is_dead else "RUNNING",
                      metadata=dict(entry.config.metadata)) for entry in table.values()]


def select_jobs_of_run(jobs: list[JobRecord], this_job_id: str) -> list[JobRecord]:
    """The jobs carrying the same dpo-ray mark (output directory) as this job; none when this job has no mark.

    On a shared cluster other users' jobs, and dpo-ray runs in other directories, are not ours to tidy; and
    not every live group of a finished job is a leak: one a detached actor made (Ray Serve's, say) lives
    as long as that actor, by design.
    """
    this = next((j for j in jobs if j.job_id == this_job_id), None)
    mark = this.metadata.get(RUN_METADATA_KEY) if this is not None else None
    if not mark:
        return []
    return [j for j in jobs if j.metadata.get(RUN_METADATA_KEY) == mark]


def release_leaked_placement_groups() -> int:
    """Remove the placement groups that earlier jobs of this run left behind (see :func:`find_leaked_placement_groups`).

    Called before a run or sweep asks for workers, so CPUs a stopped run leaked do not keep the run that
    resumes it waiting forever (a resumed sweep once waited 8 minutes for the CPU of such a group). Only
    groups of finished jobs with this job's mark (``init_ray(run_dir=...)``: the same output directory)
    are touched; without a mark, nothing is. Needs the State API (``ray[default]``); without it this logs
    a warning and does nothing.
    """
    ctx = ray.get_runtime_context()
    try:
        ours = select_jobs_of_run(list_job_records(), ctx.get_job_id())
        if not any(j.status in FINISHED_JOB_STATES for j in ours):
            return 0  # only a finished job's groups can leak: none on a fresh local instance (maybe dashboard-less)
        groups = list_placement_groups(address=ctx.gcs_address, detail=True, limit=10_000,
                                       raise_on_missing_output=False)
        leaked = find_leaked_placement_groups(groups, ours)
    except Exception as exc:  # no dashboard / State API
        logger.warning("cannot check for placement groups left by earlier jobs of this run: %s", exc)
        return 0
    for group in leaked:
        remove_placement_group_by_id(group)
        logger.warning("released placement group %s: an earlier job of this run had finished but it still held "
                       "resources", group)
    return len(leaked)


# ------------------------------------------------------------------------------------ groups of stopped trials


def is_owner_death(actor) -> bool:
    """True when an actor died because its owner died (its Train controller was killed), not by a clean shutdown."""
    cause = actor.death_cause or {}
    context = cause.get("actor_died_error_context") or {}
    return context.get("reason") == "OWNER_DIED"


def find_train_placement_groups() -> tuple[list[str], list[str]]:
    """This job's live placement groups that hold Ray Train workers: (orphaned ids, ids still in use).

    A group is orphaned when every Train worker that ran in it is dead because its owner (the Train
    controller) died: the controller was killed before it could remove the group.
    """
    ctx = ray.get_runtime_context()
    groups = list_placement_groups(address=ctx.gcs_address, filters=[("state", "=", "CREATED")], limit=10_000,
                                   raise_on_missing_output=False)
    groups = [g.placement_group_id for g in groups if g.creator_job_id == ctx.get_job_id()]
    if not groups:
        return [], []
    workers = list_actors(address=ctx.gcs_address, filters=[("class_name", "=", TRAIN_WORKER_CLASS)], detail=True,
                          limit=10_000, raise_on_missing_output=False)
    members: dict[str, list] = {}
    for w in workers:
        if w.placement_group_id:
            members.setdefault(w.placement_group_id, []).append(w)
    orphaned, in_use = [], []
    for group in groups:
        if group not in members:
            continue  # not a Train worker group, or its workers are still starting
        if all(w.state == "DEAD" and is_owner_death(w) for w in members[group]):
            orphaned.append(group)
        else:
            in_use.append(group)
    return orphaned, in_use


def release_orphaned_train_placement_groups() -> int:
    """Remove this job's Train worker placement groups whose controller was killed; returns how many.

    When ASHA stops a trial, Tune ends the trial's actor and its Train controller dies with it, before
    removing its workers' placement group. Ray Train's detached PlacementGroupCleaner normally frees
    it, but its State API lookup has no address and fails when more than one Ray instance runs on the
    machine ("Found multiple active Ray instances"); the next trial then waits for CPUs forever. This
    driver-side check passes this cluster's address explicitly.
    """
    orphaned, _ = find_train_placement_groups()
    for group in orphaned:
        remove_placement_group_by_id(group)
        logger.info("released placement group %s left by a stopped trial", group)
    return len(orphaned)


def release_placement_groups_after_sweep(timeout_s: float = 30.0) -> int:
    """Once the sweep is over, wait (briefly) for stopped trials' workers to die and free their groups.

    Without this, the last trial ASHA stopped would hold its CPUs until the driver exits.
    """
    deadline = time.monotonic() + timeout_s
    released = 0
    try:
        while True:
            released += release_orphaned_train_placement_groups()
            _, in_use = find_train_placement_groups()
            if not in_use or time.monotonic() > deadline:
                return released
            time.sleep(1.0)
    except Exception as exc:  # no dashboard / State API: Ray Train's own cleaner is all there is
        logger.warning("cannot check for placement groups left by stopped trials: %s", exc)
        return released


class PlacementGroupReleaser(tune.Callback):
    """Tune callback: for a while after each trial ends, frees the Train placement groups it left behind."""

    interval_s = 3.0  # the controller and its workers take a moment to be reported dead
    window_s = 90.0  # stop looking this long after the last trial ended

    def __init__(self):
        self._until = 0.0
        self._next = 0.0
        self._broken = False

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._until = time.monotonic() + self.window_s

    def on_trial_error(self, iteration, trials, trial, **info):
        self._until = time.monotonic() + self.window_s

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if self._broken or now > self._until or now < self._next:
            return
        self._next = now + self.interval_s
        try:
            release_orphaned_train_placement_groups()
        except Exception as exc:  # no dashboard / State API: Ray Train's own cleaner is all there is
            logger.warning("cannot check for placement groups left by stopped trials: %s", exc)
            self._broken = True


# ------------------------------------------------------------------------------------ signals


@contextlib.contextmanager
def forward_sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM stops the sweep the way Ctrl-C does.

    While Tune runs, its SIGINT handler saves the experiment state and stops the trials; before that,
    SIGINT raises KeyboardInterrupt. Either way the driver ends cleanly and can say how to resume.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
