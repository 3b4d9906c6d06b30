"""The ``aegis`` command: the program around the library (:mod:`aegis.proxy`).

Everything process-wide lives here and nowhere else: argv (:mod:`.flags`), logging set-up
(:mod:`.logformat`), the listening sockets (:mod:`.listeners`, :mod:`.accept`), the bounds on
each client connection (:mod:`.bounds`), signals and the graceful stop (:mod:`.serve`), and the
process's own metrics and limits (:mod:`.process`); :mod:`.main` ties them together.
``aegis check`` (:mod:`.check`, :mod:`.exposition`) looks at every target once and reports.
"""

from .main import main

__all__ = ["main"]
