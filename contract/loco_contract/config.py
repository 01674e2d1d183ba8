"""The trainer configuration: the contract between the operator and the trainer.

This module is imported by both sides, so it must never import torch, kopf or kubernetes
(a test enforces it). The sections below are also the ``spec.model``, ``spec.data``,
``spec.training``, ``spec.algorithm`` and ``spec.checkpoint`` sections of a TrainingJob: the
CRD is generated from these models, so the API, the validation and the trainer cannot drift.

Field names are snake_case in Python and camelCase on the wire (``sync_every`` <-> ``syncEvery``);
both spellings are accepted when parsing, the camelCase one is written.

How a config reaches a worker: the operator renders one :class:`TrainerConfig` per job as JSON into
the ConfigMap ``<job>-trainer`` (key ``config.json``) mounted at ``/etc/loco/config.json``; what
differs per pod (replica index, epoch, resume path, rendezvous address) arrives as environment
variables, listed in :class:`RuntimeEnv`. ``python -m loco_trainer --config FILE --nproc N`` builds the
same runtime locally, without Kubernetes.
"""

from __future__ import annotations

import os
import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from pydantic.alias_generators import to_camel

from loco_contract.base import Model
from loco_contract.detection import ProbeSettings

CONFIG_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------- model


class GPTSpec(Model):
    """Size knobs of the built-in GPT (a nanoGPT-style decoder-only transformer)."""

    n_layer: int = Field(2, ge=1, le=256, description="Number of transformer blocks.")
    n_head: int = Field(2, ge=1, le=256, description="Attention heads per block; must divide nEmbd.")
    n_embd: int = Field(64, ge=8, le=65536, description="Width of the residual stream.")
    vocab_size: int = Field(
        256,
        ge=2,
        le=1_000_000,
        description="Vocabulary size. The built-in corpus is byte-level, so 256 (the default) is enough.",
    )
    block_size: int = Field(
        256, ge=8, le=1_048_576, description="Longest context the model accepts (positional table size); must be >= training.seqLen."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability (0 disables dropout).")
    bias: bool = Field(False, description="Use bias terms in linear and LayerNorm layers.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "GPTSpec":
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"nEmbd ({self.n_embd}) must be a multiple of nHead ({self.n_head}); "
                f"for example set nEmbd to {self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        return self


_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ModelSpec(Model):
    """Which model to train: the built-in GPT, or an importable factory."""

    name: Literal["gpt", "custom"] = Field(
        "gpt", description="'gpt' for the built-in GPT (sized by 'gpt'), 'custom' for 'factory'."
    )
    gpt: GPTSpec = Field(default_factory=GPTSpec, description="Size of the built-in GPT (used when name is 'gpt').")
    factory: str | None = Field(
        None,
        description=(
            "Importable 'package.module:callable' returning a torch.nn.Module whose forward(idx, targets)"
            " returns (logits, loss); required when name is 'custom'. It is called with 'kwargs'."
        ),
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to 'factory'.")

    @model_validator(mode="after")
    def _factory_matches_name(self) -> "ModelSpec":
        if self.name == "custom" and not self.factory:
            raise ValueError("name is 'custom' but 'factory' is empty: set factory to 'package.module:callable'")
        if self.factory and self.name != "custom":
            raise ValueError("'factory' is set but name is 'gpt': set name to 'custom' to use the factory, or remove factory")
        if self.factory and not _FACTORY_RE.match(self.factory):
            raise ValueError(f"factory {self.factory!r} is not of the form 'package.module:callable'")
        return self


# ---------------------------------------------------------------------------------------- data


class DataSpec(Model):
    """Training data: the built-in corpus (no download) or a directory of token shards."""

    source: Literal["builtin", "shards"] = Field(
        "builtin",
        description=(
            "'builtin': the Python standard library's own source files, byte-level (ships with every Python,"
            " needs no download). 'shards': *.bin files of little-endian uint16 tokens under 'path'."
        ),
    )
    path: str | None = Field(None, description="Directory of token shards (required when source is 'shards').")
    eval_fraction: float = Field(
        0.05, gt=0.0, lt=0.5, description="Share of the corpus held out for eval loss (the tail of the token stream)."
    )
    max_bytes: int | None = Field(
        None, ge=1024, description="Cap on the built-in corpus size in bytes (None: the whole standard library)."
    )

    @model_validator(mode="after")
    def _path_for_shards(self) -> "DataSpec":
        if self.source == "shards" and not self.path:
            raise ValueError("source is 'shards' but 'path' is empty: set path to the directory of *.bin token shards")
        return self


# ------------------------------------------------------------------------------------ training


class BatchRule(str, Enum):
    """How the per-worker batch and the learning rate follow a change of worker count."""

    keep_global_batch = "keepGlobalBatch"
    keep_worker_batch = "keepWorkerBatch"


class LrScaling(str, Enum):
    """How the peak learning rate follows a change of the batch one inner optimizer step sees."""

    sqrt = "sqrt"  # lr x sqrt(k): the square-root rule for adaptive (Adam-family) optimizers, Malladi et al. 2022
    linear = "linear"  # lr x k: the linear scaling rule for SGD, Goyal et al. 2017
    none = "none"


class TrainingSpec(Model):
    """The inner training loop, identical for every algorithm."""

    steps: int = Field(200, ge=1, le=1_000_000_000, description="Total inner optimizer steps per worker (at most 10^9).")
    batch_size: int = Field(8, ge=1, le=65_536, description="Sequences per process per step (micro-batch; at most 65536).")
    seq_len: int = Field(128, ge=2, description="Tokens per sequence; must be <= model.gpt.blockSize.")
    lr: float = Field(3e-3, gt=0.0, le=10.0, description="Peak learning rate of the inner AdamW optimizer (at the start world size; see lrScaling).")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final lr of the cosine schedule as a fraction of lr.")
    schedule_steps: int | None = Field(
        None, ge=1, le=1_000_000_000,
        description=(
            "Length of the cosine lr schedule in inner steps (default: steps). A job that trains one part of a longer"
            " run (a Population's round, started through checkpoint.initFrom) sets the whole run's length here, so"
            " that its lr continues the run's schedule instead of decaying within the part."
        ),
    )
    warmup_steps: int = Field(20, ge=0, description="Linear lr warm-up steps.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay.")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0.0, description="Clip the gradient norm to this value (0 disables clipping).")
    eval_every: int = Field(50, ge=0, description="Evaluate every N steps (0: only at the end).")
    eval_batches: int = Field(4, ge=1, description="Batches per evaluation.")
    log_every: int = Field(10, ge=1, description="Log a progress line every N steps.")
    seed: int = Field(
        1337, ge=0, le=2**32 - 1,
        description="Seed for model init, data order and dropout (0 to 2^32-1; the trainer derives per-rank and per-epoch seeds from it).",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Autocast dtype of forward/backward.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when present, else CPU.")
    batch_rule: BatchRule = Field(
        BatchRule.keep_worker_batch,
        description=(
            "When the worker count changes: keepWorkerBatch keeps batchSize per process (global batch follows"
            " the worker count); keepGlobalBatch divides the global batch among the workers."
        ),
    )
    lr_scaling: LrScaling = Field(
        LrScaling.sqrt,
        description=(
            "How lr follows a resize under keepWorkerBatch, relative to the world size the job started with:"
            " with k = (sequences one inner optimizer step sees now) / (the same at the start), the peak lr"
            " becomes lr*sqrt(k) (sqrt, the square-root rule for Adam-family optimizers, Malladi et al. 2022),"
            " lr*k (linear, Goyal et al. 2017) or lr (none). k = worldSize/startWorldSize for ddp; 1 for the"
            " diloco family (each replica's inner optimizer sees only its replica's batch). keepGlobalBatch"
            " keeps lr. See docs/elastic.md."
        ),
    )


# ----------------------------------------------------------------------------------- algorithm


class AlgorithmName(str, Enum):
    ddp = "ddp"
    diloco = "diloco"
    streaming_diloco = "streaming-diloco"
    noloco = "noloco"
    co2 = "co2"


#: Algorithms whose survivors keep running across a membership change (docs/elastic.md "Live
#: resizing"); every other one resizes by a coordinated restart from the latest checkpoint.
LIVE_MEMBERSHIP_ALGORITHMS = frozenset(
    {AlgorithmName.diloco, AlgorithmName.streaming_diloco, AlgorithmName.noloco, AlgorithmName.co2})


#: Algorithms that can run sharded inside a pod (``nprocPerWorker > 1``, FSDP2): their hooks use only
#: element-wise tensor math and collectives on parameters and gradients. The API refuses the others
#: (``loco_operator.rules``); the trainer refuses them too for configs that did not pass through it.
SHARDABLE_ALGORITHMS = ("ddp", "diloco")


class Quantization(str, Enum):
    none = "none"
    bf16 = "bf16"
    e3m0 = "e3m0"


#: Which parameters apply to which algorithm (anything else set is refused with the field named).
ALGORITHM_PARAMETERS: dict[str, set[str]] = {
    "ddp": set(),
    "diloco": {"sync_every", "outer_lr", "outer_momentum", "nesterov", "adaptive_steps"},
    "streaming-diloco": {
        "sync_every", "outer_lr", "outer_momentum", "nesterov",
        "fragments", "overlap_steps", "mixing_factor", "quantization",
    },
    "noloco": {"sync_every", "outer_lr", "outer_momentum", "nesterov", "group_size", "mean_pull", "group_seed",
               "final_merge"},
    "co2": {"sync_every", "outer_lr", "outer_momentum", "nesterov", "staleness_penalty", "clip_threshold"},
}

#: Paper defaults, applied by :meth:`AlgorithmSpec.resolved` for fields left unset.
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddp": {},
    # DiLoCo (Douillard et al. 2023): H=500 in the paper; our tiny demo models use a smaller H. H = 50 had the
    # smallest gap to DDP at every seed over 10,000 inner steps at equal tokens, against H = 10 and 100. Outer lr: the
    # paper's 0.7 is the best or within 0.6 points of it at every H and length measured, and the best over 10,000 steps
    # at H = 50 (1.0 won over 5,000 steps there only; docs/algorithms.md).
    "diloco": {"sync_every": 50, "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True},
    # Streaming DiLoCo (Douillard et al. 2025): tau small, 4-bit E3M0 exchange; alpha 0 rather than the paper's
    # 0.5 (bench_convergence, H=50: gap vs DDP +6.4 % at 0.5, +2.1 % at 0; docs/algorithms.md).
    "streaming-diloco": {
        "sync_every": 50, "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True,
        "fragments": 2, "overlap_steps": 1, "mixing_factor": 0.0, "quantization": "e3m0",
    },
    # NoLoCo (2025): alpha (outer lr) 0.7 and groups of 2 as in the paper; gamma (meanPull) is left unset here on
    # purpose: resolved() sets it to the resolved outerLr, as the authors' code does. DiLoCo's Nesterov step with
    # beta 0.9 instead of the paper's modified rule with beta 0.5: over 10,000 inner steps at H = 50 the paper's rule
    # trailed DiLoCo by 7.3 points, this one by 2.1-3.4 (0.6 with finalMerge); docs/algorithms.md "NoLoCo: why it
    # trailed".
    "noloco": {"sync_every": 50, "outer_lr": 0.7, "outer_momentum": 0.9, "group_size": 2, "group_seed": 0,
               "nesterov": True, "final_merge": False},
    # CO2 (ICLR 2024): eta 1.0 and beta 0.5 as in the released code, penalty and clipping from the paper. With the
    # outer gradient measured from the current phi (co2.py), eta 1.0 no longer oscillates: gap vs DDP at
    # H = 10 / 50 / 100 of +9.1 / +15.3 / +14.2 %, against +10.2 / +18.4 / +14.6 % for the earlier rule's best eta
    # (0.3; docs/algorithms.md "Convergence and the defaults"). Plain momentum, as in the paper (Nesterov was worse).
    "co2": {"sync_every": 50, "outer_lr": 1.0, "outer_momentum": 0.5, "nesterov": False, "staleness_penalty": 1.0,
            "clip_threshold": 1.0},
}


class AdaptiveSteps(Model):
    """Heterogeneity-aware local steps (the FedCompass idea): a worker measured slower than the fastest takes
    fewer inner steps per round, so that every worker reaches the outer step at about the same time instead of
    the fast ones waiting for it; the outer gradient weights each worker by the steps it took."""

    min_steps: int | None = Field(
        None, ge=1, description="Fewest inner steps a worker takes per round (default: a quarter of syncEvery, at "
        "least 1); a worker slower than that keeps the others waiting. At most syncEvery.")
    tolerance: float = Field(
        0.2, ge=0.0, le=1.0, description="A worker within this fraction of the fastest one's step time takes the full "
        "syncEvery steps, and a worker's steps change only when the new count differs by more than this fraction of "
        "syncEvery (measurement noise does not move them).")


class AlgorithmSpec(Model):
    """The distributed algorithm and its parameters. Unset parameters take the paper's default
    for the chosen algorithm; a parameter that does not apply to the algorithm is refused."""

    name: AlgorithmName = Field(
        AlgorithmName.diloco, description="ddp | diloco | streaming-diloco | noloco | co2 (see docs/algorithms.md)."
    )
    sync_every: int | None = Field(
        None, ge=1, description="H: inner steps between outer synchronisations (diloco family; default 50)."
    )
    outer_lr: float | None = Field(None, gt=0.0, le=10.0, description="Outer learning rate (diloco 0.7, co2 1.0, noloco 0.7).")
    outer_momentum: float | None = Field(None, ge=0.0, lt=1.0, description="Outer momentum (diloco 0.9, co2 0.5, noloco 0.9).")
    nesterov: bool | None = Field(
        None, description="Use Nesterov momentum in the outer SGD (diloco and streaming-diloco: default true; co2: default "
        "false, as in the paper; noloco: default true, DiLoCo's step on the group's mean outer gradient with the pull "
        "towards the group's mean kept out of the momentum; false is the paper's modified rule)."
    )
    fragments: int | None = Field(None, ge=1, description="P: parameter fragments synchronised on a staggered schedule (streaming-diloco).")
    overlap_steps: int | None = Field(
        None, ge=0, description="tau: inner steps the fragment exchange overlaps before it is merged (streaming-diloco)."
    )
    mixing_factor: float | None = Field(
        None, ge=0.0, le=1.0, description="alpha: local share when merging, theta <- (1-alpha)*global + alpha*local (streaming-diloco)."
    )
    quantization: Quantization | None = Field(None, description="Precision of exchanged outer gradients: none | bf16 | e3m0 (streaming-diloco).")
    group_size: int | None = Field(None, ge=2, description="Ranks per gossip group (noloco; the paper uses 2).")
    mean_pull: float | None = Field(
        None, ge=0.0, le=10.0,
        description="gamma: pull of each worker towards its group's mean outer weights (noloco; default: = outerLr).",
    )
    group_seed: int | None = Field(
        None, ge=0, description="Seed of the random gossip groups, identical on every rank (noloco; default 0)."
    )
    final_merge: bool | None = Field(
        None, description="End with one all-reduce average of the workers' weights, so all hold the same model "
        "(noloco; default false: they end as different replicas and the job saves worker 0's).")
    staleness_penalty: float | None = Field(None, gt=0.0, description="lambda: staleness-gap penalty of the outer update (co2).")
    adaptive_steps: AdaptiveSteps | None = Field(
        None, description="Set each worker's inner steps per round from its measured step rate, so a slow worker "
        "takes fewer steps instead of holding every sync (diloco; docs/algorithms.md, \"Adaptive local steps\"). "
        "Unset: every worker takes syncEvery steps.")
    clip_threshold: float | None = Field(None, gt=0.0, description="c: outer momentum is clipped to [-c, c] (co2).")

    @model_validator(mode="after")
    def _only_applicable(self) -> "AlgorithmSpec":
        allowed = ALGORITHM_PARAMETERS[self.name.value]
        for field_name in type(self).model_fields:
            if field_name == "name" or getattr(self, field_name) is None:
                continue
            if field_name not in allowed:
                alias = to_camel(field_name)
                users = sorted(a for a, params in ALGORITHM_PARAMETERS.items() if field_name in params)
                raise ValueError(
                    f"'{alias}' does not apply to algorithm '{self.name.value}' (it is used by: {', '.join(users)}); "
                    f"remove it or change algorithm.name"
                )
        return self

    @model_validator(mode="after")
    def _min_steps_within_round(self) -> "AlgorithmSpec":
        if self.adaptive_steps is None or self.adaptive_steps.min_steps is None:
            return self
        sync_every = self.sync_every or ALGORITHM_DEFAULTS[self.name.value].get("sync_every", 1)
        if self.adaptive_steps.min_steps > sync_every:
            raise ValueError(f"'adaptiveSteps.minSteps' ({self.adaptive_steps.min_steps}) must be <= syncEvery "
                             f"({sync_every}): a round has syncEvery inner steps")
        return self

    def resolved(self) -> "AlgorithmSpec":
        """A copy with every applicable parameter filled from the paper defaults."""
        values = dict(ALGORITHM_DEFAULTS[self.name.value])
        values.update({k: v for k, v in self.model_dump().items() if v is not None and k != "name"})
        if values.get("adaptive_steps") is not None:
            adaptive = AdaptiveSteps.model_validate(values["adaptive_steps"])
            if adaptive.min_steps is None:
                adaptive = adaptive.model_copy(update={"min_steps": max(1, values["sync_every"] // 4)})
            values["adaptive_steps"] = adaptive
        if "mean_pull" in ALGORITHM_PARAMETERS[self.name.value] and values.get("mean_pull") is None:
            values["mean_pull"] = values["outer_lr"]  # NoLoCo's gamma follows alpha unless set
        return AlgorithmSpec(name=self.name, **values)


# ---------------------------------------------------------------------------------- checkpoint


#: An absolute path with no empty, '.' or '..' segment and no NUL, an optional trailing '/' (RE2 and Python
#: alike: no look-arounds, so the CRD's pattern is this one). A segment is anything without '/' or NUL that
#: is not '.' or '..': it starts with another character, or is '.' plus one, or '..' plus at least one.
CLEAN_ABSOLUTE_PATH = r"^(/([^/.\x00][^/\x00]*|\.[^/.\x00][^/\x00]*|\.\.[^/\x00]+))+/?$"


#: A TrainingJob's name: a DNS-1035 label (what the API accepts for metadata.name, see loco_operator.rules).
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class InitFrom(Model):
    """Start from another TrainingJob's committed checkpoint (population-based training, a fine-tune, a branch)."""

    job_name: str = Field(min_length=1, max_length=63, pattern=JOB_NAME_PATTERN,
                          description="The TrainingJob (same namespace) whose checkpoint this job starts from.")
    step: int | None = Field(
        None, ge=0, le=10**9,
        description="Its checkpoint at this step (still kept: checkpoint.keep rotates old ones out); unset: its newest "
        "committed one.")


class CheckpointSpec(Model):
    """Where and how often checkpoints are written."""

    path: str = Field(
        "/checkpoints",
        min_length=2,
        max_length=4096,
        pattern=CLEAN_ABSOLUTE_PATH,
        description=(
            "Directory for checkpoints, shared by all workers (mount a PersistentVolumeClaim there through"
            " template.volumes/volumeMounts). Each job writes under <path>/<namespace>/<job>. An absolute, clean"
            " path: starts with '/', no empty, '.' or '..' segments, no NUL (e.g. /checkpoints)."
        ),
    )
    every_steps: int = Field(50, ge=0, description="Save every N inner steps (0: only at the end).")
    keep: int = Field(3, ge=1, description="Keep the newest N committed checkpoints; older ones are deleted.")
    async_save: bool = Field(True, description="Write in the background; training stalls only for the copy to host memory.")
    init_from: InitFrom | None = Field(
        None,
        description=(
            "Start from another TrainingJob's committed checkpoint, read-only, at any world size, sharding or algorithm"
            " (the universal format): its model, optimizer state, data position and step. Only while this job has no"
            " checkpoint of its own. Both jobs must keep checkpoints under the same checkpoint.path (one volume). A"
            " source that does not exist fails the job; one that has not committed the step yet holds it Pending."
        ),
    )
    adopt_previous_job: bool = Field(
        False,
        description=(
            "What a job does with checkpoints an earlier job of the same name (another uid) left in its directory:"
            " false (default) keeps them aside in <path>/<namespace>/<job>/previous-job-<uid> and starts from step 0;"
            " true resumes from the newest of them. The ResumedFromPreviousJob condition says which happened."
        ),
    )


# ------------------------------------------------------------------------------ fault injection


class LinkDelay(Model):
    """A slow connection: every send from the faulty rank to ``peer`` takes ``seconds`` longer."""

    peer: int = Field(ge=0, description="Global rank at the other end of the slow link.")
    seconds: float = Field(gt=0.0, le=3600.0, description="Extra seconds per transfer on that link.")


class HangLink(Model):
    """A stalled connection: sends from the faulty rank to ``peer`` are posted but never complete."""

    peer: int = Field(ge=0, description="Global rank at the other end of the stalled link.")
    after_collective: int = Field(
        0, ge=0, description="First call number (seq) of the Comm whose send is held; earlier sends are healthy."
    )


class FaultInjection(Model):
    """Faults the trainer injects into itself, for tests and demos (never set this in production)."""

    crash_at_step: int | None = Field(None, ge=0, description="Exit with 'exitCode' when reaching this step.")
    exit_code: int = Field(1, ge=1, le=255, description="Exit code of an injected crash.")
    ranks: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, description="Global ranks the fault applies to (each >= 0).")
    only_first_attempt: bool = Field(
        True, description="Inject only on the job's first attempt (restart count 0), so the restarted job can succeed."
    )
    step_delay_s: float = Field(0.0, ge=0.0, description="Sleep this long before every step the worker computes (a slow trainer, for demos).")
    slow_step_delay_s: float = Field(
        0.0, ge=0.0, le=3600.0, description="Sleep this long before every inner step this worker computes, on the listed "
        "ranks only (every rank when none is listed) and on every attempt: a slow but healthy worker (older hardware), "
        "for the heterogeneity benchmarks and demos.")
    nan_loss_at_step: int | None = Field(
        None, ge=0, description="The training loss of this step reads NaN (a diverged run: the trainer exits with code 80).")
    # Communication-layer faults, honoured inside Comm (loco_trainer.faults.CommFaults); see docs/fault-detection.md.
    hang_before_collective: int | None = Field(
        None, ge=0, description="Stop forever before entering collective number N of the algorithm's Comm (a hang-noncomm fault)."
    )
    collective_delay_s: float = Field(
        0.0, ge=0.0, le=3600.0, description="Sleep this long before entering every collective (a straggler: slow-noncomm)."
    )
    link_delay: LinkDelay | None = Field(
        None, description="Add a delay to every transfer to one peer rank (a slow link: slow-comm-link)."
    )
    hang_link: HangLink | None = Field(
        None,
        description="Hold every point-to-point send to one peer rank forever, from the faulty rank's collective "
        "number 'afterCollective' on (a stalled connection: hang-comm blaming that pair); other transfers still progress.",
    )


# ------------------------------------------------------------------------------- whole config


class TrainerConfig(Model):
    """Everything a trainer process needs besides its per-pod environment (see RuntimeEnv)."""

    format_version: int = Field(CONFIG_FORMAT_VERSION, description="Version of this config format.")
    job_name: str = Field("local", description="Name of the TrainingJob (labels metrics and checkpoints).")
    namespace: str = Field("default", description="Namespace of the TrainingJob.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    fault_injection: FaultInjection | None = Field(None, description="Test/demo fault injection (off by default).")
    probes: ProbeSettings = Field(default_factory=ProbeSettings,
                                  description="How the communication layer probes connections (from spec.faultDetection).")

    @model_validator(mode="after")
    def _seq_fits_model(self) -> "TrainerConfig":
        if self.model.name == "gpt" and self.training.seq_len > self.model.gpt.block_size:
            raise ValueError(
                f"training.seqLen ({self.training.seq_len}) exceeds model.gpt.blockSize ({self.model.gpt.block_size}); "
                f"lower seqLen or raise blockSize"
            )
        return self


# --------------------------------------------------------------------------- per-pod runtime env


class EnvVar(str, Enum):
    """Environment variables the operator sets on every worker container (the per-pod contract)."""

    CONFIG = "LOCO_CONFIG"  # path of the TrainerConfig JSON (default /etc/loco/config.json)
    JOB_NAME = "LOCO_JOB_NAME"
    JOB_UID = "LOCO_JOB_UID"  # the TrainingJob's uid: fences its checkpoint directory against an earlier job's writers
    NAMESPACE = "LOCO_NAMESPACE"
    REPLICA_INDEX = "LOCO_REPLICA_INDEX"  # this pod's index among the workers, 0-based
    NUM_REPLICAS = "LOCO_NUM_REPLICAS"  # workers (pods) in this epoch
    NPROC_PER_WORKER = "LOCO_NPROC_PER_WORKER"  # processes per pod
    EPOCH = "LOCO_EPOCH"  # membership epoch (bumped on every restart/resize)
    RESTART_COUNT = "LOCO_RESTART_COUNT"  # restarts of the job so far
    RESUME_FROM = "LOCO_RESUME_FROM"  # last committed checkpoint known to the operator ("" for none)
    # another job's checkpoint to start from while this job's directory holds none (checkpoint.initFrom,
    # resolved by the operator); unlike LOCO_RESUME_FROM a hint that fails is an error, not a fresh start
    INIT_FROM = "LOCO_INIT_FROM"
    MASTER_ADDR = "MASTER_ADDR"  # rendezvous host: replica 0's stable DNS name
    MASTER_PORT = "MASTER_PORT"
    STATUS_PORT = "LOCO_STATUS_PORT"  # port of the progress endpoint (/status, /metrics)
    # "1": live membership changes (docs/elastic.md, "Live resizing"): at every outer-step boundary the
    # worker checks for a membership update (POST /membership) and, when a peer is lost, waits for one
    # instead of failing; set for elastic jobs of the DiLoCo family with one process per pod
    LIVE_RESIZE = "LOCO_LIVE_RESIZE"
    # "1": this pod joins a running job (a live grow): it takes the step, data position, global
    # parameters and outer state from the group's rank 0 instead of a checkpoint
    JOIN = "LOCO_JOIN"
    # seconds any one collective may take before it fails (the process group's timeout); live-resize
    # jobs get 120 so a survivor stuck in a collective with a vanished peer recovers in bounded time
    COLLECTIVE_TIMEOUT_S = "LOCO_COLLECTIVE_TIMEOUT_S"
    POD_NAME = "POD_NAME"
    POD_IP = "POD_IP"
    NODE_NAME = "NODE_NAME"
    # a file holding the job's membership token (a Secret the operator mounts): POST /membership needs it
    # as a bearer token, and is refused without one (docs/security.md)
    MEMBERSHIP_TOKEN_FILE = "LOCO_MEMBERSHIP_TOKEN_FILE"
    # Embedded cluster only (see docs/local-cluster.md): the local kubelet runs pods as processes on
    # one host, so it emulates the container filesystem root and cluster DNS for them.
    LOCAL_ROOT = "LOCO_LOCAL_ROOT"  # the pod's emulated container root (volumes are mounted under it)
    LOCAL_HOSTS = "LOCO_LOCAL_HOSTS"  # a hosts file (one "IP NAME..." per line) standing in for cluster DNS


DEFAULT_CONFIG_PATH = "/etc/loco/config.json"
#: How the trainer image starts a worker (the container command unless spec.template.command overrides it).
TRAINER_COMMAND = ("python", "-m", "loco_trainer", "--config", DEFAULT_CONFIG_PATH)
DEFAULT_STATUS_PORT = 8080
TERMINATION_MESSAGE_PATH = "/dev/termination-log"


class RuntimeEnv(Model):
    """The per-pod values, read from the environment (see :class:`EnvVar`)."""

    job_name: str = "local"
    job_uid: str = ""
    namespace: str = "default"
    replica_index: int = 0
    num_replicas: int = 1
    nproc_per_worker: int = 1
    epoch: int = 0
    restart_count: int = 0
    resume_from: str = ""
    init_from: str = ""
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    status_port: int = DEFAULT_STATUS_PORT
    live_resize: bool = False
    join: bool = False
    collective_timeout_s: float = Field(600.0, gt=0)
    pod_name: str = ""
    pod_ip: str = ""
    node_name: str = ""
    membership_token_file: str = ""
    local_root: str = ""
    local_hosts: str = ""

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> "RuntimeEnv":
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for member in EnvVar:
            if member is EnvVar.CONFIG:
                continue
            if member.value in env and env[member.value] != "":
                values[member.name.lower()] = env[member.value]
        if EnvVar.RESUME_FROM.value in env:
            values["resume_from"] = env[EnvVar.RESUME_FROM.value]
        return cls.model_validate(values)

    @property
    def world_size(self) -> int:
        return self.num_replicas * self.nproc_per_worker

    def resolve_path(self, path: str) -> str:
        """A container path as this process sees it: under the emulated root in the embedded
        cluster (``LOCO_LOCAL_ROOT``), unchanged in a real container."""
        if self.local_root and os.path.isabs(path):
            return os.path.join(self.local_root, path.lstrip("/"))
        return path

    def container_path(self, path: str) -> str:
        """The inverse of :meth:`resolve_path`: how a container sees a path this process uses
        (what reports and the operator's status show)."""
        if self.local_root:
            root = os.path.normpath(self.local_root)
            normalized = os.path.normpath(path)
            if normalized == root:
                return "/"
            if normalized.startswith(root + os.sep):
                return "/" + os.path.relpath(normalized, root)
        return path
