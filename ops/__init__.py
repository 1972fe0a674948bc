"""Hospital operations: preflight checks, site kits, audit log summaries, reports and prediction."""
