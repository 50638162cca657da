"""The conventional CYPHONIC node (the paper's CMN): the engine that joins signaling,
tunnels and relay paths (``engine``), and the daemon around it."""
