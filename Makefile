# pg_orphan_cleanup: the commands a new user needs. Each one installs what is missing.
.PHONY: demo test repeat chaos bench setup install managed cluster-start cluster-stop cluster-destroy fmt lint

demo:            ## the whole story, end to end, on a throwaway cluster
	scripts/demo.sh

test:            ## everything CI runs: unit, property, #[pg_test] and end-to-end tests
	scripts/test.sh

repeat:          ## the repeat gate: make test N times (N=5) in a clean clone with one core kept busy
	scripts/repeat.sh $(N)

chaos:           ## the chaos suite at full scale; rewrites RELIABILITY.md (make test runs it at CI scale)
	scripts/chaos.sh

bench:           ## detection at scale, drain throughput, memory (BENCH_SCALE=tiny|small|full); not part of test
	scripts/bench.sh

setup:           ## apt packages, cargo-pgrx 0.18.0, cargo pgrx init
	scripts/setup.sh

install: setup   ## build and install the extension into PostgreSQL 15
	scripts/install.sh

managed:         ## the managed edition's install script, dist/pg_orphan_cleanup_managed--VERSION.sql (python3 only)
	scripts/managed.py

cluster-start:   ## a throwaway cluster on port 25432 (PGOC_PORT)
	scripts/cluster.sh start

cluster-stop:
	scripts/cluster.sh stop

cluster-destroy:
	scripts/cluster.sh destroy

fmt:
	cargo fmt --all

lint:
	cargo clippy --workspace --all-targets -- -D warnings
