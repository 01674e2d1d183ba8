"""Population-based training: the API's checks and the pure decisions (ranking, exploit, explore, member jobs)."""

from __future__ import annotations

import pytest

from loco_operator.population.plan import (
    LABEL_GENERATION, LABEL_MEMBER, LABEL_POPULATION, draws, exploit_pairs, initial_hyperparameters, member_job,
    next_members, perturb, rank, round_end_step)
from loco_operator.population.spec import MemberStatus, PopulationSpec
from loco_operator.spec import TrainingJobSpec

TEMPLATE = {"replicas": 2, "algorithm": {"name": "diloco", "syncEvery": 10}, "training": {"steps": 250}}
SEARCH = [{"field": "training.lr", "min": 1e-4, "max": 1e-2},
          {"field": "algorithm.outerLr", "min": 0.3, "max": 1.0, "scale": "linear"},
          {"field": "algorithm.syncEvery", "min": 5, "max": 50, "scale": "linear"}]


def population(**over) -> PopulationSpec:
    return PopulationSpec.model_validate({"size": 4, "template": TEMPLATE, "search": SEARCH, "exploitEverySteps": 100,
                                          **over})


def test_bad_populations_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="min .* must be < max"):
        population(search=[{"field": "training.lr", "min": 0.1, "max": 0.01}])
    with pytest.raises(ValueError, match="log scale needs min > 0"):
        population(search=[{"field": "training.lr", "min": 0, "max": 0.01}])
    with pytest.raises(ValueError, match="each field at most once"):
        population(search=[SEARCH[0], SEARCH[0]])
    with pytest.raises(ValueError, match="need an outer-loop algorithm"):
        population(template={**TEMPLATE, "algorithm": {"name": "ddp"}})
    with pytest.raises(ValueError, match=r"exploitEverySteps \(250\) must be < template.training.steps"):
        population(exploitEverySteps=250)
    with pytest.raises(ValueError, match="perturbFactors"):
        population(perturbFactors=[0.8, -1])
    with pytest.raises(ValueError):
        population(search=[{"field": "training.batchSize", "min": 1, "max": 8}])  # not a searchable field


def test_rounds_end_at_each_interval_and_the_last_at_the_run_s_end() -> None:
    spec = population()
    assert spec.rounds() == 3
    assert [round_end_step(spec, r) for r in range(3)] == [100, 200, 250]


def test_first_values_are_in_range_whole_where_needed_and_reproducible() -> None:
    spec = population()
    first = initial_hyperparameters(spec)
    assert first == initial_hyperparameters(spec)  # the same seed: the same population after an operator restart
    assert first != initial_hyperparameters(population(seed=1))
    assert len(first) == 4 and len({m["training.lr"] for m in first}) == 4
    for m in first:
        assert 1e-4 <= m["training.lr"] <= 1e-2 and 0.3 <= m["algorithm.outerLr"] <= 1.0
        assert m["algorithm.syncEvery"] == int(m["algorithm.syncEvery"]) and 5 <= m["algorithm.syncEvery"] <= 50


def test_perturbation_multiplies_by_a_factor_and_stays_in_range() -> None:
    spec = population(perturbFactors=[0.5, 2.0])
    values = {"training.lr": 8e-3, "algorithm.outerLr": 0.7, "algorithm.syncEvery": 40.0}
    seen = set()
    for i in range(40):
        out = perturb(spec, values, draws(0, i))
        assert out["training.lr"] in (4e-3, 1e-2)  # 1.6e-2 is clipped to the max
        assert out["algorithm.outerLr"] in (0.35, 1.0)
        assert out["algorithm.syncEvery"] in (20.0, 50.0)
        seen.add(out["training.lr"])
    assert seen == {4e-3, 1e-2}


