"""Dependencies' chatter stays out of the user's terminal: transformers' and diffusers' notices and progress bars
(a torchvision notice, "Loading pipeline components", dtype advice meant for their own users) and insightface's
deprecation warnings of its own internals. ``rp-anonymize run --verbose`` (or ``RP_VERBOSE=1`` in the
environment, which Ray workers started by the job inherit) shows them. Our own warnings and errors are untouched.
"""

from __future__ import annotations

import os
import sys
import warnings

VERBOSE_ENV = "RP_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_dependencies() -> None:
    """Before transformers or diffusers is imported (their import-time notices read the environment), and again
    after (their loggers). Idempotent; a variable the user set is kept."""
    if verbose():
        return
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"insightface(\.|$)")
    for name in ("transformers", "diffusers"):
        if name in sys.modules:
            logging = sys.modules[name].utils.logging
            logging.set_verbosity_error()
            logging.disable_progress_bar()
