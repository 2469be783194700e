"""The web dashboard (``stepline ui``): overview, instances, one instance, dead letters, schedules.

Server-rendered pages (Starlette and Jinja2, every asset in this package) over
the same ``Client`` the CLI uses, and the read queries of
``stepline.shared.db.overview``.
"""

from stepline.producer.dashboard.app import create_app

__all__ = ["create_app"]
