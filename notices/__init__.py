"""The workflow notices' dispatcher: delivers the notices the command transactions wrote
(storage/notices.py) to the workflows with signal-with-start. Run: `python -m notices`."""

from notices.dispatcher import Dispatcher

__all__ = ["Dispatcher"]
