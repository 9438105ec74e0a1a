#!/usr/bin/env bash
# Prepare a machine (Debian 12, as root or with sudo) to run swarmlog with no Docker:
#   - Debian packages: postgresql, redis-server, maven, default-jre-headless (only missing ones)
#   - .venv with `pip install -e '.[dev]'`
#   - the Apache Kafka broker jars, fetched once from Maven Central into ~/.cache/swarmlog
# Safe to run again: every step is skipped when already done.
# Then: .venv/bin/swarmlog up   (or: eval "$(.venv/bin/swarmlog up)")
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

if [ -t 1 ]; then
  say() { printf '\033[1m==>\033[0m %s\n' "$*"; }
else
  say() { printf '==> %s\n' "$*"; }
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "setup.sh: need root (or sudo) to run: $*" >&2
    exit 1
  fi
}

has_postgres() {
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null
}

# --- Debian packages -------------------------------------------------------------------
missing=()
has_postgres || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || {
    echo "setup.sh: apt-get not found; install these yourself: ${missing[*]}" >&2
    exit 1
  }
  export DEBIAN_FRONTEND=noninteractive
  say "apt-get update"
  as_root apt-get update -qq
  if [[ " ${missing[*]} " == *" postgresql "* ]]; then
    # swarmlog runs its own cluster per state dir: keep Debian from creating and starting
    # the system-wide "main" cluster on port 5432.
    say "apt-get install postgresql-common (no default cluster)"
    as_root apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null
    as_root sed -i 's/^#\?\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
      /etc/postgresql-common/createcluster.conf
  fi
  say "apt-get install ${missing[*]}"
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages: postgresql, redis-server, java, maven already present"
fi

# --- Python virtualenv -----------------------------------------------------------------
python=""
for candidate in python3 python3.13 python3.12 python3.11; do
  if command -v "$candidate" >/dev/null 2>&1 &&
    "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "setup.sh: swarmlog needs Python >= 3.11 (python3 is $(python3 --version 2>&1))" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  say "Creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.swarmlog-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "pip install -e '.[dev]' into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
else
  say ".venv is up to date"
fi

# --- Kafka broker jars -----------------------------------------------------------------
say "Kafka broker jars"
.venv/bin/python -c 'from infra.stack import ensure_kafka_jars; print(ensure_kafka_jars())'

say "Done. Start the local stack with: .venv/bin/swarmlog up   (in $repo)"
