"""colo-proxy: a COLO-style packet comparison proxy for VM fault tolerance."""

__version__ = "0.1.0"
