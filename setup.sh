#!/usr/bin/env bash
# Image similarity search: setup menu and non-interactive subcommands.
#   ./setup.sh                 interactive menu
#   ./setup.sh all [N]         fresh clone -> running server: install, init-db, populate N CIFAR-10 images, index, serve
#   ./setup.sh install | init-db | populate [N] | build-index | admin-key | serve | worker | test [PYTEST ARGS] | lint | status
#   ./setup.sh cluster-install   the optional Ray cluster (stage 2 over several machines, docs/cluster.md)
set -euo pipefail
cd "$(dirname "$0")"

VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
DEFAULT_IMAGES="${NUM_IMAGES:-2000}"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

install() {
  if [ ! -x "$PY" ]; then
    say "creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  say "installing Python dependencies (torch is large: a few minutes the first time)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -r requirements.txt
}

# Optional: Ray, for stage 2 over a cluster (RAY_ADDRESS, `python -m backend.cli cluster up`); not part of install.
cluster_install() {
  ensure_installed
  say "installing the cluster extra (Ray)"
  "$PY" -m pip install -q -r requirements-cluster.txt
}

install_dev() {
  install
  "$PY" -m pip install -q -r requirements-dev.txt
}

ensure_installed() {
  if [ ! -x "$PY" ] || ! "$PY" -c "import backend.cli, torch, faiss" 2>/dev/null; then install; fi
}

cli() { ensure_installed; "$PY" -m backend.cli "$@"; }

init_db() { say "setting up the database"; cli init-db; }

populate() {
  local n="${1:-$DEFAULT_IMAGES}"
  say "populating $n CIFAR-10 images${CIFAR10_DIR:+ from $CIFAR10_DIR}"
  cli populate --dataset cifar10 --split train --num-images "$n"
}

build_index() { say "building prototypes and index"; cli rebuild-prototypes && cli build-index; }

# Changing the catalogue needs an API key (AUTH_MODE=writes): the first run makes an admin key and keeps it in
# DATA_DIR/admin.key (mode 600); later runs reuse it while it is valid.
admin_key() { say "admin API key"; cli api-key ensure-admin; }

serve() {
  say "starting the server on http://${API_HOST:-0.0.0.0}:${API_PORT:-8000}/app (Ctrl-C stops it)"
  cli serve
}

lint() {
  install_dev
  say "lint, format and type checks"
  "$PY" -m ruff check .
  "$PY" -m ruff format --check .
  "$PY" -m mypy backend
}

run_tests() {
  install_dev
  say "running the test suite"
  "$PY" -m pytest -q "$@"
}

all() { install; init_db; populate "${1:-$DEFAULT_IMAGES}"; build_index; admin_key; serve; }

menu() {
  while true; do
    cat <<'MENU'

Image similarity search - setup
  1) Install dependencies
  2) Set up the database
  3) Populate with CIFAR-10
  4) Build prototypes and index
  5) Start the server
  6) Run the tests
  7) Everything (1-5)
  8) Status
  9) Create or show the admin API key
  w) Start a catalogue-job worker (more workers ingest faster; any machine that reaches the database)
  b) Back up the database to a file
  c) Install the cluster extra (Ray: stage 2 over several machines)
  q) Quit
MENU
    read -r -p "Choice: " choice || exit 0
    case "$choice" in
      1) install ;;
      2) init_db ;;
      3) read -r -p "How many images? [$DEFAULT_IMAGES] " n; populate "${n:-$DEFAULT_IMAGES}" ;;
      4) build_index ;;
      5) serve ;;
      6) run_tests ;;
      7) read -r -p "How many images? [$DEFAULT_IMAGES] " n; all "${n:-$DEFAULT_IMAGES}" ;;
      8) cli status ;;
      9) admin_key ;;
      w) cli worker ;;
      b) read -r -p "Backup file? [backup.dump] " f; cli backup "${f:-backup.dump}" ;;
      c) cluster_install ;;
      q|Q) exit 0 ;;
      *) echo "unknown choice: $choice" ;;
    esac
  done
}

cmd="${1:-menu}"
shift || true
case "$cmd" in
  menu) menu ;;
  install) install ;;
  cluster-install) cluster_install ;;
  init-db) init_db ;;
  populate) populate "$@" ;;
  build-index) build_index ;;
  serve|start) serve ;;
  worker) cli worker "$@" ;;
  test) run_tests "$@" ;;
  lint) lint ;;
  status) cli status ;;
  admin-key) admin_key ;;
  all) all "$@" ;;
  -h|--help|help) sed -n '2,6p' "$0" ;;
  *) echo "unknown command: $cmd (try: ./setup.sh help)" >&2; exit 2 ;;
esac
