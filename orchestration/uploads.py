"""UploadTask: validate, store the zip, escrow the price, insert the task; then matching is enqueued."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy.orm import Session

from models import accounts, ledger, new_tasks, tasks
from models.db import Database
from models.errors import InvalidArgument, NotFound, PermissionDenied, Refused, TooLarge
from orchestration import economy
from orchestration.digests import matches, zip_digest
from orchestration.policies.pricing import PriceList, price_per_minute
from orchestration.policies.zips import UnsafeZip, ZipLimits, inspect_zip
from orchestration.policies.zipstream import ReadMember, ZipStream
from orchestration.storage import BACKGROUND_HASH_BYTES, background, validate_task_id
from pool.settings import Settings

log = logging.getLogger("orchestration.uploads")

NEED_BOUNDS = {"cpu_score": 10_000_000, "memory_gb": 65536, "gpu_score": 10_000_000, "gpu_memory_gb": 16384}


class ZipDigest:
    """The digest of a task zip (:func:`~orchestration.digests.zip_digest`), computed on a
    background thread when the zip is large.

    The hash releases the GIL while it runs, so a large zip is hashed on another core while it
    is written to storage, instead of in a pass of its own afterwards. ``value`` waits for it.
    """

    def __init__(self, digest: Future[str] | str) -> None:
        self._digest = digest  # "<algorithm>:<hex>", or the hashing under way

    @classmethod
    def of(cls, data: bytes | memoryview) -> ZipDigest:
        return cls(background().submit(zip_digest, data) if len(data) >= BACKGROUND_HASH_BYTES else zip_digest(data))

    def value(self) -> str:
        return self._digest if isinstance(self._digest, str) else self._digest.result()


@dataclass(frozen=True)
class UploadRequest:
    task_id: str
    task_zip: bytes | memoryview  # a view of the received request, not a copy; empty when staged already
    needs: dict[str, int]
    gpu_name: str
    location: str
    user_id: str
    max_minutes: int = 0
    zip_digest: ZipDigest | None = None  # set by validate, or as a streamed zip is staged
    zip_size: int = 0  # likewise
    zip_check: Future[None] | None = None  # a large zip's check, under way (see validate)
    kept_inline: bool = False  # the zip is kept in the database with the task (INLINE_ZIP_BYTES)

    @property
    def size(self) -> int:
        return self.zip_size or len(self.task_zip)

    def digest(self) -> str:
        """The zip's digest as the task's row keeps it (digests.zip_digest)."""
        return self.zip_digest.value() if self.zip_digest else zip_digest(self.task_zip)

    def checked(self) -> None:
        """Wait for the zip's check, if it is still under way; raises what it found."""
        if self.zip_check is not None:
            self.zip_check.result()


def prices(settings: Settings) -> PriceList:
    return PriceList(
        settings.PRICE_BASE,
        settings.PRICE_PER_CPU_SCORE,
        settings.PRICE_PER_MEMORY_GB,
        settings.PRICE_PER_GPU_SCORE,
        settings.PRICE_PER_GPU_MEMORY_GB,
    )


def zip_limits(settings: Settings) -> ZipLimits:
    return ZipLimits(settings.MAX_ZIP_ENTRIES, settings.MAX_UNZIPPED_BYTES, settings.MAX_ZIP_RATIO)


def zip_stream(settings: Settings) -> ZipStream:
    limits = zip_limits(settings)
    return ZipStream(max_total_bytes=limits.max_total_bytes, max_ratio=limits.max_ratio)


def check_zip(
    data: bytes | memoryview | Path,
    *,
    limit: int,
    settings: Settings,
    what: str,
    read: Mapping[int, ReadMember] | None = None,
) -> None:
    """TooLarge past ``limit`` bytes; InvalidArgument for anything the zip checks refuse.

    ``data``: the zip, or the file it was written to; ``read``: the members a :func:`zip_stream`
    read as it arrived (see inspect_zip).
    """
    size = data.stat().st_size if isinstance(data, Path) else len(data)
    if not size:
        raise InvalidArgument(f"{what} is empty")
    if size > limit:
        raise TooLarge(f"{what} is {size} bytes; the limit is {limit}")
    try:
        if isinstance(data, Path):
            with data.open("rb") as handle:
                inspect_zip(handle, zip_limits(settings), read)
        else:
            inspect_zip(data, zip_limits(settings), read)
    except UnsafeZip as error:
        raise InvalidArgument(f"{what} refused: {error}") from error


