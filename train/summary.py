"""RunSummary: what a finished (or stopped) training job reports, and its `summary.json`.

One typed record for every reader: the launcher's printout, the Slurm job's requeue decision, the per-rank
entry point's exit code and the sweep table. The file stays one flat JSON object (the final evaluation
scalars beside the fixed fields), so tables and scripts that read keys such as `acc_measure` keep working.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from common.files import write_json_atomic


@dataclasses.dataclass
class RunSummary:
    run_dir: str
    tensorboard_dir: str
    checkpoint: str | None  # the newest complete checkpoint folder
    step: int
    resumed_from_step: int
    last_train_loss: float  # the last logged (rank-averaged) training loss
    stop_signal: str  # "" when training reached max_steps or stop_at_step; else e.g. "SIGUSR2"
    world_size: int
    started_at: float  # wall times (time.time())
    first_step_at: float
    train_seconds: float
    total_seconds: float
    skipped_steps: int = 0  # steps without an update (non-finite loss or gradient)
    rows: list[str] = dataclasses.field(default_factory=list)  # the evaluation table, as printed
    best: dict[str, float] = dataclasses.field(default_factory=dict)  # best of each evaluation scalar so far
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # final evaluation scalars (flattened keys)

    def to_json(self) -> dict[str, Any]:
        fixed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "metrics"}
        clash = sorted(set(fixed) & set(self.metrics))
        if clash:
            raise ValueError(f"evaluation scalars {clash} would overwrite summary fields of the same name")
        return {**fixed, **self.metrics}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "RunSummary":
        names = {f.name for f in dataclasses.fields(cls)} - {"metrics"}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(raw))
        if missing:
            raise ValueError(f"summary without {missing}: not a summary.json written by train.main.run")
        return cls(
            **{k: v for k, v in raw.items() if k in names}, metrics={k: v for k, v in raw.items() if k not in names}
        )

    def write(self, path: str) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def read(cls, path: str) -> "RunSummary":
        with open(path) as f:
            return cls.from_json(json.load(f))
