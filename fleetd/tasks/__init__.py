"""Task runs in fleetd: the dispatcher and what it stands on."""
