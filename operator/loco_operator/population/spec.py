"""The Population API (``loco.dev/v1alpha1``, kind ``Population``): a TrainingJob template, the hyper-parameters
to search with their ranges, the metric to rank by, and the exploit/explore schedule (docs/population.md)."""

from __future__ import annotations

from enum import Enum

from pydantic import Field, model_validator

from loco_contract.config import Model

from ..spec import TrainingJobSpec

KIND = "Population"
PLURAL = "populations"
SINGULAR = "population"
SHORT_NAMES = ["pop"]


class SearchField(str, Enum):
    """The hyper-parameters a population searches: fields of the member TrainingJob's spec."""

    lr = "training.lr"
    outer_lr = "algorithm.outerLr"
    sync_every = "algorithm.syncEvery"
    weight_decay = "training.weightDecay"
    outer_momentum = "algorithm.outerMomentum"


#: Fields whose values are whole numbers (rounded after sampling and after each perturbation).
INTEGER_FIELDS = frozenset({SearchField.sync_every})
#: Fields the template's algorithm must have (a DDP template has no outer learning rate or H).
OUTER_LOOP_FIELDS = frozenset({SearchField.outer_lr, SearchField.sync_every, SearchField.outer_momentum})


TEMPLATE_INIT_FROM = ("template.checkpoint.initFrom: a Population starts its members itself (round 0 from scratch, "
                      "every later round from a member's checkpoint): remove it")
TEMPLATE_TTL = ("template.runPolicy.ttlSecondsAfterFinished: a Population needs each round's jobs until it has scored "
                "them, and deletes the old ones itself: remove it")


class Scale(str, Enum):
    linear = "linear"
    log = "log"


class SearchParameter(Model):
    """One hyper-parameter: its range, sampled uniformly (``linear``) or log-uniformly (``log``) at the start,
    and kept inside it by every perturbation."""

    field: SearchField = Field(description="The member spec's field: training.lr | algorithm.outerLr | "
                               "algorithm.syncEvery | training.weightDecay | algorithm.outerMomentum.")
    min: float = Field(ge=0.0, description="Smallest value.")
    max: float = Field(gt=0.0, description="Largest value.")
    scale: Scale = Field(Scale.log, description="log: sampled log-uniformly (learning rates); linear: uniformly.")

    @model_validator(mode="after")
    def _range(self) -> "SearchParameter":
        if self.min >= self.max:
            raise ValueError(f"search {self.field.value}: min ({self.min}) must be < max ({self.max})")
        if self.scale == Scale.log and self.min <= 0:
            raise ValueError(f"search {self.field.value}: a log scale needs min > 0 (got {self.min}); use scale linear")
        if self.field in INTEGER_FIELDS and (self.min < 1 or int(self.max) < self.min):
            raise ValueError(f"search {self.field.value}: needs a whole number >= 1 in [min, max]")
        return self


class Metric(str, Enum):
    eval_loss = "evalLoss"
    loss = "loss"


