"""Task use cases for the API and the jobs: what users and nodes ask, and what the jobs carry out.

Work that must survive a crash is written to the database first; jobs are enqueued only after
the commit and carry ids, never payloads.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable

import redis
from sqlalchemy.orm import Session

from models import task_files, task_output, tasks
from models.db import Database
from models.errors import NotFound, PermissionDenied, Refused
from orchestration import outcomes, reports, uploads
from orchestration.archival_queue import ArchivalQueue
from orchestration.enqueue import Coalesced, JobQueue
from orchestration.followups import FollowupSender
from orchestration.intake import Asker, Intake
from orchestration.storage import TaskStorage, sha256, validate_task_id
from pool.settings import Settings

log = logging.getLogger("orchestration.lifecycle")

MATCH = "pool.scheduling.match"
DISPATCH = "pool.dispatch.execute"
DISPATCH_MANY = "pool.dispatch.execute_many"
STOP = "pool.dispatch.stop"


class Lifecycle:
    def __init__(
        self, db: Database, storage: TaskStorage, settings: Settings, jobs: JobQueue, client: redis.Redis
    ) -> None:
        self.db, self.storage, self.settings, self.jobs, self.redis = db, storage, settings, jobs, client
        self.matching = Coalesced(client, jobs, MATCH, f"{settings.REDIS_KEY_PREFIX}:matching")
        self.archival = ArchivalQueue(client, jobs, settings.REDIS_KEY_PREFIX)
        self.followups: FollowupSender | None = None
        self.intake = Intake(db, storage, settings, on_created=self.request_matching)

    # ------------------------------------------------------------------ enqueueing

    def send_followups_in_batches(self) -> FollowupSender:
        """From now on, matching requests and queued outcomes of concurrent callers share Redis
        round trips (the gRPC server's many handler threads); close the sender when done."""
        self.followups = FollowupSender(self.redis, on_push_failure=self.archival.by_jobs)
        return self.followups

    def request_matching(self, countdown: float | None = None) -> None:
        """Ask for a matching job (many uploads, one job); ``countdown``: a separate one, later."""
        if countdown is not None:
            self.jobs.send(MATCH, countdown=countdown)
        elif self.followups is not None:
            self.followups.request(self.matching)
        else:
            self.matching.request()

    def capacity_appeared(self, why: str) -> None:
        """A node registered or came back online: ask for matching now, so a task waiting for
        capacity need not wait for the next recovery sweep (SPEC §5). Never raises: the node's
        registration or heartbeat is done whatever Redis says, and the sweep asks again later.
        Only when some task is PENDING: a fleet registering asks for no empty matching jobs."""
        try:
            with self.db.reading() as session:
                if not tasks.any_pending(session):
                    return
            self.request_matching()
        except Exception as error:  # the database, Redis or the broker away: the sweep re-drives it
            log.warning("could not ask for matching after %s: %s", why, error)

    def nodes_came_back(self, count: int) -> None:
        """``count`` offline nodes are online again: :meth:`capacity_appeared`."""
        self.capacity_appeared(f"{count} node(s) came back online")

    def request_archival(self, task_id: str, attempt: int) -> None:
        """Queue a reported outcome for the next archival batch (one job for many completions)."""
        self.archival.push(task_id, attempt, self.followups)

    # ------------------------------------------------------------------ users

    def upload(self, caller: Asker, request: uploads.UploadRequest) -> tuple[str, bool]:
        """Store and record a task, escrow its price, then ask for matching (:class:`Intake`)."""
        return self.intake.upload(caller, request)

    def upload_pieces(
        self,
        caller: Asker,
        request: uploads.UploadRequest,
        pieces: Iterable[bytes | memoryview],
        *,
        wanted: Callable[[], bool] = lambda: True,
    ) -> tuple[str, bool]:
        """:meth:`upload` of a zip that arrives in ``pieces`` (UploadTaskStream), recorded only if
        ``wanted()`` still says so once it is whole."""
        return self.intake.upload_pieces(caller, request, pieces, wanted=wanted)

    def owned(self, session: Session, caller: Asker, task_id: str) -> tasks.TaskView:
        task = tasks.get(session, validate_task_id(task_id))
        if task is None:
            raise NotFound(f"no task {task_id!r}")
        if task.owner_id != caller.user_id and not caller.is_operator:
            raise PermissionDenied(f"task {task_id} belongs to another user")
        return task

    def poll(self, caller: Asker, task_id: str) -> tuple[tasks.TaskView, list[str]]:
        with self.db.reading() as session:
            task = self.owned(session, caller, task_id)
            return task, task_output.output(session, task.pk)

    def logs(self, caller: Asker, task_id: str) -> str:
        with self.db.reading() as session:
            task = self.owned(session, caller, task_id)
            records = [
                {"ts": r.ts, "level": r.level, "message": r.message, "attempt": r.attempt}
                for r in task_output.logs(session, task.pk)
            ]
        return json.dumps(records)

    def history(self, caller: Asker, task_id: str) -> list[tasks.Transition]:
        """The task's recorded transitions, oldest first (its owner or an operator)."""
        with self.db.reading() as session:
            return tasks.history(session, self.owned(session, caller, task_id).pk)

    def result(self, caller: Asker, task_id: str) -> bytes:
        with self.db.reading() as session:
            task = self.owned(session, caller, task_id)
            kept = task_files.get(session, task.pk, task_files.RESULT_ZIP)
        if task.status not in tasks.TERMINAL or not task.result_sha256:
            raise Refused(f"task {task_id} has no result yet (status {task.status})")
        if task.result_pruned:
            raise Refused(f"the result of task {task_id} was removed after {self.settings.RESULT_RETENTION_DAYS} days")
        data = kept if kept is not None else self.storage.archived_result(task_id).read_bytes()
        if sha256(data) != task.result_sha256:
            log.error("archived result of %s does not match its sha256", task_id)
            raise Refused("the stored result is damaged; the operator has been told")
        return data

    def list_tasks(self, caller: Asker) -> list[tasks.TaskView]:
        with self.db.reading() as session:
            return tasks.list_for(session, None if caller.is_operator else caller.user_id)

    def stop(self, caller: Asker, task_id: str) -> str:
        """Record the stop (it survives restarts); a job tells the node. What the user is told."""

        def work(session: Session) -> str:
            task = self.owned(session, caller, task_id)
            if task.owner_id != caller.user_id:  # operators may look, but only the owner stops (SPEC §6)
                raise PermissionDenied(f"only the owner of task {task_id} may stop it")
            if task.status == tasks.PENDING and outcomes.stop_in(session, task, f"stopped by {caller.username}"):
                return "stopped"
            if task.status in tasks.ACTIVE and tasks.transition(
                session, task, to=tasks.STOPPING, expected=tasks.ACTIVE, reason=f"stop requested by {caller.username}"
            ):
                return "stopping"
            if task.status == tasks.STOPPING:
                return "stopping"
            raise Refused(f"task {task_id} is already {task.status}")

        state = self.db.transaction(work)
        if state == "stopping":
            self.jobs.send(STOP, task_id)
            return f"stopping task {task_id}"
        return f"task {task_id} stopped"

    # ------------------------------------------------------------------ nodes

    def store_result(self, reporter: reports.Reporter, task_id: str, data: bytes) -> None:
        self._check_result(data)
        task = reports.authorized(self.db, reporter, task_id)
        if self._inline(data):
            keep = functools.partial(task_files.put, task_pk=task.pk, name=task_files.RESULT_ZIP, data=data)
            self.db.transaction(keep, grouped=True)
            self.storage.result_zip(task_id).unlink(missing_ok=True)  # a larger one the node stored before
        else:
            self._store_result_file(task, data)

    def _inline(self, data: bytes) -> bool:
        """Whether a zip of this size is kept in the database rather than as a file."""
        return len(data) <= self.settings.INLINE_ZIP_BYTES

    def _store_result_file(self, task: tasks.TaskView, data: bytes) -> None:
        """A result too large for the database, written as the task's file; a smaller one the
        node stored before is removed first (a task has one result, the last one stored)."""
        self.db.transaction(lambda session: task_files.drop(session, [task.pk], task_files.RESULT_ZIP), grouped=True)
        self.storage.write(self.storage.result_zip(task.task_id), data)

    def _check_result(self, data: bytes) -> None:
        uploads.check_zip(data, limit=self.settings.MAX_RESULT_SIZE, settings=self.settings, what="result_zip")

    def finish(
        self,
        reporter: reports.Reporter,
        task_id: str,
        success: bool,
        message: str,
        *,
        output: str = "",
        result: bytes = b"",
    ) -> str:
        """TaskCompleted: the node's verdict (the first one wins), then archival asked for.
        FinishTask: the same after StoreOutput (when ``output`` has lines) and :meth:`store_result`
        (when there is a ``result``), with one check of the reporter and one write to the
        database. Everything sent is checked before anything is kept."""
        lines = reports.output_lines(output)
        if result:
            self._check_result(result)
        inline = bool(result) and self._inline(result)
        kept = result if inline else None  # kept in the database with the verdict
        max_lines = self.settings.OUTPUT_MAX_LINES
        attempt = None
        if not result or inline:  # PostgreSQL: the common end in one statement, when it applies
            attempt = reports.record_end_alone(
                self.db, reporter, task_id, lines, success, message, max_lines=max_lines, result=kept
            )
        recorded = attempt is not None
        if attempt is None:
            task = reports.authorized(self.db, reporter, task_id)
            if result and not inline:
                self._store_result_file(task, result)
            attempt, recorded = reports.record_end(
                self.db, reporter, task, lines, success, message, max_lines=max_lines, result=kept
            )
        if inline:
            self.storage.result_zip(task_id).unlink(missing_ok=True)  # a larger one the node stored before
        self.request_archival(task_id, attempt)
        return "recorded" if recorded else "already recorded"

    # ------------------------------------------------------------------ jobs

    def archive(self, task_id: str, attempt: int) -> str:
        """Finish one attempt whose node reported its outcome; the task's status afterwards."""
        return self.archive_many([(task_id, attempt)]).get((task_id, attempt), "unknown")

    def archive_many(self, attempts: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """Archive the results of attempts whose node reported their outcome and settle them all
        in one transaction; each one's status afterwards."""
        with self.db.reading() as session:
            by_id = {task.task_id: task for task in tasks.get_many(session, {task_id for task_id, _ in attempts})}
            kept = task_files.get_many(session, [task.pk for task in by_id.values()], task_files.RESULT_ZIP)
        found = {key: by_id.get(key[0]) for key in attempts}
        statuses: dict[tuple[str, int], str] = {}
        archived: dict[tuple[str, int], tuple[str, int] | None] = {}
        for (task_id, attempt), task in found.items():
            if task is None or task.attempt != attempt or task.status not in tasks.ACTIVE or not task.reported_outcome:
                statuses[(task_id, attempt)] = task.status if task else "unknown"
            else:
                result = kept.get(task.pk)  # kept in the database: it stays there, as archived
                archived[(task_id, attempt)] = (
                    (sha256(result), len(result)) if result is not None else self.storage.archive_result(task_id)
                )
        finished = outcomes.finish_many(self.db, self.settings, archived) if archived else {}
        statuses.update(finished)
        ended = [task_id for (task_id, _), status in finished.items() if status in tasks.TERMINAL]
        for task_id in ended:
            self.storage.discard_task(task_id)
        if ended and self._waiting():
            self.request_matching()  # capacity came back
        return statuses

    def _waiting(self) -> bool:
        """Whether a task waits for a node. Matching is asked for when capacity comes back only
        then: a task that arrives later asks for its own (:meth:`upload`), so none is forgotten,
        and a burst's archival does not send a matching job per batch that finds nothing to do."""
        with self.db.reading() as session:
            return tasks.any_pending(session)

    def ended_early(self, released: list[tuple[str, int]], reason: str, *, node_caused: bool) -> int:
        """Attempts whose node is gone: each to its next attempt (or FAILED). How many will retry."""
        retrying = sum(
            outcomes.requeue(self.db, self.settings, task_id, attempt, reason, node_caused=node_caused)
            for task_id, attempt in released
        )
        if released:
            self.request_matching()
        return retrying
