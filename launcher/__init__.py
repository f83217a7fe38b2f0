"""`velesio up`: the launcher and supervisor that run the whole stack as one process tree on one machine
(settings, the plan of children, the supervisor, the embedded Redis). Nothing in `mesh/` imports it."""
