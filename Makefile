# nvembed — the two commands users and CI run: `make test`, `make demo`; and `make install`.
PG_CONFIG ?= pg_config
PG_MAJOR := 15
PGRX_VERSION := 0.18.1
PGVECTOR_VERSION := 0.8.0
FIXTURE := engine/tests/fixtures/nvembed-tiny-a
# Test data must be readable by the postgres OS user (a checkout under /root is not).
TEST_ROOT ?= /tmp/nvembed-test
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUNAS := $(shell [ "$$(id -u)" = 0 ] && echo "--runas postgres --pgdata $(TEST_ROOT)/pgdata")

.PHONY: setup test engine-test extension-test system-test install server demo bench cuda-check

setup:
	bash scripts/setup.sh "$(PG_CONFIG)" "$(PGRX_VERSION)" "$(PGVECTOR_VERSION)"

server:
	cargo build --release -p nvembed-engine --bin nvembed -p nvembed-server --bin nvembed-model-server

install: setup server
	$(SUDO) install -m 755 target/release/nvembed-model-server "$$($(PG_CONFIG) --pkglibdir)/"
	cd extension && cargo pgrx install --release --pg-config "$$($(PG_CONFIG) --bindir)/pg_config" $(if $(SUDO),--sudo,)

engine-test:
	cargo test --release -p nvembed-engine -p nvembed-protocol -p nvembed-server
	bash scripts/readme-commands.sh

extension-test: server
	$(SUDO) install -m 755 target/release/nvembed-model-server "$$($(PG_CONFIG) --pkglibdir)/"
	bash scripts/prepare-test-fixture.sh "$(FIXTURE)" "$(TEST_ROOT)/fixture"
	rm -rf "$(TEST_ROOT)/pgdata"
	if [ "$$(id -u)" = 0 ]; then install -d -o postgres "$(TEST_ROOT)/pgdata"; fi
	cd extension && NVEMBED_TEST_FIXTURE="$(TEST_ROOT)/fixture" cargo pgrx test pg$(PG_MAJOR) $(RUNAS)

system-test: server
	bash scripts/system-tests.sh

test: setup engine-test extension-test system-test

demo: setup server
	bash scripts/demo.sh

bench: setup server
	bash scripts/bench.sh

# The GPU build compiles (no GPU needed; downloads NVIDIA's CUDA wheels once). Not part of `test`.
cuda-check:
	bash scripts/cuda-check.sh
