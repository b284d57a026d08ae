#!/usr/bin/env bash
# One Safe RLHF round (saferlhf round) under the deepspeed launcher.
# Usage: scripts/round.sh [flags] [key=value ...] [-- saferlhf arguments]; --help lists the flags.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
saferlhf_launch round -- "$@"
