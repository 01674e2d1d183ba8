"""One Population reconcile, decided (pure): from the Population as stored and its member TrainingJobs as
observed, the status to write, the member jobs to create and delete, and the events.

The status is written before anything is created, and every decision is a function of what is stored (the
round's draws are seeded, job names are fixed), so an operator killed between two steps makes the same decisions
again: a member job that already exists counts as created, and no member is duplicated.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from pydantic import ValidationError

from ..validation import FieldError, validate_job
from .plan import (
    LABEL_GENERATION, MAX_POPULATION_NAME_LENGTH, initial_hyperparameters, member_job, member_job_name, next_members,
    rank, round_end_step
)
from .spec import MAX_LINEAGE, BestMember, ExploitRecord, MemberStatus, Phase, PopulationSpec, PopulationStatus

#: Event reasons (CamelCase, as Kubernetes' own).
CREATED, EXPLOITED, ROUND_FINISHED, SUCCEEDED, FAILED, INVALID = (
    "MembersCreated", "Exploited", "RoundFinished", "PopulationSucceeded", "PopulationFailed", "InvalidSpec")


@dataclass
class PopulationPlan:
    """What one reconcile does: the status to store, then the jobs to create and delete, and the events."""

    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    #: (type, reason, message)
    events: list[tuple[str, str, str]] = field(default_factory=list)


def spec_errors(body: Mapping[str, Any]) -> list[FieldError]:
    """Every problem of a Population body, each naming its field (``spec.template.…`` for the member template,
    checked as a TrainingJob is)."""
    meta = body.get("metadata") or {}
    raw = body.get("spec") or {}
    errors: list[FieldError] = []
    name = meta.get("name") or ""
    if len(name) > MAX_POPULATION_NAME_LENGTH:
        errors.append(FieldError("metadata.name", name, f"at most {MAX_POPULATION_NAME_LENGTH} characters: member "
                                 "jobs are named <name>-m<index>-g<round>"))
    if not isinstance(raw, Mapping):
        return [*errors, FieldError("spec", raw, "spec must be an object")]
    template = raw.get("template")
    if isinstance(template, Mapping):
        errors += [FieldError("spec.template" + e.path.removeprefix("spec"), e.value, e.message)
                   for e in validate_job({"metadata": {"name": member_job_name(name, 0, 0)}, "spec": template})
                   if e.path.startswith("spec")]  # the member's name is checked above
    if errors:
        return errors
    try:
        PopulationSpec.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            path = "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            errors.append(FieldError(path, None, str(err["msg"]).removeprefix("Value error, ")))
    return errors


def _phase(job: Mapping[str, Any] | None) -> str | None:
    return ((job or {}).get("status") or {}).get("phase")


def _score(job: Mapping[str, Any], metric: str) -> float | None:
    value = (job.get("status") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def plan_population(body: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]]) -> PopulationPlan:
    """Decide one reconcile of the Population ``body`` whose member TrainingJobs (label
    ``loco.dev/population=<name>``) are ``jobs``."""
    name = body["metadata"]["name"]
    old = PopulationStatus.model_validate(body.get("status") or {})
    status = old.model_copy(deep=True)
    out = PopulationPlan(status={})
    if status.phase in (Phase.succeeded, Phase.failed):
        out.status = status.to_wire()
        return out
    errors = spec_errors(body)
    if errors:
        message = "; ".join(str(e) for e in errors)
        status.phase, status.message = Phase.failed, f"Invalid spec: {message}"
        out.events.append(("Warning", INVALID, message))
        out.status = status.to_wire()
        return out
    spec = PopulationSpec.model_validate(body["spec"])
    status.rounds = spec.rounds()
    by_name = {j["metadata"]["name"]: j for j in jobs}

    if not status.members:  # round 0: the first hyper-parameters
        status.members = [MemberStatus(index=i, job=member_job_name(name, i, 0), generation=0, hyperparameters=values)
                          for i, values in enumerate(initial_hyperparameters(spec))]
        status.round, status.phase = 0, Phase.running
        out.events.append(("Normal", CREATED, f"Round 1 of {status.rounds}: {spec.size} members, each to step "
                           f"{round_end_step(spec, 0)}"))

    round_ = status.round
    for m in status.members:
        m.phase = _phase(by_name.get(m.job)) or m.phase
    failed = [m for m in status.members if m.phase == "Failed"]
    finished = all(m.phase == "Succeeded" for m in status.members)
    if failed:
        m = failed[0]
        why = ((by_name.get(m.job) or {}).get("status") or {}).get("message") or "no message"
        status.phase = Phase.failed
        status.message = f"Member {m.index}'s job {m.job} failed in round {round_}: {why}"
        out.events.append(("Warning", FAILED, status.message))
    elif finished:
        _finish_round(spec, name, status, by_name, out)
    else:
        running = sum(m.phase == "Running" for m in status.members)
        status.message = (f"Round {round_ + 1} of {status.rounds}: {running} of {spec.size} members running, "
                          f"to step {round_end_step(spec, round_)}")

    if status.phase == Phase.running:
        for m in status.members:
            if m.job not in by_name:
                out.create.append(member_job(dict(body), spec, m, status.round))
    # The two newest rounds stay: the current one, and the one its jobs started from (their initFrom sources).
    keep_from = status.round - 1
    out.delete = sorted(n for n, j in by_name.items()
                        if int((j["metadata"].get("labels") or {}).get(LABEL_GENERATION, keep_from)) < keep_from)
    out.status = status.to_wire()
    return out


def _finish_round(spec: PopulationSpec, name: str, status: PopulationStatus, by_name: Mapping[str, Any],
                  out: PopulationPlan) -> None:
    """Every member's job of the round succeeded: score them, then end the run or exploit and explore."""
    round_ = status.round
    scores = []
    for m in status.members:
        score = _score(by_name[m.job], spec.metric.value)
        if score is None:
            status.phase = Phase.failed
            status.message = (f"Member {m.index}'s job {m.job} succeeded without reporting {spec.metric.value}: "
                              "the population cannot rank it")
            out.events.append(("Warning", FAILED, status.message))
            return
        scores.append(score)
    best = rank(scores)[0]
    status.best = BestMember(index=best, job=status.members[best].job, score=scores[best], round=round_)
    status.median_score = statistics.median(scores)
    summary = (f"best member {best} ({spec.metric.value} {scores[best]:.4f}), median {status.median_score:.4f}")
    if round_ + 1 >= spec.rounds():
        for m, score in zip(status.members, scores):
            m.score = score
        status.phase = Phase.succeeded
        status.message = f"Finished {spec.rounds()} rounds at step {spec.template.training.steps}: {summary}"
        out.events.append(("Normal", SUCCEEDED, status.message))
        return
    members, sentences = next_members(spec, name, status.members, scores, round_)
    step = round_end_step(spec, round_)
    for m in members:
        source = next((s for s in status.members if s.job == m.parent), None)
        if source is not None and source.index != m.index:
            status.lineage.append(ExploitRecord(round=round_, member=m.index, score=scores[m.index],
                                                parent=source.index, parent_job=source.job,
                                                parent_score=scores[source.index], step=step,
                                                hyperparameters=m.hyperparameters))
    status.lineage = status.lineage[-MAX_LINEAGE:]
    status.members, status.round = members, round_ + 1
    status.message = (f"Round {round_ + 1} of {spec.rounds()} finished at step {step}: {summary}; round "
                      f"{round_ + 2} starts")
    out.events.append(("Normal", ROUND_FINISHED, status.message))
    out.events += [("Normal", EXPLOITED, s) for s in sentences]
