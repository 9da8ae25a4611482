#!/usr/bin/env bash
# End-to-end store benchmark: xenod against its peers, side by side in one run.
#
# Usage: benches/store-e2e.sh [--out FILE.json] [--rounds N] [--tools LIST]
#
#   --out FILE     also write every raw number (and the medians) as JSON
#   --rounds N     rounds to run (default: $ROUNDS or 5)
#   --tools LIST   comma-separated subset of: xenod,tar,ostree,casync
#                  (default: $TOOLS or all four; "tar" = tar|zstd -T1 and -T0)
#
# Environment: XENOD (binary, default target/release/xenod), ROUNDS, TOOLS,
#   XENOD_FIXTURES (fixture cache root), STEP_TIMEOUT (seconds per timed
#   command, default 900), TMPDIR (where the per-run work directory goes).
#
# Inputs are the three Debian trees of fixtures/build-debian-trees.sh (built
# or reused first): T1 (bookworm minbase), T2 (T1 + security/updates), O1
# (T1 + apache2). Each round, every tool (in a rotated order, so no tool
# always runs first) stores T1, then T2, then O1 into a fresh repository:
#
#   xenod    publish T1 --name template://bench/t1/1; publish T2 --name
#            template://bench/t2/1; overlay create --base template://bench/t1/1 O1
#   tar      tar -C T -cf - . | zstd -3 -T1 > T.tar.zst (and again with -T0),
#            one archive per tree: the no-dedup baseline
#   ostree   ostree init --mode=archive; commit -b t1/t2/o1 --tree=dir=T
#   casync   casync make --store=S T.caidx T, one store for all three
#
# Before each timed command the input tree is read once through tar (page
# cache warm) and `sync` flushes earlier writes, so no tool pays for another's
# writeback. Times are wall clock of the command alone; a tool's own fsyncs
# (ostree and xenod do them) are part of its time. Store size is `du -sb` of
# the whole repository directory (directory inodes included); the sum of
# regular-file bytes is reported too, since stores with many fan-out
# directories (casync: one per chunk-id prefix) pay ~4 KiB per directory.
#
# Markdown with medians and ratios goes to stdout; progress to stderr.
# Exit status: 0 when every selected tool ran; 1 when a tool failed. A missing
# xenod binary is reported and its rows skipped, not a failure.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"

