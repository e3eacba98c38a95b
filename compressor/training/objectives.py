"""Fine-tuning losses: a small registry of objectives, each with its parameters.

An objective (`ObjectiveDef`) says whether it distils from the original model, whether it
trains on the model's task (`compressor.core.tasks.TaskSpec.loss`), how it combines the two
terms, and the parameters it reads (`Param`: name, default, range). `register_objective`
adds one; `FinetuneConfig`, the recipe schema and `--objective` read `objective_names()` and
`check_params`. The shipped ones:
  distill  KL on temperature-softened logits for a model with a head; MSE on the last hidden
           states for an encoder without one (masked to real tokens)      [temperature]
  task     the model's own task: causal LM, masked LM (15% of tokens masked), classification
  mix      mix_weight * distill + (1 - mix_weight) * task                 [temperature, mix_weight]
`build_objective` resolves one for a student (and teacher) and raises a one-line `DlncError`
when it cannot apply (no teacher, no head, no labels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressor.core.tasks import MLM_PROBABILITY, TaskSpec, logits_of, task_spec, token_mask
from compressor.errors import DlncError

__all__ = [
    "LossParts",
    "Objective",
    "ObjectiveDef",
    "Param",
    "build_objective",
    "check_params",
    "get_objective",
    "hidden_mse",
    "kl_logits",
    "objective_names",
    "register_objective",
    "unregister_objective",
]

Parts = Mapping[str, torch.Tensor]  # the loss terms of one batch: "distill", "task"
Values = Mapping[str, float]  # parameter values by name


@dataclass(frozen=True)
class Param:
    """A number an objective reads: its default and its range (`low` excluded if `low_open`)."""

    name: str
    default: float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    help: str = ""

    def check(self, value: float) -> float:
        """`value` if it is in range; a `DlncError` naming the parameter otherwise."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DlncError(f"`{self.name}` must be a number, got {value!r}")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if below or (self.high is not None and value > self.high):
            raise DlncError(f"`{self.name}` must be {self._range()}, got {value}")
        return float(value)

    def _range(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"<= {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class ObjectiveDef:
    """One registered objective: which terms it needs and how it combines them."""

    name: str
    uses_teacher: bool  # needs the "distill" term (and a teacher)
    uses_task: bool  # needs the "task" term (and a scorable task)
    combine: Callable[[Parts, Values], torch.Tensor]  # (terms, params) -> the loss
    describe: Callable[[str, str, Values], str]  # (distillation, task, params) -> words
    params: tuple[Param, ...] = ()  # the parameters it reads


_OBJECTIVES: dict[str, ObjectiveDef] = {}


def register_objective(definition: ObjectiveDef) -> ObjectiveDef:
    """Add an objective; its name and each parameter's name must not clash with another's."""
    if definition.name in _OBJECTIVES:
        raise ValueError(f"objective {definition.name!r} is already registered")
    known = _params()
    for p in definition.params:
        if p.name in known and known[p.name] != p:
            raise ValueError(f"parameter {p.name!r} is already registered differently")
    _OBJECTIVES[definition.name] = definition
    return definition


def unregister_objective(name: str) -> None:
    """Remove an objective (and the parameters only it read)."""
    _OBJECTIVES.pop(name, None)


def objective_names() -> tuple[str, ...]:
    """The registered objectives, in registration order."""
    return tuple(_OBJECTIVES)


def get_objective(name: str) -> ObjectiveDef:
    """The registered objective `name`; a `DlncError` listing the others if there is none."""
    if name not in _OBJECTIVES:
        raise DlncError(f"`objective` must be one of {', '.join(_OBJECTIVES)}, got {name!r}")
    return _OBJECTIVES[name]


def _params() -> dict[str, Param]:
    return {p.name: p for d in _OBJECTIVES.values() for p in d.params}


def check_params(values: Values) -> dict[str, float]:
    """Every registered parameter: its value in `values` (range-checked), else its default.
    A name no objective reads is a `DlncError`."""
    known = _params()
    for name in values:
        if name not in known:
            raise DlncError(
                f"`objective_params`: unknown parameter {name!r} (known: {', '.join(known)})"
            )
    return {n: p.check(values[n]) if n in values else p.default for n, p in known.items()}


def kl_logits(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) on softened logits, times T^2, averaged over real tokens (or rows
    for [batch, classes] logits)."""
    t = temperature
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * t * t
    if mask is None or kl.ndim == 1:
        return kl.mean()
    return kl[mask].mean()


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of hidden states over real tokens (mean over features too)."""
    diff = (student.float() - teacher.float())[mask]
    return diff.pow(2).mean()


@dataclass
class LossParts:
    """One batch's loss and what it is made of (`rows`: the batch's samples)."""

    loss: torch.Tensor
    parts: dict[str, float]
    rows: int


@dataclass
class Objective:
    """An objective resolved for a student: its definition, the student's task, which outputs
    are distilled and every parameter's value."""

    definition: ObjectiveDef
    spec: TaskSpec  # the student's task
    distill_on: str | None  # "logits" | "hidden" | None
    params: dict[str, float]  # every registered parameter (`check_params`)
    mlm_probability: float = MLM_PROBABILITY

    @property
    def kind(self) -> str:
        return self.definition.name

    @property
    def task(self) -> str | None:
        return self.spec.task

    @property
    def temperature(self) -> float:
        return self.params["temperature"]

    @property
    def uses_teacher(self) -> bool:
        return self.definition.uses_teacher

    @property
    def uses_task(self) -> bool:
        return self.definition.uses_task

    def describe(self) -> str:
        distill = {
            "logits": f"KL on logits (T={self.temperature:g})",
            "hidden": "MSE on the last hidden states",
        }.get(self.distill_on or "", "")
        task = (self.task or "").replace("_", " ")
        return self.definition.describe(distill, task, self.params)

    def __call__(
        self,
        student: nn.Module,
        batch: Mapping[str, torch.Tensor],
        teacher: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> LossParts:
        """Forward the student (with gradients) and the teacher (without) and combine the terms."""
        if self.uses_task:
            batch = self.spec.prepare(batch, generator, self.mlm_probability)
        inputs = self.spec.inputs(batch)
        s_out = student(**inputs)
        parts: dict[str, torch.Tensor] = {}
        if self.uses_teacher:
            with torch.no_grad():
                t_out = teacher(**inputs)
            parts["distill"] = self._distill(s_out, t_out, batch)
        if self.uses_task:
            parts["task"] = self.spec.loss(logits_of(s_out), batch)
        loss = self.definition.combine(parts, self.params)
        return LossParts(loss, {k: float(v.detach()) for k, v in parts.items()}, _rows(batch))

    def _distill(self, s_out, t_out, batch) -> torch.Tensor:
        if self.distill_on == "logits":
            s_logits, t_logits = logits_of(s_out), logits_of(t_out)
            mask = token_mask(batch, s_logits) if s_logits.ndim == 3 else None
            return kl_logits(s_logits, t_logits, mask, self.temperature)
        hidden = s_out.last_hidden_state
        return hidden_mse(hidden, t_out.last_hidden_state, token_mask(batch, hidden))


def _rows(batch: Mapping[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))


def build_objective(
    kind: str,
    student: nn.Module,
    teacher: nn.Module | None = None,
    *,
    mask_token_id: int | None = None,
    has_labels: bool = False,
    **params: float,
) -> Objective:
    """The objective `kind` resolved for this student and teacher, with `params` (e.g.
    `temperature`, `mix_weight`) over the defaults; a `DlncError` when it cannot apply
    (distillation without a teacher, a task loss without a head or labels)."""
    definition = get_objective(kind)
    values = check_params(params)
    spec = task_spec(student, mask_token_id)
    distill_on = None
    if definition.uses_teacher:
        if teacher is None:
            raise DlncError(f"objective {kind!r} distils from the original model: give `teacher`")
        distill_on = _distill_target(spec, task_spec(teacher))
    if definition.uses_task:
        reason = spec.unscorable(has_labels)
        if reason is not None:
            no_head = spec.task in (None, "seq2seq_lm")  # distillation still applies
            hint = "; use `objective` distill with `teacher`" if no_head else ""
            raise DlncError(reason + hint)
    return Objective(definition, spec, distill_on, values)


def _distill_target(student: TaskSpec, teacher: TaskSpec) -> str:
    """Logits when both models have the same head, hidden states when neither has one."""
    if student.task == teacher.task:
        return "logits" if student.task is not None else "hidden"
    raise DlncError(
        f"cannot distil {student.model_name} from {teacher.model_name}: "
        "the teacher needs the same head"
    )


# ---- the shipped objectives ---------------------------------------------------------------

TEMPERATURE = Param("temperature", 2.0, low=0.0, low_open=True,
                    help="distillation temperature on logits")  # fmt: skip
MIX_WEIGHT = Param("mix_weight", 0.5, low=0.0, high=1.0,
                   help='"mix": weight of the distillation term (task gets 1 - it)')  # fmt: skip


def _mix(parts: Parts, p: Values) -> torch.Tensor:
    return p["mix_weight"] * parts["distill"] + (1 - p["mix_weight"]) * parts["task"]


def _describe_mix(distill: str, task: str, p: Values) -> str:
    w = p["mix_weight"]
    return f"mix: {w:g} x distillation ({distill}) + {1 - w:g} x {task}"


register_objective(ObjectiveDef(
    "distill", uses_teacher=True, uses_task=False, params=(TEMPERATURE,),
    combine=lambda parts, p: parts["distill"], describe=lambda d, t, p: f"distillation: {d}",
))  # fmt: skip
register_objective(ObjectiveDef(
    "task", uses_teacher=False, uses_task=True,
    combine=lambda parts, p: parts["task"], describe=lambda d, t, p: f"task loss: {t}",
))  # fmt: skip
register_objective(ObjectiveDef(
    "mix", uses_teacher=True, uses_task=True, params=(TEMPERATURE, MIX_WEIGHT),
    combine=_mix, describe=_describe_mix,
))  # fmt: skip
