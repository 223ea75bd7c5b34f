"""``kernelport bench``: how fast a model serves, and what the server costs over its runtime.

The model runs bare on its runtime (``bare``), then through a ``kernelport serve`` subprocess
(``server``) under a closed-loop load (``load``) at a sweep of concurrencies; ``report``
turns the points into a table, a PNG and a self-contained HTML page. Nothing here is
imported by the server itself.
"""
