#!/usr/bin/env bash
# The PPO baseline, reward model only (saferlhf ppo).
# Usage: scripts/ppo.sh [flags] [key=value ...] [-- saferlhf arguments]; --help lists the flags.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
saferlhf_launch ppo '--reward-model=ppo.reward_model' '--cost-model=ppo.cost_model' \
  '--data=data.train[]' '--ptx-data=data.ptx[]' -- "$@"
