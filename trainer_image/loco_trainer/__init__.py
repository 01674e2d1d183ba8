"""Loco's trainer: the code that runs in every worker pod (and locally with ``--nproc``).

What it shares with the operator (its config, the progress protocol, the probe settings) lives in
``loco_contract``; this package may import that, never the operator. Import the torch-side modules
(``train``, ``model``, ``data``, ``launcher``, ...) explicitly.
"""
