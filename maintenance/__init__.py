"""Maintenance: edge expiry and retention (reference §9) and the workflow reconciler, run by the
maintenance workflow's activity on a Temporal schedule (worker.py). Their SQL: storage/maintenance.py."""
