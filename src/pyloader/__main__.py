"""``python -m pyloader``: the command line (``bench``, ``profile``); see :mod:`pyloader._cli`."""

from pyloader._cli import main

raise SystemExit(main())
