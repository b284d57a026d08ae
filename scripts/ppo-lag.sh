#!/usr/bin/env bash
# Safe RLHF: PPO-Lagrangian with a reward and a cost model (saferlhf ppo-lag).
# Usage: scripts/ppo-lag.sh [flags] [key=value ...] [-- saferlhf arguments]; --help lists the flags.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
saferlhf_launch ppo-lag '--reward-model=ppo.reward_model' '--cost-model=ppo.cost_model' \
  '--data=data.train[]' '--ptx-data=data.ptx[]' -- "$@"
