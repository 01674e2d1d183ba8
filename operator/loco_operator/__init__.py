"""The Loco operator: TrainingJob (``loco.dev/v1alpha1``) reconciler built on Kopf. Never imports torch.

Modules, from pure to I/O:

* :mod:`.spec` — the API models (single source of truth); :mod:`.rules` — cross-field rules (CEL + Python);
* :mod:`.crd` — the generated CRD (``loco crds``); :mod:`.apidoc` — docs/api.md from the same schema;
* :mod:`.validation` — every problem of a TrainingJob as ``FieldError(path, value, message)``;
* :mod:`.render` — the Service, ConfigMap and worker pod manifests (the pod contract);
* :mod:`.planner` — the pure reconcile function ``plan(job, observed, now) -> Plan``;
* :mod:`.handlers` — thin Kopf handlers: observe, plan, apply, patch status; :mod:`.metrics` — operator metrics;
* :mod:`.cli` — ``loco operator run`` and ``loco crds``.
"""
