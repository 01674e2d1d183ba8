"""Loco's trainer: the code that runs in every worker pod (and locally with ``--nproc``).

Kept import-light on purpose: the operator imports ``loco_trainer.config`` and
``loco_trainer.protocol``, which must never pull in torch. Import the torch-side modules
(``train``, ``model``, ``data``, ``launcher``, ...) explicitly.
"""
