"""One Safe RLHF round, resumable stage by stage: ``saferlhf round``.

The paper's results come from three rounds. Each round red-teams the current policy, collects
decoupled helpfulness and harmlessness labels on its answers, retrains the reward and cost models on
all the preference data so far (from the SFT model), and runs PPO-Lagrangian again from the current
policy. `run_round` runs one round as seven stages, each writing into ``DIR/<stage>/``:

1. ``prompts``  — the red-team prompt set: the given prompt sets (dataset specs or files; default:
   the preset's PPO prompts), plus every prompt on which the previous round's policy was judged
   unsafe (its report's ``eval/responses.jsonl``: toy-world ground truth where there is one, else
   cost > 0). ``prompts.jsonl``; each row's ``prompt_source`` says where it came from.
2. ``samples``  — two sampled responses per prompt from the current policy (vLLM where it imports,
   else transformers ``generate``; ``rollout.backend`` chooses as in PPO). A pair whose responses are
   identical or empty is sampled once more; pairs still unusable are dropped and counted.
   ``pairs.jsonl``.
3. ``labels``   — PKU-SafeRLHF preference rows for the pairs, ``preferences.jsonl``, from one source:
   ``toy`` (the toy world's ground truth, see `toy_label`), ``judge`` (an LLM judge,
   `saferlhf.judge.JudgeClient`) or ``annotate`` (people: the stage exports ``annotation.jsonl`` +
   ``sheet.csv`` and stops with `AwaitingAnnotation`; run the same command again with ``sheet=`` the
   filled-in sheet). The toy world's pairs that differ on one axis only keep that axis's label, in
   ``reward_only.jsonl`` (equal risk) or ``cost_only.jsonl`` (equal helpfulness); pairs equal on both
   are skipped and counted. ``none``: no new preference data (a first round, on the preset's data;
   the samples stage then samples nothing either).
4. ``models``   — reward model (``models/rm``) and cost model (``models/cm``) retrained from the SFT
   model on the preset's base preference data + every earlier round's preference files + this
   round's (``reward_only.jsonl`` trains only the reward model, ``cost_only.jsonl`` only the cost model).
   Given ``reward_model`` and ``cost_model``, the round uses those and trains none.
5. ``ppo_lag``  — PPO-Lagrangian from the current policy with the new reward and cost models, on the
   round's prompts (``ppo_prompts="preset"``: the preset's). The stage directory is the PPO run
   directory; the new policy is ``ppo_lag/model``.
6. ``baselines`` — (optional, ``baselines``) PPO with the reward only and reward shaping (R − λ·C,
   fixed λ) from the same policy with the same models, prompts, seed and budget: the paper's
   comparison (``baselines/ppo``, ``baselines/ppo_rs``), each judged by the ground truth on held-out
   toy prompts.
7. ``eval``     — the new policy answers the round's prompts and is scored by the new reward and cost
   models (`saferlhf.evaluate.evaluate.evaluate`, ``eval/``); on toy-world prompts the ground truth
   of the policy before and after the round on held-out toy prompts
   (`saferlhf.evaluate.groundtruth.evaluate_policy`). These answers are the red-teaming of the new
   policy: the next round carries the prompts it answered unsafely over.

Under a launcher (torchrun or the deepspeed launcher, ``WORLD_SIZE`` > 1: ``scripts/round.sh
--num-gpus 8``, also over several nodes) every rank runs the round: the trainer stages (``models``,
``ppo_lag``) train on all ranks with DeepSpeed, the other stages run on rank 0 (in a child process,
a world of one, so that a vLLM engine does not join the launcher's group) while the other ranks
wait for the stage's ``DONE`` marker (or the ``STOPPED`` marker rank 0 writes when the stage fails or
waits for annotators, with the same error on every rank). The round directory must be on a filesystem
that every node sees (the trainer stages read the models the earlier stages wrote).

Every stage ends by writing ``stats.json`` and then the marker ``DONE`` (atomically, last). A run
skips the stages that are done and redoes the first one that is not from scratch (its directory is
emptied; the annotation export is kept), and every stage after it. The arguments of the first run
are kept in ``DIR/round.json``; running again with different ones is an error (``sheet`` and
``until`` may differ). At the end ``DIR/report.json`` and ``DIR/report.md`` hold the numbers of
every stage and, given the previous round's report, the round-over-round comparison.
``report.json`` lists every preference file used so far per model (``preference_data``: ``rm``,
``cm``; absolute paths), so the next round, given this report, trains on them too. A round run by
other means is recorded for the next one with `write_round_record`.

The package: ``common`` (arguments, errors, files, the context), ``stages``, ``report``, ``ranks``
(the rank protocol under a launcher), ``run`` (`run_round`) and ``cli`` (``saferlhf round``).
"""

from saferlhf.rounds.cli import main
from saferlhf.rounds.common import (
    DONE,
    EVAL_PROMPTS,
    LABEL_SOURCES,
    STAGES,
    STOPPED,
    AwaitingAnnotation,
    RoundArgs,
    RoundError,
    RoundResult,
)
from saferlhf.rounds.ranks import _wait_for_stage
from saferlhf.rounds.report import REPORT_METRICS, format_report, write_round_record
from saferlhf.rounds.run import run_round
from saferlhf.rounds.stages import toy_label

__all__ = ["DONE", "EVAL_PROMPTS", "LABEL_SOURCES", "REPORT_METRICS", "STAGES", "STOPPED", "AwaitingAnnotation",
           "RoundArgs", "RoundError", "RoundResult", "_wait_for_stage", "format_report", "main", "run_round",
           "toy_label", "write_round_record"]
