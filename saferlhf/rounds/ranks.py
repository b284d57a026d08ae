"""A round under a launcher: which rank runs which stage, and the file protocol that keeps them together.

The trainer stages train on every rank; rank 0 runs each other stage alone — in a child process, a
world of one, so that a vLLM engine does not join the launcher's process group — and the others wait
for the stage's ``DONE`` marker, or for ``STOPPED`` (rank 0's error, which every rank then raises).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from saferlhf.rounds.common import (
    DONE,
    STOPPED,
    TRAINER_STAGES,
    AwaitingAnnotation,
    RoundArgs,
    RoundError,
    _mark_done,
    _Round,
    _write_json,
)
from saferlhf.rounds.stages import STAGE_FUNCTIONS


def _quiet(line: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the round."""


@dataclass(frozen=True)
class _Ranks:
    """This process's place in a launched round (a world of one without a launcher)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls) -> _Ranks:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from saferlhf import distributed

        info = distributed.init_distributed()  # the trainer stages join this process group
        return cls(info.rank, info.world_size)

    def barrier(self) -> None:
        if self.world_size > 1:
            from saferlhf import distributed

            distributed.barrier()


def _run_stage(rnd: _Round, name: str, stage_dir: Path, ranks: _Ranks) -> dict:
    """Run a stage here; rank 0 writes its ``stats.json`` and ``DONE`` (or ``STOPPED`` when it fails).

    Rank 0 runs a stage of its own (not a trainer stage) of a launched round in a child process, a
    world of one: a vLLM engine started in a rank of the launcher's process group would join that
    group and wait for the other ranks."""
    start = time.perf_counter()
    alone = ranks.world_size > 1 and name not in TRAINER_STAGES  # rank 0's own stage; the others wait for it
    try:
        stats = _run_stage_in_child(rnd, name, stage_dir) if alone else STAGE_FUNCTIONS[name](rnd, stage_dir)
    except BaseException as e:
        if alone:
            _write_json(stage_dir / STOPPED, _error_record(e))
        raise
    if not ranks.main:
        return {}
    stats["seconds"] = round(time.perf_counter() - start, 3)
    _write_json(stage_dir / "stats.json", stats)
    _mark_done(stage_dir, stats["seconds"])
    return stats


CHILD_CALL = ".stage-call.json"  # what the child process runs, in the stage directory
CHILD_OUTCOME = ".stage-outcome.json"  # the child's stats, or its error


def _run_stage_in_child(rnd: _Round, name: str, stage_dir: Path) -> dict:
    """`_stage_child_main` in a fresh interpreter without the launcher's process-group variables;
    its error is raised here as the same exception type (so the same exit status)."""
    import subprocess
    import sys

    from saferlhf.distributed import child_env

    call = {"stage": name, "round_dir": str(rnd.dir), "args": asdict(rnd.args), "preset_path": str(rnd.preset_path),
            "sheet": None if rnd.sheet is None else str(rnd.sheet), "previous": rnd.previous,
            "previous_dir": None if rnd.previous_dir is None else str(rnd.previous_dir)}
    _write_json(stage_dir / CHILD_CALL, call)  # the stage directory was emptied: no outcome of an earlier call
    code = "import sys; from saferlhf.rounds.ranks import _stage_child_main; sys.exit(_stage_child_main(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(stage_dir / CHILD_CALL)], env=child_env())
    outcome_file = stage_dir / CHILD_OUTCOME
    if not outcome_file.is_file():
        raise RuntimeError(f"stage {name}: its process exited with status {proc.returncode} and no outcome "
                           "(see its output above)")
    outcome = json.loads(outcome_file.read_text(encoding="utf-8"))
    for leftover in (CHILD_CALL, CHILD_OUTCOME):
        (stage_dir / leftover).unlink(missing_ok=True)
    if "stats" in outcome:
        return outcome["stats"]
    raise _rebuild_error(outcome)


def _error_record(e: BaseException) -> dict:
    """A stage's error as another process reads it back (`_rebuild_error`, `_wait_for_stage`)."""
    return {"error": type(e).__name__, "message": str(e), "sheet": str(getattr(e, "sheet", "") or "")}


def _rebuild_error(info: dict) -> BaseException:
    """The exception a stage raised in another process, from its recorded type name and message."""
    from saferlhf.config import ConfigError
    from saferlhf.data.schema import DataError
    from saferlhf.evaluate.evaluate import EvalError
    from saferlhf.judge import JudgeError

    if info["error"] == "AwaitingAnnotation":
        return AwaitingAnnotation(info["message"], Path(info["sheet"]))
    known = {"RoundError": RoundError, "ConfigError": ConfigError, "DataError": DataError,
             "AnnotationError": DataError, "EvalError": EvalError, "JudgeError": JudgeError}
    if info["error"] not in known:
        return RuntimeError(f"{info['error']}: {info['message']}")
    return known[info["error"]](info["message"])


def _stage_child_main(call_file: str) -> int:
    """Run one stage as `_run_stage_in_child` asked, writing its stats or its error next to the call."""
    call = json.loads(Path(call_file).read_text(encoding="utf-8"))
    stage_dir = Path(call_file).parent
    rnd = _Round(Path(call["round_dir"]), RoundArgs(**call["args"]), Path(call["preset_path"]),
                 None if call["sheet"] is None else Path(call["sheet"]), lambda line: print(line, flush=True),
                 call["previous"], None if call["previous_dir"] is None else Path(call["previous_dir"]))
    try:
        stats = STAGE_FUNCTIONS[call["stage"]](rnd, stage_dir)
    except Exception as e:
        _write_json(stage_dir / CHILD_OUTCOME, _error_record(e))
        if not isinstance(e, (RoundError, AwaitingAnnotation, ValueError)):
            raise  # the traceback of an unexpected failure, in the round's log
        return 1
    _write_json(stage_dir / CHILD_OUTCOME, {"stats": stats})
    return 0


def _wait_for_stage(stage_dir: Path, poll: float = 1.0) -> dict:
    """Wait (without a deadline: the launcher stops every rank when rank 0 dies) for rank 0 to finish
    a stage it runs alone; raise rank 0's error when it wrote ``STOPPED``."""
    while not (stage_dir / DONE).is_file():
        stopped = stage_dir / STOPPED
        if stopped.is_file():
            try:
                info = json.loads(stopped.read_text(encoding="utf-8"))
            except json.JSONDecodeError:  # being written
                time.sleep(poll)
                continue
            message = f"rank 0 stopped in stage {stage_dir.name}: {info['message']}"
            if info["error"] == "AwaitingAnnotation":
                raise AwaitingAnnotation(info["message"], Path(info["sheet"]))
            raise RoundError(message)
        time.sleep(poll)
    return {}

