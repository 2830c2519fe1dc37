"""Run the API: `python -m api` (port from PORT, default 4000)."""

import os

import uvicorn

from settings import get_settings
from storage.migrate import require_migrated


def main() -> None:
    settings = get_settings()
    require_migrated(settings.DATABASE_URL, "api")
    uvicorn.run("api.app:create_app", factory=True, host=settings.HOST, port=settings.PORT,
                log_level=os.environ.get("LOG_LEVEL", "info").lower(), access_log=False)


if __name__ == "__main__":
    main()