def _clean(value: str, field: str) -> str:
    value = value.strip()
    if len(value) > 64 or not value.isprintable():
        raise InvalidArgument(f"{field} must be at most 64 printable characters")
    return "" if value.lower() == "any" else value


def validate(request: UploadRequest, caller: str, settings: Settings) -> UploadRequest:
    """The request with a task id and defaults filled in, its zip being checked and hashed; the
    errors of SPEC §2 otherwise.

    A large zip (within the size limit) is checked on a background thread, while it is written
    to storage (the check reads every member, which is mostly CRC work that releases the GIL):
    ``request.checked()`` waits for it and raises what it found. A small one is checked here.
    """
    return with_zip(validate_fields(request, caller, settings), settings)


def with_zip(request: UploadRequest, settings: Settings) -> UploadRequest:
    """:func:`validate`'s part for the zip, of a request whose fields are valid already."""
    data, limit = request.task_zip, settings.MAX_FILE_SIZE
    if len(data) < BACKGROUND_HASH_BYTES or len(data) > limit:
        check_zip(data, limit=limit, settings=settings, what="task_zip")
        check = None
    else:
        check = background().submit(_check_walked, data, limit=limit, settings=settings)
    return replace(request, zip_size=len(data), zip_digest=ZipDigest.of(data), zip_check=check)


def _check_walked(data: bytes | memoryview, *, limit: int, settings: Settings) -> None:
    """:func:`check_zip` of a large zip in memory, its members read first by a :class:`ZipStream`
    (whose CRC-32 is vectorised), as a streamed upload's are: 100 MiB stored took 7 ms of CPU
    this way, 30 ms through ``ZipFile.open``. The verdict is the same (see inspect_zip)."""
    walk = zip_stream(settings)
    walk.feed(data)
    check_zip(data, limit=limit, settings=settings, what="task_zip", read=walk.members)


def validate_fields(request: UploadRequest, caller: str, settings: Settings) -> UploadRequest:
    """:func:`validate` without the zip (a streamed zip is checked once it has been staged)."""
    if request.user_id and request.user_id.lower() != caller.lower():
        raise PermissionDenied("user_id names another user; tasks are always billed to the caller")
    task_id = validate_task_id(request.task_id) if request.task_id else uuid.uuid4().hex
    for field, high in NEED_BOUNDS.items():
        value = request.needs.get(field, 0)
        if not 0 <= value <= high:
            raise InvalidArgument(f"{field} must be between 0 and {high} (got {value})")
    minutes = request.max_minutes or settings.MAX_TASK_MINUTES
    if not 1 <= minutes <= settings.MAX_TASK_MINUTES:
        raise InvalidArgument(f"max_minutes must be between 1 and {settings.MAX_TASK_MINUTES}")
    return UploadRequest(
        task_id=task_id,
        task_zip=request.task_zip,
        needs=dict(request.needs),
        gpu_name=_clean(request.gpu_name, "gpu_name"),
        location=_clean(request.location, "location"),
        user_id=caller,
        max_minutes=minutes,
    )


def check_repeat(existing: tasks.TaskView, request: UploadRequest, owner_id: int, staged: Path | None) -> None:
    """An upload under a task id that exists already is accepted (and changes nothing) only when
    it is the same upload by the same user: PermissionDenied or Refused otherwise. ``staged``: the
    file this upload's zip was written to (still there), or None when it is in ``request``."""
    if existing.owner_id != owner_id:
        raise PermissionDenied(f"task id {request.task_id!r} is taken by another user")
    same = (
        matches(existing.zip_digest, request.digest(), data=request.task_zip, staged=staged)
        and existing.needs == request.needs
        and existing.gpu_name == request.gpu_name
        and existing.location == request.location
    )
    if not same:
        raise Refused(f"you already uploaded a different task as {request.task_id!r}; choose another task_id")


