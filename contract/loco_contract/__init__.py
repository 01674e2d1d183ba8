"""The contract between Loco's operator and its trainer: what one side writes and the other reads.

Both sides import this package; it imports neither (nor torch, kopf or kubernetes: a test enforces it).

* :mod:`.config`: the trainer config (the CRD's training sections are these models), the per-pod
  environment, the ports and paths, the algorithm list;
* :mod:`.protocol`: the progress report (worker -> operator) and the membership update (operator -> worker);
* :mod:`.detection`: the fault detector's settings, and the part of them the trainer's probes use;
* :mod:`.exits`: the trainer's exit codes, which the operator's failure policy matches on.
"""
