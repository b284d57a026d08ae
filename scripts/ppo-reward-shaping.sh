#!/usr/bin/env bash
# The reward-shaping baseline (saferlhf ppo-rs): PPO on R - lambda*C with a fixed lambda.
# Usage: scripts/ppo-reward-shaping.sh [flags] [key=value ...] [-- saferlhf arguments]; --help lists the flags.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
saferlhf_launch ppo-rs '--reward-model=ppo.reward_model' '--cost-model=ppo.cost_model' \
  '--data=data.train[]' '--ptx-data=data.ptx[]' -- "$@"
