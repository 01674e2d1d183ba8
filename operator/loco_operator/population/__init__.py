"""Population-based training across TrainingJobs (issue 26): the ``Population`` API and its pure planning.

``spec`` holds the models (``loco.dev/v1alpha1`` ``Population``), ``plan`` the decisions: the first
hyper-parameters, each round's ranking, exploit (a bottom member starts its next generation from a top member's
checkpoint through ``checkpoint.initFrom``) and explore (its hyper-parameters perturbed), and the member
TrainingJobs those decisions become. The controller that applies them comes next (docs/population.md).
"""
