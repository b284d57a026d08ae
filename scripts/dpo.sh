#!/usr/bin/env bash
# The DPO baseline (saferlhf dpo) under the deepspeed launcher.
# Usage: scripts/dpo.sh [flags] [key=value ...] [-- saferlhf arguments]; --help lists the flags.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
saferlhf_launch dpo '--data=data.train[]' '--eval-data=data.eval[]' -- "$@"
