"""Run the API: `python -m api` (port from PORT, default 4000)."""

import os

import uvicorn

from settings import get_settings
from storage.migrate import require_migrated


def main() -> None:
    settings = get_settings()
    require_migrated(settings.DATABASE_URL, "api")
    config = uvicorn.Config("api.app:create_app", factory=True, host=settings.HOST, port=settings.PORT,
                            log_level=os.environ.get("LOG_LEVEL", "info").lower(), access_log=False)
    DrainingServer(config).run()


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT `/ready` answers 503 draining while in-flight requests finish."""

    def handle_exit(self, sig, frame) -> None:
        app = getattr(self.config, "loaded_app", None)
        while app is not None and not hasattr(app, "state"):  # unwrap uvicorn's middleware
            app = getattr(app, "app", None)
        if app is not None:
            app.state.draining = True
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    main()
