"""Reliability: chaos on real sockets, interruptions, hostile input, fork and threads,
TLS, state machines and the soak."""
