"""The event feed's Redis relay: the coordinator's event rows (storage/event_feed.py) → Redis
Streams. Run alone: `python -m feed.relay`; `worker.py` runs it beside the worker when REDIS_URL
is set."""
