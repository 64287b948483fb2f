"""A federation on one machine: `fededge simulate` in one process, and fleets of separate
processes for fault-injection tests and the chaos benchmark."""
