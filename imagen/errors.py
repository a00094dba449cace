"""Exceptions raised by imagen.

ImagenError
 +-- SettingsError          a setting is missing or invalid
 +-- DatabaseError          the database is unreachable or rejected a statement
 |    +-- MigrationError    a migration failed or the applied set is inconsistent
 +-- JobError               a job cannot complete (carries `transient`)
      +-- InvalidJobError   the job's own input can never work
      +-- BackendError      the model backend failed
      |    +-- BackendTimeoutError
      |    +-- BackendUnavailableError
      +-- InvalidImageError the model produced something that is not an image
      +-- StorageError      the image could not be stored
      +-- JobCancelledError the owner cancelled the job
      +-- LeaseLostError    another consumer took the job over

`JobError.transient` decides what the consumer does with a failed job: a
transient error sends it back to the queue with backoff, a permanent one fails
it at once.
"""

from __future__ import annotations


class ImagenError(Exception):
    """Root of every error imagen raises on purpose."""


class SettingsError(ImagenError):
    """A setting is missing or has an invalid value."""


class DatabaseError(ImagenError):
    """The database could not be reached or rejected a statement."""


class MigrationError(DatabaseError):
    """A migration failed or the recorded migrations do not match the files."""


class JobError(ImagenError):
    """A job could not complete; `transient` tells the consumer whether a retry may succeed.

    `retry_after_s` is the delay a remote service requested before the next
    try (an HTTP 429 `Retry-After`), or None when it sent none.
    """

    transient: bool = False
    retry_after_s: float | None = None

    def __init__(
        self, message: str, *, transient: bool | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class InvalidJobError(JobError):
    """The job's input can never be generated, so retrying is pointless."""

    transient = False


class BackendError(JobError):
    """The model backend reported a failure."""


class BackendTimeoutError(BackendError):
    """The model backend timed out."""

    transient = True


class BackendUnavailableError(BackendError):
    """The model backend could not be reached or its replica died."""

    transient = True


class InvalidImageError(JobError):
    """The model output is not a usable image (non-finite or all-black pixels)."""

    transient = False


class StorageError(JobError):
    """The image could not be written to storage."""


class JobCancelledError(JobError):
    """The job's owner cancelled it while it ran."""

    transient = False


class LeaseLostError(JobError):
    """The consumer no longer holds the job's lease, so its result is discarded."""

    transient = False
