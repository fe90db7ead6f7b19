"""``python -m cggr``: the ``cggr`` command (``cggr info``, ``cggr bench``, ``cggr race``, ``cggr --version``)."""

import sys

from cggr.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