def test_ranking_and_the_bottom_share_copying_the_top_share() -> None:
    assert rank([2.0, 1.5, 3.0, 1.5]) == [1, 3, 0, 2]  # lower is better, ties by index
    spec = population(size=8, truncation=0.25)
    scores = [2.0, 1.0, 3.0, 1.1, 2.5, 2.9, 1.9, 2.2]
    pairs = exploit_pairs(spec, scores, draws(0, 0))
    assert set(pairs) == {2, 5} and set(pairs.values()) <= {1, 3}
    small = population(size=2, truncation=0.1)
    assert exploit_pairs(small, [1.0, 2.0], draws(0, 0)) == {1: 0}  # at least one member each


def test_next_round_exploits_explores_and_keeps_lineage() -> None:
    spec = population()
    members = [MemberStatus(index=i, job=f"pbt-m{i}-g0", hyperparameters=values)
               for i, values in enumerate(initial_hyperparameters(spec))]
    scores = [2.0, 1.0, 3.0, 1.5]
    nxt, events = next_members(spec, "pbt", members, scores, 0)
    assert nxt == next_members(spec, "pbt", members, scores, 0)[0]  # the same decisions when asked again
    by_index = {m.index: m for m in nxt}
    assert [m.job for m in nxt] == [f"pbt-m{i}-g1" for i in range(4)] and {m.generation for m in nxt} == {1}
    # member 2 (worst) copies member 1 (best: the top share of 4 at 0.25 is one member) with perturbed values
    assert by_index[2].parent == "pbt-m1-g0" and by_index[2].score == 3.0
    for field in ("training.lr", "algorithm.outerLr"):  # the top member's values times 0.8 or 1.2, kept in range
        bounds = {"training.lr": (1e-4, 1e-2), "algorithm.outerLr": (0.3, 1.0)}[field]
        source = members[1].hyperparameters[field]
        allowed = {min(bounds[1], max(bounds[0], source * f)) for f in (0.8, 1.2)}
        assert by_index[2].hyperparameters[field] in allowed, (field, source, by_index[2].hyperparameters[field])
    for i in (0, 1, 3):  # the others continue from their own checkpoints, unchanged
        assert by_index[i].parent == f"pbt-m{i}-g0" and by_index[i].hyperparameters == members[i].hyperparameters
    (event,) = events
    assert event.startswith("Member 2 (evalLoss 3.0000) takes member 1's checkpoint at step 100 (evalLoss 1.0000): ")


def test_a_member_job_is_the_template_with_its_values_its_round_end_and_its_parent() -> None:
    spec = population()
    pop = {"apiVersion": "loco.dev/v1alpha1", "kind": "Population",
           "metadata": {"name": "pbt", "namespace": "ml", "uid": "u-1"}}
    member = MemberStatus(index=2, job="pbt-m2-g1", generation=1, parent="pbt-m1-g0",
                          hyperparameters={"training.lr": 3e-3, "algorithm.outerLr": 0.5, "algorithm.syncEvery": 20.0})
    job = member_job(pop, spec, member, 1)
    assert job["metadata"]["name"] == "pbt-m2-g1" and job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["labels"] == {LABEL_POPULATION: "pbt", LABEL_MEMBER: "2", LABEL_GENERATION: "1"}
    (owner,) = job["metadata"]["ownerReferences"]
    assert owner["kind"] == "Population" and owner["uid"] == "u-1" and owner["controller"] is True
    body = TrainingJobSpec.model_validate(job["spec"])  # a valid TrainingJob spec
    assert body.training.lr == 3e-3 and body.algorithm.outer_lr == 0.5 and body.algorithm.sync_every == 20
    assert body.training.steps == 200 and body.replicas == 2
    assert body.checkpoint.init_from.job_name == "pbt-m1-g0" and body.checkpoint.init_from.step == 100
    first = member_job(pop, spec, MemberStatus(index=0, job="pbt-m0-g0", hyperparameters=member.hyperparameters), 0)
    assert "initFrom" not in first["spec"].get("checkpoint", {}) and first["spec"]["training"]["steps"] == 100
