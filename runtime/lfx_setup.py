"""Prepare lfx's process-wide services for a headless runtime (no database, no UI).

lfx resolves optional services (tracing, chat cache, database, ...) on every run and logs a
full traceback each time one is missing, which is both noise and measurable CPU per turn.
Services lfx has no implementation for are recorded as absent, which is what lfx falls back
to anyway; the variable service is lfx's in-memory one, as `lfx serve` registers it.

lfx also tries `from langflow... import ...` around every vertex build (webhook events of the
full Langflow server). Without Langflow installed each attempt searches the whole import
path; recording the package as absent in `sys.modules` makes the attempt fail at once.
"""

from __future__ import annotations

import importlib.util
import sys

_ABSENT_WHEN_UNREGISTERED = (
    "TRACING_SERVICE",
    "CHAT_SERVICE",
    "DATABASE_SERVICE",
    "TRANSACTION_SERVICE",
    "STORAGE_SERVICE",
    "CHECKPOINT_SERVICE",
    "TELEMETRY_SERVICE",
)


def prepare_lfx(log_level: str) -> None:
    from lfx.log.logger import configure
    from lfx.services.manager import get_service_manager
    from lfx.services.schema import ServiceType
    from lfx.services.variable.service import VariableService

    configure(log_level=log_level.upper())
    if "langflow" not in sys.modules and importlib.util.find_spec("langflow") is None:
        sys.modules["langflow"] = None  # type: ignore[assignment]
    manager = get_service_manager()
    if ServiceType.VARIABLE_SERVICE not in manager.service_classes:
        manager.register_service_class(ServiceType.VARIABLE_SERVICE, VariableService)
    manager.get(ServiceType.VARIABLE_SERVICE)  # also runs lfx's plugin discovery once
    for name in _ABSENT_WHEN_UNREGISTERED:
        service_type = ServiceType[name]
        registered = (
            service_type in manager.service_classes
            or service_type in manager.factories
            or service_type in manager.services
        )
        if not registered:
            # What lfx's own lookups return for a service nobody provides.
            manager.services[service_type] = None  # type: ignore[assignment]
