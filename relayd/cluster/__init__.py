"""Running relayd as several replicas over one PostgreSQL store (issue 11).

`ring` places drives over the live replicas (pure); `coordinator` keeps this replica's heartbeat
row and its lease rows (epochs: the fencing tokens the store checks on every watcher write);
`placement` decides, from the ring and the leases, which drives to start and stop (pure). The
supervisor runs the loop that ties them to the watchers. docs/cluster.md is the user's view.
"""
