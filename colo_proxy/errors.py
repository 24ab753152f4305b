"""One root for every error colo-proxy raises on misuse or broken transports.

Whatever a guest or a peer sends becomes an event or a counter, never one of
these: exceptions are for the operator's mistakes and for broken plumbing.
"""


class ColoProxyError(Exception):
    """Root of colo-proxy's own exceptions."""


class ConfigError(ColoProxyError):
    """A configuration value is missing, of the wrong type or out of range."""


class InputError(ColoProxyError):
    """An input file (pcap, config) cannot be read or is not what it claims."""


class TransportError(ColoProxyError):
    """A socket, chardev or QMP connection failed in a way the caller must see."""
