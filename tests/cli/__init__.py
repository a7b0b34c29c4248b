"""The command line (check, probe, demo, bench) and the examples."""
