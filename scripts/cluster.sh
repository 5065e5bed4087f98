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

# test_certificates DIR HOST...: a throwaway CA (DIR/ca.crt) and, for each HOST, a server
# certificate it signs (DIR/HOST.crt, DIR/HOST.key); P-256, valid one day.
test_certificates() {
  local dir=$1; shift
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  openssl req -x509 "${ec[@]}" -days 1 -subj /CN=nvembed-test-ca -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  for host in "$@"; do
    openssl req "${ec[@]}" -subj "/CN=$host" -keyout "$dir/$host.key" -out "$dir/$host.csr" 2>/dev/null
    printf 'subjectAltName=DNS:%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' "$host" > "$dir/$host.ext"
    openssl x509 -req -in "$dir/$host.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 1 \
      -extfile "$dir/$host.ext" -out "$dir/$host.crt" 2>/dev/null
  done
}

# A TCP port on loopback that is free now.
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

# standby_start: a streaming hot standby of the running cluster, in $WORK/standby on port
# PORT + 1 (cluster_stop stops it too). Sets STANDBY and SPSQL (psql on it, unaligned).
standby_start() {
  STANDBY="$WORK/standby"
  "${AS_PG[@]}" "$PG_BINDIR/pg_basebackup" -h "$WORK" -p "$PORT" -U postgres -D "$STANDBY" -R -X stream -c fast \
    2>"$WORK/basebackup.log" || { cat "$WORK/basebackup.log" >&2; echo "FAIL: pg_basebackup" >&2; exit 1; }
  echo "port = $((PORT + 1))" | "${AS_PG[@]}" tee -a "$STANDBY/postgresql.conf" >/dev/null
  "${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$STANDBY" -l "$WORK/standby.log" -w start >/dev/null
  SPSQL=("${AS_PG[@]}" "$PG_BINDIR/psql" -h "$WORK" -p "$((PORT + 1))" -U postgres -X -q -v ON_ERROR_STOP=1 -At)
}

cluster_stop() {
  [ -n "${WORK:-}" ] || return 0
  if [ -d "$WORK/standby" ]; then
    "${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/standby" -m immediate stop >/dev/null 2>&1 || true
  fi
  "${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
  WORK=""
}
