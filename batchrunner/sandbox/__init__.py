"""The embedded simulator of the Cliprise Business API: see :mod:`batchrunner.sandbox.server`."""

from .server import Sandbox, SandboxConfig, Stats, body_key, serve

__all__ = ["Sandbox", "SandboxConfig", "Stats", "body_key", "serve"]
