"""The benchmark harness behind ``python -m pyloader bench``.

It lives inside the package so that it runs after ``pip install``. Modules, each one idea:

- :mod:`~pyloader._bench.workloads`: the built-in workloads (Sequences, nothing downloaded);
- :mod:`~pyloader._bench.loaders`: the registry of loaders compared (pyloader and its peers);
- :mod:`~pyloader._bench.harness`: runs each loader x workload in a fresh subprocess
  (:mod:`~pyloader._bench._measure`) while sampling the memory of its process tree;
- :mod:`~pyloader._bench.report`: the JSON schema, the terminal and Markdown tables, the plot;
- :mod:`~pyloader._bench.machine`: the description of the machine and library versions;
- :mod:`~pyloader._bench.keras_fit`: ``model.fit`` epochs fed by Keras's workers or by pyloader
  (the ``fit-*`` loaders and ``bench/keras_fit.py``).

Its dependencies (tqdm, psutil, matplotlib, pillow: the ``[bench]`` extra) are imported lazily,
inside the functions that need them, so ``import pyloader`` never needs them.
"""

from __future__ import annotations
