"""What both fleetd programs, the daemon and the holder, are built on: serving a unix socket
(server, dispatch, bounds), private directories (dirs), process identity, pidfiles and
cgroups, deadlines (timers), starting up (startup), and logging. Nothing here imports the
daemon's modules or fleetd.holder."""
