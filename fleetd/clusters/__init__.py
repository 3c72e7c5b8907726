"""The daemon's side of detached clusters: holders fleetd starts for `fleetctl up`, which
outlive fleetd (as containerd's shims outlive containerd) and are adopted by the next fleetd.

    registry     the façade the dispatcher calls: the cluster control ops
    index        which clusters and members exist; status answered from memory
    launch       starting a holder behind its gate, waiting until it serves
    follow       a live holder's watch connection and exit, and what it leaves when gone
    adoption     the plan (pure) for the holders found when fleetd starts, and its execution
    journaling   the clusters' records in the store, and the claims journal's view of them
    records      those records and the writes built from them (pure)
    rundirs      a holder's runtime directory, read and cleared without following links
    links        every call into fleetctl.members_client, the member sockets' client half
    warm         the holder template fleetd forks holders from, followed and restarted
"""
