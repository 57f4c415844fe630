"""What an evaluation leaves behind: `<run_dir>/eval_<set>.json` per set and the printed table rows."""

from __future__ import annotations

import os
import time

from train.evaluate.protocols import protocol_rows
from train.evaluate.sets import EvalSet
from common.files import write_json_atomic


def write_eval_files(
    run_dir: str, sets: list[EvalSet], per_set: list[dict[str, float]], step: int, checkpoint: str | None
) -> list[str]:
    """Write eval_<set>.json for every set (its scalars, protocol, row) and return all the rows."""
    rows: list[str] = []
    for eval_set, own in zip(sets, per_set):
        set_rows = protocol_rows(eval_set, own)
        rows += set_rows
        write_json_atomic(
            os.path.join(run_dir, f"eval_{eval_set.name}.json"),
            {
                "set": eval_set.name,
                "root": os.path.abspath(eval_set.root),
                "split": eval_set.split,
                "protocol": eval_set.protocol,
                "ks": list(eval_set.ks),
                "gallery_split": eval_set.gallery_split,
                "step": step,
                "checkpoint": checkpoint,
                "written_at": time.time(),
                "metrics": own,
                "rows": set_rows,
            },
        )
    return rows
