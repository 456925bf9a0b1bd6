"""The errors a call can end with, whatever transport carried it.

The core, the batcher and the pool raise these; each transport maps them to
its own statuses in one place (service.interceptors for gRPC). Messages go to
clients, so they say what was wrong and which limit applies, and never echo
request text.
"""

from __future__ import annotations


class ServiceError(Exception):
    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(ServiceError):
    """The request is malformed or breaks a limit; retrying it will not help."""


class NotFound(ServiceError):
    """The request names something this server does not serve (a model)."""


class ResourceExhausted(ServiceError):
    """Overloaded (queue or concurrent calls full): worth retrying later."""


class TooLarge(ResourceExhausted):
    """A part of the request cannot fit in a worker's memory: retrying will not help
    (gRPC: RESOURCE_EXHAUSTED; HTTP: 413, without Retry-After)."""


class Unavailable(ServiceError):
    """Retryable elsewhere or later: draining, loading, or no healthy worker."""


class DeadlineExceeded(ServiceError):
    pass


class Internal(ServiceError):
    pass
