"""Population-based training, the decisions (pure: the same inputs give the same answer, so an operator restarted
mid-round makes the same ones again and creates no member twice).

A round trains every member for ``exploitEverySteps`` inner steps: member i's job of round r is
``<population>-m<i>-g<r>`` and ends at step ``min((r+1)·exploitEverySteps, template.training.steps)``, where it
commits its final checkpoint and reports its final metric. When every member's job of the round has succeeded:

* **rank** the members by the metric (lower is better; ties by index);
* **exploit**: each member of the bottom ``truncation`` share starts its next job from the checkpoint of a member
  of the top share, drawn at random (``checkpoint.initFrom``: weights, optimizer state, data position and step);
* **explore**: its hyper-parameters are the top member's, each multiplied by one of ``perturbFactors``, kept in
  range (and whole where the field is);
* every other member starts its next job from its own checkpoint with its hyper-parameters unchanged.

Every draw of round r comes from ``Random(f"{seed}:{r}")``.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any, Sequence

from ..rules import MAX_JOB_NAME_LENGTH
from ..spec import API_VERSION as JOB_API_VERSION, KIND as JOB_KIND
from .spec import INTEGER_FIELDS, KIND, MemberStatus, PopulationSpec, Scale, SearchParameter

LABEL_POPULATION = "loco.dev/population"
LABEL_MEMBER = "loco.dev/member"
LABEL_GENERATION = "loco.dev/generation"
#: Longest Population name: member jobs are ``<name>-m<index>-g<round>`` (index < 64, round < 10,000).
MAX_POPULATION_NAME_LENGTH = MAX_JOB_NAME_LENGTH - len("-m63-g9999")


def member_job_name(population: str, index: int, generation: int) -> str:
    return f"{population}-m{index}-g{generation}"


def draws(seed: int, round_: int) -> random.Random:
    """The random source of one round's decisions (round -1: the first hyper-parameters)."""
    return random.Random(f"{seed}:{round_}")


def round_end_step(spec: PopulationSpec, round_: int) -> int:
    """The inner step round ``round_`` ends at (its jobs' ``training.steps``)."""
    return min((round_ + 1) * spec.exploit_every_steps, spec.template.training.steps)


def _fit(param: SearchParameter, value: float) -> float:
    value = min(param.max, max(param.min, value))
    if param.field in INTEGER_FIELDS:
        value = float(min(math.floor(param.max), max(math.ceil(param.min), round(value))))
    return value


def initial_hyperparameters(spec: PopulationSpec) -> list[dict[str, float]]:
    """Each member's first values: uniform (or log-uniform) in each range."""
    rng = draws(spec.seed, -1)
    members = []
    for _ in range(spec.size):
        values = {}
        for p in spec.search:
            if p.scale == Scale.log:
                raw = math.exp(rng.uniform(math.log(p.min), math.log(p.max)))
            else:
                raw = rng.uniform(p.min, p.max)
            values[p.field.value] = _fit(p, raw)
        members.append(values)
    return members


def perturb(spec: PopulationSpec, values: dict[str, float], rng: random.Random) -> dict[str, float]:
    """``values`` with each searched field multiplied by a random factor of ``perturbFactors``, kept in range."""
    out = dict(values)
    for p in spec.search:
        out[p.field.value] = _fit(p, values[p.field.value] * rng.choice(spec.perturb_factors))
    return out


def rank(scores: Sequence[float]) -> list[int]:
    """Member indices from best to worst (lower score is better; ties by index)."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


def exploit_pairs(spec: PopulationSpec, scores: Sequence[float], rng: random.Random) -> dict[int, int]:
    """Bottom member -> the top member it copies: the bottom and top ``truncation`` shares, at least one each."""
    order = rank(scores)
    share = max(1, math.floor(len(order) * spec.truncation))
    top, bottom = order[:share], order[-share:]
    return {loser: rng.choice(top) for loser in bottom}


def next_members(spec: PopulationSpec, population: str, members: Sequence[MemberStatus], scores: Sequence[float],
                 round_: int) -> tuple[list[MemberStatus], list[str]]:
    """The members of round ``round_ + 1`` after round ``round_`` ended with ``scores`` (by member index), and one
    sentence per exploit (the events)."""
    rng = draws(spec.seed, round_)
    pairs = exploit_pairs(spec, scores, rng)
    step = round_end_step(spec, round_)
    nxt, events = [], []
    for m in sorted(members, key=lambda m: m.index):
        source = members[pairs[m.index]] if m.index in pairs else m
        values = perturb(spec, source.hyperparameters, rng) if m.index in pairs else dict(m.hyperparameters)
        nxt.append(MemberStatus(index=m.index, job=member_job_name(population, m.index, round_ + 1),
                                generation=round_ + 1, hyperparameters=values, score=scores[m.index], parent=source.job))
        if m.index in pairs:
            changes = ", ".join(f"{k} {source.hyperparameters[k]:.4g}->{v:.4g}" for k, v in values.items())
            events.append(f"Member {m.index} ({spec.metric.value} {scores[m.index]:.4f}) takes member {source.index}'s "
                          f"checkpoint at step {step} ({spec.metric.value} {scores[source.index]:.4f}): {changes}")
    return nxt, events


def _set(spec_wire: dict[str, Any], dotted: str, value: float, integer: bool) -> None:
    section, field = dotted.split(".")
    spec_wire.setdefault(section, {})[field] = int(value) if integer else value


def member_job(population: dict[str, Any], spec: PopulationSpec, member: MemberStatus, round_: int) -> dict[str, Any]:
    """The TrainingJob of ``member`` in round ``round_``: the template with its hyper-parameters, ending at the
    round's step, started from its parent's checkpoint of the previous round's end (none in round 0), owned by
    the Population (deleting it deletes its members)."""
    meta = population["metadata"]
    body = copy.deepcopy(spec.template.to_wire())
    integer_fields = {f.value for f in INTEGER_FIELDS}
    for field, value in member.hyperparameters.items():
        _set(body, field, value, field in integer_fields)
    training = body.setdefault("training", {})
    training["steps"] = round_end_step(spec, round_)
    # every round continues the whole run's lr schedule (training.scheduleSteps), not one of its own
    training.setdefault("scheduleSteps", spec.template.training.steps)
    checkpoint = body.setdefault("checkpoint", {})
    if member.parent is not None and round_ > 0:
        checkpoint["initFrom"] = {"jobName": member.parent, "step": round_end_step(spec, round_ - 1)}
    else:
        checkpoint.pop("initFrom", None)
    return {
        "apiVersion": JOB_API_VERSION,
        "kind": JOB_KIND,
        "metadata": {
            "name": member.job,
            "namespace": meta.get("namespace") or "default",
            "labels": {LABEL_POPULATION: meta["name"], LABEL_MEMBER: str(member.index), LABEL_GENERATION: str(round_)},
            "ownerReferences": [{"apiVersion": population.get("apiVersion", JOB_API_VERSION), "kind": KIND,
                                 "name": meta["name"], "uid": meta.get("uid", ""), "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "spec": body,
    }
