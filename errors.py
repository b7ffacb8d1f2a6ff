"""
errors.py: how the project stops on bad input: one line naming the flag, file or line and the way
out, never a traceback (fail); an optional package asked for by the flag that needs it (require).
Every room imports these two from here.
"""

import importlib
import os
import sys


def fail(message):
    """A clear error instead of a traceback: exit status 1, the message on stderr prefixed by the
    program's name (edge_grpo.py, analysis.py) as argparse prefixes its own errors."""
    raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'edge_grpo.py'}: error: {message}")


def require(module, flag):
    """Imports an optional library, or exits naming the flag that needs it and the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        fail(f"{flag} needs {package}: pip install {package}")
