"""Flat keyword arguments -> the composed job configs (tests only; users go through the CLI or the parts)."""

from dataclasses import fields

from camkd.config import DataConfig, LossConfig, OptimConfig, RunConfig
from camkd.distill import DistillConfig
from camkd.job import Hooks
from camkd.train import TrainConfig, teacher_optim

_DATA = {f.name for f in fields(DataConfig)}
_OPTIM = {f.name for f in fields(OptimConfig)}
_RUN = {f.name for f in fields(RunConfig)}
_LOSS = {f.name for f in fields(LossConfig)}


def _split(kw: dict) -> tuple[dict, dict, dict, dict, dict]:
    kw = dict(kw)
    if "synthetic_samples" in kw:
        kw.setdefault("options", {})["num_samples"] = kw.pop("synthetic_samples")
    parts = [{k: kw.pop(k) for k in list(kw) if k in names} for names in (_DATA, _OPTIM, _RUN, _LOSS)]
    return (*parts, kw)


def train_cfg(**kw) -> TrainConfig:
    data, optim, run, _, rest = _split(kw)
    o = teacher_optim()
    for k, v in optim.items():
        setattr(o, k, v)
    return TrainConfig(data=DataConfig(**data), optim=o, run=RunConfig(**{"device": "cpu", **run}), **rest)


def distill_cfg(**kw) -> DistillConfig:
    data, optim, run, loss, rest = _split(kw)
    return DistillConfig(data=DataConfig(**{"dataset": None, **data}), optim=OptimConfig(**optim),
                         run=RunConfig(**{"device": "cpu", **run}), loss=LossConfig(**loss), **rest)


class StepRecorder(Hooks):
    """Hooks that keep every step's losses (read after the run, so the loop itself never syncs)."""

    def __init__(self, max_steps: int | None = None) -> None:
        super().__init__(max_steps=max_steps, on_step=self._record)
        self.steps: list[dict] = []

    def _record(self, epoch: int, losses: dict) -> None:
        self.steps.append({"epoch": epoch, **{k: v.detach().clone() for k, v in losses.items()}})

    def table(self) -> list[dict]:
        """Per step: epoch, total loss and each named loss, as floats."""
        out = []
        for s in self.steps:
            vals = {k: float(v) for k, v in s.items() if k != "epoch"}
            out.append({"epoch": s["epoch"], "loss": sum(vals.values()), **vals})
        return out
