"""Helpers the tests share, and the scripts they run in fresh processes (simulated devices, several hosts)."""
