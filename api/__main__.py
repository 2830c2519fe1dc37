"""Run the API: `python -m api` (port from PORT, default 4000; API_PROCESSES processes, default one per
core). The process model is in api/server.py."""

from api.server import run_api

if __name__ == "__main__":
    run_api()
