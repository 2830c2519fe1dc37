"""The commands: every check and authorization decision of a change, in the reference's order, run
as one Postgres transaction (storage/ holds the SQL). The only users of rules/authz. Each command
answers one typed result; creates answer `storage.idempotency.CreateResult`."""
