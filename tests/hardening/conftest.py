"""The driver tests' fixtures (a short socket directory, both event loops)."""

from tests.drivers.conftest import run_loop, sockdir

__all__ = ["run_loop", "sockdir"]
