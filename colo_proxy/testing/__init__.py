"""Test support shipped with the package: synthetic frames and streams (synth)."""
