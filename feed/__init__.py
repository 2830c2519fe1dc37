"""The event feed outside storage: the Redis relay (the coordinator's event rows,
storage/event_feed.py → Redis Streams; run alone: `python -m feed.relay`; `worker.py` runs it
beside the worker when REDIS_URL is set), and the API's wake-ups of its waiting feed readers
(feed/wakeups.py)."""