ROUNDS=${ROUNDS:-5}
TOOLS=${TOOLS:-xenod,tar,ostree,casync}
OUT=""
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
XENOD=${XENOD:-target/release/xenod}
FIXDIR=${XENOD_FIXTURES:-/var/cache/xenod-fixtures}/debian

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --rounds=*) ROUNDS=${1#--rounds=}; shift ;;
    --tools) TOOLS=$2; shift 2 ;;
    --tools=*) TOOLS=${1#--tools=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "store-e2e: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "store-e2e: bad round count: $ROUNDS" >&2; exit 2; }
case $XENOD in /*) ;; *) XENOD=$ROOT/$XENOD ;; esac
if [ -n "$OUT" ]; then
  case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
fi

log() { printf '[store-e2e %s] %s\n' "$(date +%T)" "$*" >&2; }

# --- tool selection --------------------------------------------------------

declare -A WANT=() FAILED=()
IFS=, read -r -a _sel <<<"$TOOLS"
for t in "${_sel[@]}"; do
  case $t in
    xenod|tar|ostree|casync) WANT[$t]=1 ;;
    *) echo "store-e2e: unknown tool: $t (xenod,tar,ostree,casync)" >&2; exit 2 ;;
  esac
done

XENOD_NOTE=""
if [ -n "${WANT[xenod]:-}" ] && [ ! -x "$XENOD" ]; then
  XENOD_NOTE="xenod binary not found at $XENOD (build it with \`cargo build --release\` or set XENOD=...): xenod rows skipped."
  log "$XENOD_NOTE"
  unset 'WANT[xenod]'
fi
need() { command -v "$1" >/dev/null || { log "missing tool: $1 (see scripts/install-deps.sh)"; exit 1; }; }
need timeout; need du; need find; need awk; need sort
if [ -n "${WANT[tar]:-}" ]; then need tar; need zstd; fi
if [ -n "${WANT[ostree]:-}" ]; then need ostree; fi
if [ -n "${WANT[casync]:-}" ]; then need casync; fi

# --- fixtures and work directory -------------------------------------------

log "fixtures: $FIXDIR"
"$ROOT/fixtures/build-debian-trees.sh" "$FIXDIR" >&2
T1=$FIXDIR/T1 T2=$FIXDIR/T2 O1=$FIXDIR/O1

W=$(mktemp -d "${TMPDIR:-/tmp}/xenod-store-e2e.XXXXXX")
trap 'rm -rf --one-file-system "$W"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
RAW=$W/raw.tsv
: >"$RAW"

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW"; }  # tool metric round value

warm() { tar -C "$1" -cf - . | cat >/dev/null; }
du_b() { du -sb "$1" | cut -f1; }
file_b() { find "$1" -type f -printf '%s\n' | awk '{s += $1} END {printf "%d\n", s}'; }

ELAPSED=0
# timed CMD...: runs CMD under the step timeout; sets ELAPSED (seconds).
timed() {
  local t0 t1 rc=0
  t0=$EPOCHREALTIME
  timeout "$STEP_TIMEOUT" "$@" || rc=$?
  t1=$EPOCHREALTIME
  ELAPSED=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f", b - a}')
  return "$rc"
}

# Prepares the input of a timed step: page cache warm, earlier writes flushed.
prep() { warm "$1"; sync; }

TREES=(T1 T2 O1)
tree_dir() { case $1 in T1) echo "$T1" ;; T2) echo "$T2" ;; O1) echo "$O1" ;; esac; }

# OSTree stores only regular files, symlinks and directories: a device node,
# fifo or socket aborts the commit ("Not a regular file or symlink"), and in
# ostree 2022.7 --skip-list entries naming such files do not help (the type
# check comes before the filter); only their directory can be skipped. So the
# skip list holds the parent directory of every special file (for these trees
# exactly /dev: 8 char devices, 2 empty dirs, 5 symlinks; OSTree-based systems
# ship /dev empty and mount devtmpfs there anyway).
if [ -n "${WANT[ostree]:-}" ]; then
  for t in "${TREES[@]}"; do
    (cd "$(tree_dir "$t")" && find . \( -type c -o -type b -o -type p -o -type s \) -printf '%h\n') |
      sed 's|^\.||' | sort -u >"$W/$t.skip"
    if grep -qx '' "$W/$t.skip"; then log "$t has special files at its root: ostree cannot commit it"; exit 1; fi
    others=$(grep -v '^/dev$' "$W/$t.skip" || true)
    [ -z "$others" ] || log "note: ostree skips special-file dirs in $t besides /dev: $(echo "$others" | tr '\n' ' ')"
  done
fi

# --- per-tool rounds -------------------------------------------------------

json_field() {  # FILE FIELD -> value (string unquoted), empty if absent
  if command -v jq >/dev/null; then
    jq -r --arg f "$2" 'if type == "object" and has($f) then .[$f] | tostring else empty end' "$1" 2>/dev/null | head -n1
  else
    tr -d '\n' <"$1" | grep -o "\"$2\"[[:space:]]*:[[:space:]]*\(\"[^\"]*\"\|[0-9.eE+-]*\)" | head -n1 |
      sed 's/^[^:]*:[[:space:]]*//; s/^"//; s/"$//'
  fi
}