def insert(
    session: Session, request: UploadRequest, caller: str, settings: Settings, *, owner_id: int | None = None
) -> int:
    """Insert the task and escrow its maximum price; the owner's user id.

    ``owner_id``: the caller's id when already confirmed to exist, else it is looked up (NotFound
    when the account is gone). The task id is not looked up first: when it exists (a repeat of
    this upload, another one under the same id, or one that committed meanwhile) the insert
    raises IntegrityError, and the caller reads the existing task (:func:`check_repeat`).
    InsufficientBalance when the balance does not cover the escrow.
    """
    owner_id = owner_id if owner_id is not None else _owner(session, caller)
    per_minute, amount = _priced(request, settings)
    pk = new_tasks.create(session, new_task(request, owner_id, per_minute), task_zip=_kept(request))
    economy.escrow(session, task_pk=pk, task_id=request.task_id, owner_id=owner_id, amount=amount)
    return owner_id


def _owner(session: Session, caller: str) -> int:
    owner_id = accounts.user_id(session, caller)
    if owner_id is None:
        raise NotFound("your account no longer exists")
    return owner_id


def _priced(request: UploadRequest, settings: Settings) -> tuple[int, int]:
    """(the task's price per minute, what its upload escrows: that for its maximum minutes)."""
    per_minute = price_per_minute(request.needs, prices(settings))
    return per_minute, per_minute * request.max_minutes


def insert_alone(db: Database, request: UploadRequest, caller: str, settings: Settings, *, owner_id: int | None) -> int:
    """:func:`insert` on PostgreSQL in one statement committed as it ends (Database.alone), for a
    task with a price: the uploader's balance row is then locked only while the server runs it,
    where a transaction kept it locked across the answer's way back to this process and its
    COMMIT, and a user's concurrent uploads queued on it. The owner's user id.

    The caller moves the zip into place afterwards; a matching job may place the task in between,
    and dispatch waits for its zip (dispatcher.ZIP_WAIT_SECONDS). Should the process stop in
    between, the task has no zip until the upload is repeated (a client that got no answer
    repeats it, and the repeat puts the zip in place: Intake._record); a task
    dispatched without its zip goes to its next attempt, at no cost to the node."""
    if owner_id is None:
        with db.reading() as session:
            owner_id = _owner(session, caller)
    per_minute, amount = _priced(request, settings)
    task = new_task(request, owner_id, per_minute)
    pk = db.alone(
        lambda conn: new_tasks.create_escrowed_pg(
            conn,
            task,
            payer_key=ledger.balance_key(owner_id),
            escrow_prefix=economy.ESCROW_PREFIX,
            amount=amount,
            memo=economy.escrow_memo(request.task_id),
            task_zip=_kept(request),
        )
    )
    if pk is None:
        with db.reading() as session:
            raise economy.short_of(session, owner_id, amount)
    return owner_id


def _kept(request: UploadRequest) -> bytes | memoryview | None:
    """The zip to keep in the database with the task, if it is kept there."""
    return request.task_zip if request.kept_inline else None


def escrow_amount(request: UploadRequest, settings: Settings) -> int:
    """What the upload escrows: the task's price per minute for its maximum minutes."""
    return _priced(request, settings)[1]


def new_task(request: UploadRequest, owner_id: int, per_minute: int) -> new_tasks.NewTask:
    return new_tasks.NewTask(
        task_id=request.task_id,
        owner_id=owner_id,
        needs=request.needs,
        gpu_name=request.gpu_name,
        location=request.location,
        max_minutes=request.max_minutes,
        zip_digest=request.digest(),
        zip_size=request.size,
        price_per_minute=per_minute,
    )


def log_uploaded(request: UploadRequest, caller: str, settings: Settings) -> None:
    """The upload's log line, once its transaction has committed (a transaction that is run
    again, or that fails, logs nothing twice or wrongly)."""
    log.info(
        "task %s uploaded by %s (%d CPT/min, %d bytes)",
        request.task_id,
        caller,
        price_per_minute(request.needs, prices(settings)),
        request.size,
        extra={"event": "task_uploaded", "task_id": request.task_id},
    )
