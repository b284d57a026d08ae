#!/usr/bin/env bash
# Supervised fine-tuning (saferlhf sft) under the deepspeed launcher.
# Usage: scripts/sft.sh [flags] [key=value ...] [-- saferlhf arguments]; --help lists the flags.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
saferlhf_launch sft '--data=data.train[]' '--eval-data=data.eval[]' -- "$@"
