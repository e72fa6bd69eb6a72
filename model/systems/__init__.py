"""Lightning systems: thin training wrappers that receive already-built networks."""
