# Sourced by demo.sh and bench.sh: install nvembed into the PostgreSQL of PG_CONFIG and run a
# throwaway cluster with it preloaded. Sets WORK (temp dir), PSQL (array: psql command line),
# PG_BINDIR, PGBENCH, PORT; `cluster_stop` stops it and removes WORK (callers trap it on EXIT).
PG_CONFIG=${PG_CONFIG:-pg_config}
PG_BINDIR=$("$PG_CONFIG" --bindir)
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
AS_PG=(); [ "$(id -u)" = 0 ] && AS_PG=(sudo -u postgres)

install_nvembed() {
  $SUDO install -m 755 target/release/nvembed-model-server "$("$PG_CONFIG" --pkglibdir)/"
  (cd extension && cargo pgrx install --release --pg-config "$PG_BINDIR/pg_config" $([ -n "$SUDO" ] && echo --sudo) >/dev/null)
}

# cluster_start MODEL [extra postgresql.conf lines...]
cluster_start() {
  local model=$1; shift
  WORK=$(mktemp -d /tmp/nvembed-cluster.XXXXXX)
  chmod 755 "$WORK"
  if [ -d "$model" ]; then # the server's OS user must be able to read a local model
    cp -r "$model" "$WORK/model"; model="$WORK/model"
  fi
  [ "$(id -u)" = 0 ] && chown -R postgres "$WORK"
  PORT=$((20000 + RANDOM % 10000))
  local port=$PORT
  "${AS_PG[@]}" "$PG_BINDIR/initdb" -D "$WORK/data" -A trust -U postgres >/dev/null
  {
    echo "port = $port"
    echo "listen_addresses = ''"
    echo "unix_socket_directories = '$WORK'"
    echo "shared_preload_libraries = 'nvembed'"
    echo "nvembed.model = '$model'"
    echo "max_connections = 50"
    for line in "$@"; do echo "$line"; done
  } >> "$WORK/data/postgresql.conf"
  "${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -w start >/dev/null
  PSQL=("${AS_PG[@]}" "$PG_BINDIR/psql" -h "$WORK" -p "$port" -U postgres -X -q -v ON_ERROR_STOP=1)
  PGBENCH=("${AS_PG[@]}" "$PG_BINDIR/pgbench" -h "$WORK" -p "$port" -U postgres)
}

cluster_stop() {
  [ -n "${WORK:-}" ] || return 0
  "${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
  WORK=""
}