run_xenod() {
  local r=$1 D=$W/xenod.$r t out name rc
  "$XENOD" --data-dir "$D" key generate >"$W/xenod.key.out" 2>&1 || true
  local total=0
  for t in "${TREES[@]}"; do
    prep "$(tree_dir "$t")"
    out=$W/xenod.$t.json rc=0
    case $t in
      T1) name=template://bench/t1/1
          timed "$XENOD" --data-dir "$D" publish "$T1" --name "$name" --json >"$out" 2>"$out.err" || rc=$? ;;
      T2) name=template://bench/t2/1
          timed "$XENOD" --data-dir "$D" publish "$T2" --name "$name" --json >"$out" 2>"$out.err" || rc=$? ;;
      O1) timed "$XENOD" --data-dir "$D" overlay create --base template://bench/t1/1 "$O1" --json >"$out" 2>"$out.err" || rc=$? ;;
    esac
    if [ "$rc" -ne 0 ]; then
      log "xenod failed on $t (exit $rc):"; tail -n 20 "$out.err" >&2; tail -n 5 "$out" >&2
      return 1
    fi
    record xenod "time_$t" "$r" "$ELAPSED"
    total=$(awk -v a="$total" -v b="$ELAPSED" 'BEGIN {printf "%.4f", a + b}')
    local f v
    for f in bytes_in bytes_stored; do
      v=$(json_field "$out" "$f")
      if [[ $v =~ ^[0-9]+$ ]]; then record xenod "${f}_$t" "$r" "$v"
      else log "warning: xenod --json output for $t lacks numeric \"$f\": $(head -c 300 "$out")"; fi
    done
    [ -n "$(json_field "$out" id)" ] || log "warning: xenod --json output for $t lacks \"id\""
    record xenod "du_$t" "$r" "$(du_b "$D")"
  done
  record xenod time_total "$r" "$total"
  record xenod du_total "$r" "$(du_b "$D")"
  record xenod files_total "$r" "$(file_b "$D")"
  rm -rf --one-file-system "$D"
}

run_tar() {
  local r=$1 t th f
  local -A total=([0]=0 [1]=0) size=([0]=0 [1]=0)
  for t in "${TREES[@]}"; do
    for th in 1 0; do
      f=$W/$t.T$th.tar.zst
      prep "$(tree_dir "$t")"
      if ! timed bash -c 'set -o pipefail; tar -C "$1" -cf - . | zstd -3 -T"$2" -q >"$3"' _ "$(tree_dir "$t")" "$th" "$f"; then
        log "tar|zstd -T$th failed on $t"; return 1
      fi
      record "zstdT$th" "time_$t" "$r" "$ELAPSED"
      record "zstdT$th" "bytes_$t" "$r" "$(stat -c %s "$f")"
      total[$th]=$(awk -v a="${total[$th]}" -v b="$ELAPSED" 'BEGIN {printf "%.4f", a + b}')
      size[$th]=$((size[$th] + $(stat -c %s "$f")))
      record "zstdT$th" "du_$t" "$r" "${size[$th]}"
      rm -f "$f"
    done
  done
  for th in 1 0; do
    record "zstdT$th" time_total "$r" "${total[$th]}"
    record "zstdT$th" du_total "$r" "${size[$th]}"
    record "zstdT$th" files_total "$r" "${size[$th]}"
  done
}

run_ostree() {
  local r=$1 R=$W/ostree.$r t b total=0
  if ! ostree --repo="$R" init --mode=archive >"$W/ostree.out" 2>&1; then
    log "ostree init failed:"; cat "$W/ostree.out" >&2; return 1
  fi
  for t in "${TREES[@]}"; do
    b=$(echo "$t" | tr 'A-Z' 'a-z')
    prep "$(tree_dir "$t")"
    if ! timed ostree --repo="$R" commit -b "$b" --skip-list="$W/$t.skip" --tree=dir="$(tree_dir "$t")" >"$W/ostree.out" 2>&1; then
      log "ostree commit failed on $t:"; tail -n 20 "$W/ostree.out" >&2; return 1
    fi
    record ostree "time_$t" "$r" "$ELAPSED"
    total=$(awk -v a="$total" -v b="$ELAPSED" 'BEGIN {printf "%.4f", a + b}')
    record ostree "du_$t" "$r" "$(du_b "$R")"
  done
  record ostree time_total "$r" "$total"
  record ostree du_total "$r" "$(du_b "$R")"
  record ostree files_total "$r" "$(file_b "$R")"
  rm -rf --one-file-system "$R"
}

run_casync() {
  local r=$1 C=$W/casync.$r t total=0
  mkdir -p "$C/idx"
  for t in "${TREES[@]}"; do
    prep "$(tree_dir "$t")"
    if ! timed casync make --store="$C/store" "$C/idx/$t.caidx" "$(tree_dir "$t")" >"$W/casync.out" 2>&1; then
      log "casync make failed on $t:"; tail -n 20 "$W/casync.out" >&2; return 1
    fi
    record casync "time_$t" "$r" "$ELAPSED"
    total=$(awk -v a="$total" -v b="$ELAPSED" 'BEGIN {printf "%.4f", a + b}')
    record casync "du_$t" "$r" "$(du_b "$C/store")"
  done
  record casync time_total "$r" "$total"
  record casync du_total "$r" "$(du_b "$C/store")"
  record casync files_total "$r" "$(file_b "$C/store")"
  record casync idx_total "$r" "$(file_b "$C/idx")"
  rm -rf --one-file-system "$C"
}

