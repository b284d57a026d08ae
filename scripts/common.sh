# shellcheck shell=bash
# Shared logic of the stage launchers in scripts/ (sourced, never run): flag parsing, the launcher
# command line (deepspeed or torchrun), the run directory and its train.log.
#
# A launcher script is
#     source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#     saferlhf_launch COMMAND [--flag=config.key ...] -- "$@"
# where COMMAND is a `saferlhf` command and each --flag=config.key gives that stage a path flag:
# `--flag VALUE` becomes the override `config.key=VALUE`; a key ending in [] makes the flag
# repeatable and its values a list (`--data a --data b` -> `data.train=["a", "b"]`).
#
# Environment: DEEPSPEED / TORCHRUN name the launcher executables (default: deepspeed, torchrun),
# SAFERLHF_LAUNCHER the default of --launcher, PYTHON the interpreter that resolves the preset
# (default: the python beside the launcher, else .venv/bin/python, else python3).

set -euo pipefail

SAFERLHF_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SAFERLHF_DEFAULT_CONFIG=configs/llama-7b-8xgpu.yaml

_prog=${0##*/}

_die() {
  printf '%s: %s\n' "$_prog" "$1" >&2
  printf "Try '%s --help'.\n" "$_prog" >&2
  exit 2
}

# POSIX shell quoting of one word (readable by sh, bash and Python's shlex).
_quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    local q="'\\''"
    printf "'%s'" "${1//\'/$q}"
  fi
}

_join_quoted() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(_quote "$word")"; done
  printf '%s\n' "$out"
}

# A value as YAML, for a key=value override: plain when YAML would read it back as the same
# string, else double-quoted (numbers, true/no/null, '#', ': ' ... would change type or meaning).
_yaml_string() {
  local v=$1 lower
  local plain='^[A-Za-z_./][A-Za-z0-9_./@+-]*$' special='^(y|n|yes|no|true|false|on|off|null|\.inf|\.nan|\.[0-9].*)$'
  lower=$(printf '%s' "$v" | tr '[:upper:]' '[:lower:]')
  if [[ $v =~ $plain ]] && [[ ! $lower =~ $special ]]; then
    printf '%s' "$v"
  else
    _yaml_quoted "$v"
  fi
}

