"""The audit service: a tamper-evident record of every event, and the cost ledger."""
