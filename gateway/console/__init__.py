"""The web console: server-rendered pages at ``/console`` where engineers see each task's stage,
evidence and answers, and act on them, behind the admin credential (``gateway.console.routes``)."""

from gateway.console.routes import console_router

__all__ = ["console_router"]
