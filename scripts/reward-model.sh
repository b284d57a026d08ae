#!/usr/bin/env bash
# The reward model, helpfulness (saferlhf rm), under the deepspeed launcher.
# Usage: scripts/reward-model.sh [flags] [key=value ...] [-- saferlhf arguments]; --help lists the flags.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
saferlhf_launch rm '--data=data.train[]' '--eval-data=data.eval[]' -- "$@"
