"""OsiriX-compatible XML-RPC: the listener (``server``), the methods, and OsiriX's vocabulary."""

from .server import XmlRpcServer

__all__ = ["XmlRpcServer"]
