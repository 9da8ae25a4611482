# Shared by the benchmark scripts; sourced after `set -euo pipefail`.

# The command line every end-to-end script takes: `--out FILE` (or
# `--out=FILE`) sets OUT for the JSON results; `-h`/`--help` prints the
# calling script's header comment. Anything else is refused.
bench_args() {
  OUT=""
  case ${1:-} in
    "") ;;
    --out) OUT=${2:?--out needs a file name} ;;
    --out=*) OUT=${1#--out=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "$(basename "$0"): unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
}

# serve DIR: starts `$XENOD serve` on loopback for data directory DIR,
# logging to DIR.log, and returns once it listens. Its pid joins the
# caller's PIDS and is LAST_PID; DAEMON_ADDR is its NODE@ADDR. Uses WORK
# for a fifo.
serve() {
  local dir=$1 line
  mkfifo "$WORK/serve.fifo"
  XENOD_LOG=error "$XENOD" --data-dir "$dir" serve --listen 127.0.0.1:0 >"$WORK/serve.fifo" 2>"$dir.log" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  read -r line <"$WORK/serve.fifo"
  rm -f "$WORK/serve.fifo"
  DAEMON_ADDR=$(echo "$line" | awk '{print $4}')
}