class PopulationSpec(Model):
    """Desired state of a Population: its members' template, the search space and the schedule."""

    size: int = Field(4, ge=2, le=64, description="Members trained side by side, one TrainingJob each at a time.")
    template: TrainingJobSpec = Field(description="The members' TrainingJob spec; each member's searched fields are "
                                      "set over it. Its training.steps is the whole run.")
    search: list[SearchParameter] = Field(min_length=1, description="The hyper-parameters to search, each at most once.")
    metric: Metric = Field(Metric.eval_loss, description="What ranks the members, lower is better: evalLoss (held-out "
                           "loss, the default) | loss (training loss).")
    exploit_every_steps: int = Field(ge=1, description="A round's length in inner steps: at the end of each, the "
                                     "members are ranked and the bottom ones exploit and explore.")
    truncation: float = Field(0.25, gt=0.0, le=0.5, description="Share of the members in the bottom (they copy a "
                              "member of the top share of the same size); at least one member each.")
    perturb_factors: list[float] = Field(
        default_factory=lambda: [0.8, 1.2], min_length=2, max_length=8,
        description="An exploiting member's hyper-parameters are each multiplied by one of these, drawn at random.")
    seed: int = Field(0, ge=0, description="Seed of the first hyper-parameters and of every draw after them.")

    @model_validator(mode="after")
    def _consistent(self) -> "PopulationSpec":
        fields = [p.field for p in self.search]
        if len(set(fields)) != len(fields):
            raise ValueError("search: each field at most once")
        if self.template.algorithm.name.value == "ddp" and OUTER_LOOP_FIELDS & set(fields):
            raise ValueError("search: algorithm.outerLr, algorithm.syncEvery and algorithm.outerMomentum need an "
                             "outer-loop algorithm in template.algorithm.name (not ddp)")
        if self.exploit_every_steps >= self.template.training.steps:
            raise ValueError(f"exploitEverySteps ({self.exploit_every_steps}) must be < template.training.steps "
                             f"({self.template.training.steps}): no round would end before the run does")
        if any(f <= 0 for f in self.perturb_factors):
            raise ValueError("perturbFactors: each must be > 0")
        if self.template.checkpoint.init_from is not None:
            raise ValueError(TEMPLATE_INIT_FROM)
        if self.template.run_policy.ttl_seconds_after_finished is not None:
            raise ValueError(TEMPLATE_TTL)
        return self

    def rounds(self) -> int:
        """Rounds in the run: the last one ends at template.training.steps."""
        return -(-self.template.training.steps // self.exploit_every_steps)


class Phase(str, Enum):
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"


class MemberStatus(Model):
    """One member: its current TrainingJob, hyper-parameters, score and lineage."""

    index: int = Field(description="The member's number, 0 to size-1.")
    job: str = Field(description="Its TrainingJob of the current round.")
    generation: int = Field(0, description="The round its current job trains.")
    hyperparameters: dict[str, float] = Field(default_factory=dict, description="Its searched fields' values.")
    score: float | None = Field(None, description="Its metric at the end of the last finished round.")
    parent: str | None = Field(None, description="The TrainingJob whose checkpoint its current job started from "
                               "(its own previous job, or a top member's after an exploit).")
    phase: str | None = Field(None, description="Its current job's phase, as last observed.")


class BestMember(Model):
    index: int = Field(description="The best member's number.")
    job: str = Field(description="Its TrainingJob of the finished round (its checkpoint holds the best weights).")
    score: float = Field(description="Its metric.")
    round: int = Field(0, description="The round it was best at the end of.")


class ExploitRecord(Model):
    """One exploit: a bottom member took a top member's checkpoint and a perturbation of its hyper-parameters."""

    round: int = Field(description="The round at whose end it happened.")
    member: int = Field(description="The member that copied.")
    score: float = Field(description="Its score before.")
    parent: int = Field(description="The member it copied.")
    parent_job: str = Field(description="The job whose checkpoint it took.")
    parent_score: float = Field(description="That member's score.")
    step: int = Field(description="The checkpoint's step.")
    hyperparameters: dict[str, float] = Field(default_factory=dict, description="Its new values.")


#: ``status.lineage`` keeps the newest this many exploits (the events have them all).
MAX_LINEAGE = 200


class PopulationStatus(Model):
    """Observed state, kept in the object so a restarted operator resumes the round."""

    round: int = Field(0, description="The round the members train now, from 0.")
    rounds: int | None = Field(None, description="Rounds in the whole run.")
    members: list[MemberStatus] = Field(default_factory=list, description="Each member, by index.")
    best: BestMember | None = Field(None, description="The best member at the end of the last finished round.")
    median_score: float | None = Field(None, description="The members' median score at the end of the last finished "
                                       "round.")
    lineage: list[ExploitRecord] = Field(default_factory=list, description=f"Every exploit so far, oldest first (the "
                                         f"newest {MAX_LINEAGE}).")
    phase: Phase | None = Field(None, description="Running | Succeeded | Failed.")
    message: str | None = Field(None, description="One line on where the population stands.")
