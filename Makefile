# nvembed — the two commands users and CI run: `make test`, `make demo`; `make install`, `make package`.
# The PostgreSQL majors the SQL tests run on; 15 is Debian's package, the others are built from
# Debian's source packages into PG_PREFIX/MAJOR (scripts/postgres.sh). The system tests, the demo
# and the bench run on PG_CONFIG's major.
PG_MAJORS ?= 15 18
PG_PREFIX ?= /opt/nvembed-postgresql
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
# oneDNN 3.x, built from source by scripts/onednn.sh (Debian has 2.6); the engine's build.rs
# links it statically from here.
export NVEMBED_ONEDNN_PREFIX ?= /opt/nvembed-onednn
PGRX_VERSION := 0.18.1
PGVECTOR_VERSION := 0.8.0
FIXTURE := engine/tests/fixtures/nvembed-tiny-a
# Test data must be readable by the postgres OS user (a checkout under /root is not).
TEST_ROOT ?= /tmp/nvembed-test
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUNAS := $(shell [ "$$(id -u)" = 0 ] && echo "--runas postgres --pgdata $(TEST_ROOT)/pgdata")

.PHONY: setup test engine-test extension-test system-test install server demo bench cuda-check package

setup:
	bash scripts/setup.sh "$(PGRX_VERSION)" "$(PGVECTOR_VERSION)" "$(PG_PREFIX)" $(sort 15 $(PG_MAJORS))
	bash scripts/onednn.sh "$(NVEMBED_ONEDNN_PREFIX)"

server:
	cargo build --release -p nvembed-engine --bin nvembed -p nvembed-server --bin nvembed-model-server

install: setup server
	$(SUDO) install -m 755 target/release/nvembed-model-server "$$($(PG_CONFIG) --pkglibdir)/"
	cd extension && cargo pgrx install --release --pg-config "$$($(PG_CONFIG) --bindir)/pg_config" $(if $(SUDO),--sudo,)

engine-test:
	cargo test --release -p nvembed-engine -p nvembed-protocol -p nvembed-server
	# The GPU build has no oneDNN: what the feature gates leave must still compile (cuda-check
	# compiles the CUDA side itself, too slowly for every run).
	cargo check --release -p nvembed-server --no-default-features
	bash scripts/readme-commands.sh

extension-test: server
	bash scripts/prepare-test-fixture.sh "$(FIXTURE)" "$(TEST_ROOT)/fixture"
	set -e; for major in $(PG_MAJORS); do \
	  echo "== SQL tests on PostgreSQL $$major"; \
	  pg_config=$$(bash scripts/pg-config.sh "$(PG_PREFIX)" $$major); \
	  $(SUDO) install -m 755 target/release/nvembed-model-server "$$($$pg_config --pkglibdir)/"; \
	  rm -rf "$(TEST_ROOT)/pgdata"; \
	  if [ "$$(id -u)" = 0 ]; then install -d -o postgres "$(TEST_ROOT)/pgdata"; fi; \
	  (cd extension && NVEMBED_TEST_FIXTURE="$(TEST_ROOT)/fixture" cargo pgrx test pg$$major $(RUNAS)); \
	done

# On PG_CONFIG's major (15): whole-server tests, remote model servers in TLS, the
# installation's life (update from 0.1.0,
# dump/restore, hot standby), and the .debs (the extension's, the model server's) installed
# with apt-get.
system-test: server
	bash scripts/system-tests.sh
	bash scripts/remote-tests.sh
	bash scripts/lifecycle-tests.sh
	bash scripts/package-test.sh "$$(bash scripts/package.sh "$(PG_PREFIX)" target/package 15)"
	bash scripts/package-server-test.sh "$$(bash scripts/package-server.sh target/package)"

# One .deb per major in PG_MAJORS, and one of the model server alone, under target/package.
package: setup server
	bash scripts/package.sh "$(PG_PREFIX)" target/package $(PG_MAJORS)
	bash scripts/package-server.sh target/package

test: setup engine-test extension-test system-test

demo: setup server
	bash scripts/demo.sh

bench: setup server
	bash scripts/bench.sh
	bash scripts/bench-remote.sh
	bash scripts/bench-search.sh

# The GPU build compiles (no GPU needed; downloads NVIDIA's CUDA wheels once). Not part of `test`.
cuda-check:
	bash scripts/cuda-check.sh