ORDER=(xenod tar ostree casync)
for ((r = 1; r <= ROUNDS; r++)); do
  for ((i = 0; i < ${#ORDER[@]}; i++)); do
    t=${ORDER[(i + r - 1) % ${#ORDER[@]}]}
    [ -n "${WANT[$t]:-}" ] && [ -z "${FAILED[$t]:-}" ] || continue
    log "round $r/$ROUNDS: $t"
    if ! "run_$t" "$r"; then
      FAILED[$t]=1
      log "$t failed in round $r; skipping it from now on"
    fi
  done
done

# --- report ----------------------------------------------------------------

med() {  # TOOL METRIC -> median of the recorded values, empty if none
  awk -F'\t' -v t="$1" -v m="$2" '$1 == t && $2 == m {print $4}' "$RAW" | sort -g |
    awk '{v[NR] = $1} END {if (NR == 0) exit; if (NR % 2) printf "%.12g\n", v[(NR + 1) / 2]; else printf "%.12g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
has() { [ -n "$(med "$1" "$2")" ]; }
sec() { [ -n "$1" ] && awk -v v="$1" 'BEGIN {printf "%.2f", v}' || printf -- '-'; }
mb()  { [ -n "$1" ] && awk -v v="$1" 'BEGIN {printf "%.1f", v / 1e6}' || printf -- '-'; }
ratio() { if [ -n "$1" ] && [ -n "$2" ]; then awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else printf "-"}'; else printf -- '-'; fi; }

label() {
  case $1 in
    xenod) echo "xenod" ;;
    zstdT1) echo "tar \| zstd -3 -T1" ;;
    zstdT0) echo "tar \| zstd -3 -T0" ;;
    ostree) echo "OSTree (archive: zlib per file)" ;;
    casync) echo "casync (default: zstd)" ;;
  esac
}

NROWS=$(cut -f1 "$RAW" | sort -u | wc -l)
{
  echo "## xenod store end to end (median of $ROUNDS rounds)"
  echo
  echo "Fixtures: T1 $(du -sb "$T1" | cut -f1) B ($(find "$T1" | wc -l) entries), T2 $(du -sb "$T2" | cut -f1) B, O1 $(du -sb "$O1" | cut -f1) B; $(head -n1 "$FIXDIR/STAMP")."
  echo "Host: $(nproc) CPUs, $(uname -r). MB = 10^6 bytes."
  [ -z "$XENOD_NOTE" ] || { echo; echo "**$XENOD_NOTE**"; }
  for t in "${!FAILED[@]}"; do echo; echo "**$t FAILED; its numbers are partial or missing (see stderr).**"; done
  echo
  echo "### Publish T1 (fresh store, warm page cache)"
  echo
  echo "| tool | time (s) | output (MB) | xenod time / tool time |"
  echo "|---|---:|---:|---:|"
  XT=$(med xenod time_T1)
  for t in xenod zstdT1 zstdT0; do
    has "$t" time_T1 || continue
    out=$(med "$t" du_T1)
    if [ "$t" = xenod ]; then rt="-"; else rt=$(ratio "$XT" "$(med "$t" time_T1)"); fi
    [ "$t" = zstdT1 ] && [ "$rt" != "-" ] && rt="$rt (goal <= 0.80x)"
    echo "| $(label "$t") | $(sec "$(med "$t" time_T1)") | $(mb "$out") | $rt |"
  done
  echo
  echo "### Store after T1, then T2 (own template), then O1 (overlay on T1)"
  echo
  echo "| store | after T1 (MB) | after T2 (MB) | after O1 = total (MB) | total file bytes (MB) | time T1 / T2 / O1 (s) | total time (s) |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for t in xenod ostree casync zstdT1; do
    has "$t" du_total || continue
    echo "| $(label "$t") | $(mb "$(med "$t" du_T1)") | $(mb "$(med "$t" du_T2)") | $(mb "$(med "$t" du_total)") | $(mb "$(med "$t" files_total)") | $(sec "$(med "$t" time_T1)") / $(sec "$(med "$t" time_T2)") / $(sec "$(med "$t" time_O1)") | $(sec "$(med "$t" time_total)") |"
  done
  echo
  echo "Sizes are \`du -sb\` of the repository directory; tar|zstd is three separate archives (no dedup)."
  has casync idx_total && echo "casync's three .caidx index files add $(mb "$(med casync idx_total)") MB (not in the store size)."
  has ostree du_total && echo "OSTree: \`ostree init --mode=archive\`, \`commit -b BRANCH --tree=dir=TREE --skip-list=LIST\` (LIST = /dev: OSTree cannot store device nodes); defaults otherwise (fsync on; --fsync=false made no material difference here)."
  has casync du_total && echo "casync: \`casync make --store=S TREE.caidx TREE\` with defaults (as root: uid/gid, modes, ns times, xattrs, device nodes; zstd chunks; 64 KiB average chunk)."
  if has xenod du_total; then
    XS=$(med xenod du_total)
    echo
    echo "| xenod store / peer store | ratio |"
    echo "|---|---:|"
    for t in ostree casync zstdT1; do
      has "$t" du_total && echo "| xenod / $(label "$t") | $(ratio "$XS" "$(med "$t" du_total)") |"
    done
    verdict=$(awk -v x="$XS" -v o="$(med ostree du_total)" -v c="$(med casync du_total)" 'BEGIN {
      ok = (x <= 95e6); s = sprintf("%.1f MB %s 95 MB", x / 1e6, ok ? "<=" : ">");
      if (o != "") { ok = ok && x < o; s = s sprintf(", %s OSTree", x < o ? "smaller than" : "NOT smaller than") }
      if (c != "") { ok = ok && x < c; s = s sprintf(", %s casync", x < c ? "smaller than" : "NOT smaller than") }
      printf "%s: %s", ok ? "goal met" : "goal NOT met", s }')
    echo
    echo "Store goal (xenod smaller than OSTree and casync, <= 95 MB): $verdict."
    if has xenod bytes_stored_T1; then
      echo "xenod --json reports bytes_in/bytes_stored: T1 $(mb "$(med xenod bytes_in_T1)")/$(mb "$(med xenod bytes_stored_T1)") MB, T2 $(mb "$(med xenod bytes_in_T2)")/$(mb "$(med xenod bytes_stored_T2)") MB, O1 $(mb "$(med xenod bytes_in_O1)")/$(mb "$(med xenod bytes_stored_O1)") MB."
    fi
  fi
}
[ "$NROWS" -gt 0 ] || log "no measurements were recorded"

if [ -n "$OUT" ]; then
  {
    printf '{"rounds":%s,"date":"%s","host":{"cpus":%s,"kernel":"%s"},' \
      "$ROUNDS" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(nproc)" "$(uname -r)"
    printf '"fixtures":"%s","xenod":%s,"failed":[%s],"results":[' \
      "$FIXDIR" "$([ -n "${WANT[xenod]:-}" ] && printf '"%s"' "$XENOD" || printf null)" \
      "$(for t in "${!FAILED[@]}"; do printf '"%s"\n' "$t"; done | paste -sd, -)"
    first=1
    while IFS=$'\t' read -r tool metric; do
      raw=$(awk -F'\t' -v t="$tool" -v m="$metric" '$1 == t && $2 == m {print $4}' "$RAW" | paste -sd, -)
      [ $first -eq 1 ] || printf ','
      first=0
      printf '{"tool":"%s","metric":"%s","unit":"%s","values":[%s],"median":%s}' \
        "$tool" "$metric" "$(case $metric in time_*) echo s ;; *) echo bytes ;; esac)" "$raw" "$(med "$tool" "$metric")"
    done < <(cut -f1,2 "$RAW" | sort -u)
    printf ']}\n'
  } >"$OUT.tmp"
  mv -f "$OUT.tmp" "$OUT"
  log "raw numbers: $OUT"
fi

[ ${#FAILED[@]} -eq 0 ]