_yaml_quoted() {
  local v=${1//\\/\\\\}
  printf '"%s"' "${v//\"/\\\"}"
}

_is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

_usage() {
  local command=$1; shift
  cat <<EOF
usage: $_prog [flags] [key=value ...] [-- more saferlhf $command arguments]

Launch \`saferlhf $command\` under the deepspeed launcher (or torchrun). The output directory is
created and the whole log (stdout and stderr) is appended to OUTPUT_DIR/train.log; the script
exits with the trainer's status. \`saferlhf $command --help\` lists every config key.

flags:
  --config FILE          preset YAML or shipped preset name (default: $SAFERLHF_DEFAULT_CONFIG)
  --output-dir DIR       run directory, run.out_dir=DIR (default: the preset's run.out_dir,
                         else runs/<stage>)
  --model PATH           model.name_or_path=PATH
EOF
  local spec flag key
  for spec in "$@"; do
    flag=${spec%%=*}; key=${spec#*=}
    if [[ $key == *"[]" ]]; then
      printf '  %-22s %s\n' "$flag SPEC" "${key%\[\]}=[...], repeatable (NAME[:PROPORTION[:PATH]])"
    else
      printf '  %-22s %s\n' "$flag PATH" "$key=PATH"
    fi
  done
  cat <<EOF
  --zero-stage {0,1,2,3} deepspeed.zero_stage
  --offload {none,optimizer,parameter,all}
                         deepspeed.offload: optimizer states (ZeRO >= 1), or parameters and
                         optimizer states (parameter = all, ZeRO-3) in CPU memory
  --launcher {deepspeed,torchrun}
                         default: \$SAFERLHF_LAUNCHER, else deepspeed
  --hostfile FILE        deepspeed: several nodes, lines of "HOSTNAME slots=GPUS"
  --num-nodes N          deepspeed: the first N hosts of the hostfile
  --num-gpus N           GPUs (processes) per node; torchrun default: 1
  --include SPEC         deepspeed --include, e.g. "node-1:0,1@node-2"
  --exclude SPEC         deepspeed --exclude
  --master-addr ADDR     address of the first node (deepspeed infers it when omitted)
  --master-port N        rendezvous port (default: a free port on this machine)
  --dry-run              print the command line and exit without running it
  -h, --help             this help

Any other key=value argument, and everything after --, is passed to \`saferlhf $command\`
(config overrides such as optim.lr=1e-5, or --resume).
EOF
}

# Print the preset's resolved run.out_dir for STAGE (or runs/<stage>); exit 2 when the preset does
# not resolve, 3 when saferlhf does not import.
_RESOLVE_PY='
import sys
try:
    from saferlhf.config import load_preset, resolve_preset
except ImportError as e:
    print(f"cannot import saferlhf ({e})", file=sys.stderr)
    sys.exit(3)
config, stage = sys.argv[1:3]
try:
    run = load_preset(resolve_preset(config), stage).get("run") or {}
except Exception as e:
    print(e, file=sys.stderr)
    sys.exit(2)
print(run.get("out_dir") or f"runs/{stage}")
'

_FREE_PORT_PY='
import socket
with socket.socket() as s:
    s.bind(("", 0))
    print(s.getsockname()[1])
'

saferlhf_launch() {
  local command=$1; shift
  local -a path_specs=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do path_specs+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  path_specs=(--model=model.name_or_path "${path_specs[@]}")

  local config="" out_dir="" zero_stage="" offload="" launcher_kind=${SAFERLHF_LAUNCHER:-deepspeed}
  local hostfile="" num_nodes="" num_gpus="" include="" exclude="" master_addr="" master_port=""
  local dry_run=0 arg flag value spec
  local -a passthrough=() path_values=()   # path_values: "KEY<TAB>VALUE" in the order given

  while [ $# -gt 0 ]; do
    arg=$1
    case $arg in
      --) shift; passthrough+=("$@"); break ;;
      -h|--help) _usage "$command" "${path_specs[@]:1}"; exit 0 ;;
      --dry-run) dry_run=1; shift; continue ;;
      --*=*) flag=${arg%%=*}; value=${arg#*=} ;;
      -*) flag=$arg; value="" ;;
      *=*) passthrough+=("$arg"); shift; continue ;;
      *) _die "unexpected argument '$arg' (config overrides are key=value, flags start with --)" ;;
    esac
    case $flag in
      --config|--output-dir|--zero-stage|--offload|--launcher|--hostfile|--num-nodes|--num-gpus|\
      --include|--exclude|--master-addr|--master-port) spec="" ;;
      --dry-run|--help) _die "$flag takes no value" ;;
      *)
        spec=""
        local s
        for s in "${path_specs[@]}"; do
          if [ "${s%%=*}" = "$flag" ]; then spec=${s#*=}; break; fi
        done
        [ -n "$spec" ] || _die "unknown flag '$flag'"
        ;;
    esac
    if [[ $arg == --*=* ]]; then
      shift
    else
      if [ $# -lt 2 ] || [[ $2 == --* ]]; then _die "$flag needs a value"; fi
      value=$2; shift 2
    fi
    [ -n "$value" ] || _die "$flag needs a value"
    case $flag in
      --config) config=$value ;;
      --output-dir) out_dir=$value ;;
      --zero-stage)
        [[ $value =~ ^[0-3]$ ]] || _die "--zero-stage must be 0, 1, 2 or 3, got '$value'"
        zero_stage=$value ;;
      --offload)
        case $value in
          none|optimizer|all) offload=$value ;;
          parameter) offload=all ;;  # the project offloads parameters only together with the optimizer
          *) _die "--offload must be none, optimizer, parameter or all, got '$value'" ;;
        esac ;;
      --launcher)
        case $value in deepspeed|torchrun) launcher_kind=$value ;;
          *) _die "--launcher must be deepspeed or torchrun, got '$value'" ;; esac ;;
      --hostfile) [ -f "$value" ] || _die "--hostfile: no such file: $value"; hostfile=$value ;;
      --num-nodes)
        _is_count "$value" || _die "--num-nodes must be a positive integer, got '$value'"
        num_nodes=$value ;;
      --num-gpus)
        _is_count "$value" || _die "--num-gpus must be a positive integer, got '$value'"
        num_gpus=$value ;;
      --include) include=$value ;;
      --exclude) exclude=$value ;;
      --master-addr) master_addr=$value ;;
      --master-port)
        if ! [[ $value =~ ^[1-9][0-9]*$ ]] || [ "$value" -gt 65535 ]; then
          _die "--master-port must be a port number (1-65535), got '$value'"
        fi
        master_port=$value ;;
      *) path_values+=("$spec"$'\t'"$value") ;;
    esac
  done

  case $launcher_kind in deepspeed|torchrun) ;;
    *) _die "SAFERLHF_LAUNCHER must be deepspeed or torchrun, got '$launcher_kind'" ;; esac
  if [ -n "$include" ] && [ -n "$exclude" ]; then _die "--include and --exclude exclude each other"; fi
  if [ -n "$include$exclude" ] && [ -n "$num_nodes$num_gpus" ]; then
    _die "--include/--exclude cannot be combined with --num-nodes/--num-gpus (a deepspeed rule)"
  fi
  if [ "$launcher_kind" = torchrun ]; then
    [ -z "$hostfile" ] || _die "--hostfile needs --launcher deepspeed"
    [ -z "$include$exclude" ] || _die "--include/--exclude need --launcher deepspeed"
    if [ -n "$num_nodes" ] && [ "$num_nodes" != 1 ]; then
      _die "--num-nodes: the torchrun launcher runs one node here; use --launcher deepspeed --hostfile"
    fi
  fi
  if [ -n "$zero_stage" ] && [ -n "$offload" ]; then
    if [ "$offload" = optimizer ] && [ "$zero_stage" = 0 ]; then
      _die "--offload optimizer needs --zero-stage 1, 2 or 3"
    fi
    if [ "$offload" = all ] && [ "$zero_stage" != 3 ]; then _die "--offload parameter/all needs --zero-stage 3"; fi
  fi

  local -a launcher
  if [ "$launcher_kind" = deepspeed ]; then
    read -r -a launcher <<<"${DEEPSPEED:-deepspeed}"
  else
    read -r -a launcher <<<"${TORCHRUN:-torchrun}"
  fi

  local python=${PYTHON:-} found
  if [ -z "$python" ]; then
    if found=$(command -v "${launcher[0]}") && [ -x "$(dirname "$found")/python" ]; then
      python=$(dirname "$found")/python
    elif [ -x "$SAFERLHF_REPO/.venv/bin/python" ]; then
      python=$SAFERLHF_REPO/.venv/bin/python
    else
      python=python3
    fi
  fi

  if [ -z "$config" ]; then
    config=$SAFERLHF_DEFAULT_CONFIG
    [ -f "$config" ] || config=$SAFERLHF_REPO/$SAFERLHF_DEFAULT_CONFIG
  fi
  local preset_out status=0
  preset_out=$("$python" -c "$_RESOLVE_PY" "$config" "${command//-/_}" 2>&1) || status=$?
  case $status in
    0) ;;
    2) _die "--config: $preset_out" ;;
    *) printf '%s: %s (set PYTHON to the interpreter of the environment saferlhf is installed in)\n' \
         "$_prog" "$preset_out" >&2; exit 1 ;;
  esac

  # A run.out_dir=... override is the output directory too (overrides come last, so it wins); its
  # value is YAML text, passed on as written and unquoted for the directory of the log.
  local -a overrides=()
  local out_yaml=""
  for arg in "${passthrough[@]+"${passthrough[@]}"}"; do
    if [[ $arg == run.out_dir=* ]]; then out_yaml=${arg#run.out_dir=}; else overrides+=("$arg"); fi
  done
  if [ -n "$out_yaml" ]; then
    out_dir=$out_yaml
    if [[ $out_dir =~ ^\"(.*)\"$ || $out_dir =~ ^\'(.*)\'$ ]]; then out_dir=${BASH_REMATCH[1]}; fi
  else
    [ -n "$out_dir" ] || out_dir=$preset_out
    out_yaml=$(_yaml_string "$out_dir")
  fi

  local -a stage_args=(--config "$config" "run.out_dir=$out_yaml")
  [ -z "$zero_stage" ] || stage_args+=("deepspeed.zero_stage=$zero_stage")
  [ -z "$offload" ] || stage_args+=("deepspeed.offload=$offload")
  local key list item
  for spec in "${path_specs[@]}"; do   # one override per path flag given, last value (or all) wins
    key=${spec#*=}; list=""; value=""
    for item in "${path_values[@]+"${path_values[@]}"}"; do
      [ "${item%%$'\t'*}" = "$key" ] || continue
      value=${item#*$'\t'}
      list+="${list:+, }$(_yaml_quoted "$value")"
    done
    [ -n "$value" ] || continue
    if [[ $key == *"[]" ]]; then
      stage_args+=("${key%\[\]}=[$list]")
    else
      stage_args+=("$key=$(_yaml_string "$value")")
    fi
  done
  stage_args+=("${overrides[@]+"${overrides[@]}"}")

  [ -n "$master_port" ] || master_port=$("$python" -c "$_FREE_PORT_PY")

  local -a cmd=("${launcher[@]}")
  if [ "$launcher_kind" = deepspeed ]; then
    [ -z "$hostfile" ] || cmd+=(--hostfile "$hostfile")
    [ -z "$include" ] || cmd+=(--include "$include")
    [ -z "$exclude" ] || cmd+=(--exclude "$exclude")
    [ -z "$num_nodes" ] || cmd+=(--num_nodes "$num_nodes")
    [ -z "$num_gpus" ] || cmd+=(--num_gpus "$num_gpus")
    [ -z "$master_addr" ] || cmd+=(--master_addr "$master_addr")
    # The ranks read LOCAL_RANK from the environment, so no --local_rank argument is needed.
    cmd+=(--master_port "$master_port" --no_local_rank --module saferlhf "$command" "${stage_args[@]}")
  else
    cmd+=(--nproc_per_node "${num_gpus:-1}")
    [ -z "$master_addr" ] || cmd+=(--master_addr "$master_addr")
    cmd+=(--master_port "$master_port" -m saferlhf "$command" "${stage_args[@]}")
  fi

  local line
  line=$(_join_quoted "${cmd[@]}")
  if [ "$dry_run" = 1 ]; then
    printf '%s\n' "$line"
    exit 0
  fi

  mkdir -p "$out_dir"
  local log=$out_dir/train.log
  printf '# %s  %s\n%s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$(hostname 2>/dev/null || true)" "$line" >>"$log"
  printf '%s: logging to %s\n' "$_prog" "$log" >&2
  # Unbuffered ranks: stdout and stderr reach train.log in the order they were written.
  export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
  status=0
  "${cmd[@]}" 2>&1 | tee -a "$log" || status=$?
  if [ "$status" != 0 ]; then
    printf '%s: saferlhf %s exited with status %s\n' "$_prog" "$command" "$status" | tee -a "$log" >&2
  fi
  exit "$status"
}
