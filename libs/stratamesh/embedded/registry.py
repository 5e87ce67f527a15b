"""Service discovery: every ``stratamesh.services.<name>.app`` module that defines ``service``."""

from __future__ import annotations

import importlib
import pkgutil

from stratamesh.bus.service import Service
from stratamesh.errors import ConfigError

__all__ = ["discover_services", "load_service"]


def discover_services() -> list[str]:
    """Names of the installed services, sorted."""
    pkg = importlib.import_module("stratamesh.services")  # mapped from services/ at install
    return sorted(
        m.name for m in pkgutil.iter_modules(pkg.__path__) if m.ispkg and not m.name.startswith("_")
    )


def load_service(name: str) -> Service:
    known = discover_services()
    if name not in known:
        raise ConfigError(f"unknown service {name!r}; installed: {', '.join(known) or 'none'}")
    module = importlib.import_module(f"stratamesh.services.{name}.app")
    service = getattr(module, "service", None)
    if not isinstance(service, Service):
        raise ConfigError(f"stratamesh.services.{name}.app defines no `service: Service`")
    return service
