"""Aegis: the Prometheus metrics of Unix-socket services, on one TCP port.

The library is :mod:`aegis.proxy` (``Config`` and ``make_app``); the ``aegis`` command is
:mod:`aegis.cli`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
