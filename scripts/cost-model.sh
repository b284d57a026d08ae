#!/usr/bin/env bash
# The cost model, harmlessness (saferlhf cm), under the deepspeed launcher.
# Usage: scripts/cost-model.sh [flags] [key=value ...] [-- saferlhf arguments]; --help lists the flags.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
saferlhf_launch cm '--data=data.train[]' '--eval-data=data.eval[]' -- "$@"
