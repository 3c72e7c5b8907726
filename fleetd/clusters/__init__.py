"""The daemon's side of detached clusters: the holders fleetd launches, follows and adopts."""
