"""The workflow-outbox dispatcher: delivers the notices the command transactions wrote
(storage/workflow_outbox.py) to the workflows with signal-with-start. Run: `python -m dispatcher`."""

from dispatcher.outbox import Dispatcher

__all__ = ["Dispatcher"]
