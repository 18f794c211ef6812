# edge_qmul: `make install`, `make demo`, `make fleet-demo`, `make check`, `make test`, `make test-slow`, `make bench`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install check test test-slow test-arm64 bench demo fleet-demo eval clean

install: $(STAMP)

# Creates .venv when missing; the installation's time is reported on its own line, apart from the
# demo's or the tests' own time.
$(STAMP): pyproject.toml
	@start=$$(date +%s); \
	echo "installing edge_qmul and its pinned dependencies into $(VENV) ..."; \
	( test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) ) && \
	$(BIN)/python -m pip install --quiet --upgrade pip && \
	$(BIN)/python -m pip install --quiet -e '.[dev,device,host]' && \
	touch $(STAMP) && \
	echo "installation took $$(( $$(date +%s) - start )) s"

# The codebase's guards: the import contract (pyproject.toml's [tool.importlinter]: the engine never
# imports the bridge, tools or benchmarks; the bridge only edge_qmul.api; no cycle between the
# engine's sub-packages) and the line budget (600 lines per file, each opening with a docstring).
check: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python tools/line_budget.py

# The fast tier: every module exercised; the sweeps, kills, fuzzing, the demo and training from
# scratch are the slow tier. pytest's exit status 5 (nothing selected) counts as a failure.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=25

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --durations=25

# The board's checks under an emulated Cortex-A76 (ARM64_CPU=a72: a Raspberry Pi 4's Cortex-A72):
# a Debian arm64 root built once with debootstrap and qemu-user (cached in ~/.cache/edge_qmul/arm64),
# the project installed there, its tests against the aarch64 LiteRT, an x86 host driving the
# emulated agent. Needs root (chroot, mounts, binfmt_misc); tools/arm64.sh says more.
test-arm64: $(STAMP)
	tools/arm64.sh all

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/forward.py --json benchmarks/results/forward.json
	$(BIN)/python benchmarks/train_step.py --json benchmarks/results/train_step.json
	$(BIN)/python benchmarks/train_accuracy.py --json benchmarks/results/train_accuracy.json
	$(BIN)/python benchmarks/unlearn_qat.py --json benchmarks/results/unlearn_qat.json --markdown
	$(BIN)/python benchmarks/startup.py --json benchmarks/results/startup.json

# The unlearning comparison: tunes and evaluates every setting of the suite (recorded run: 71 min of
# one core's work, as two processes side by side), rewrites benchmarks/README.md's and README.md's
# generated tables, then the stopping target's study and the demo's table. One thread: the
# figures of a mobilenet_tiny run were seen to move with the thread count (the digits CNN's do not).
eval: $(STAMP)
	NUMBA_NUM_THREADS=1 $(BIN)/python tools/evaluate.py --suite benchmarks/unlearn_suite.json
	NUMBA_NUM_THREADS=1 $(BIN)/python benchmarks/stopping_target.py
	$(BIN)/python tools/demo.py --out demo_out --readme README.md

# A broker and five device agents on this machine (needs mosquitto: apt-get install mosquitto); one
# person forgotten on the three devices that hold them, one of those back only after the request.
fleet-demo: $(STAMP)
	$(BIN)/python tools/fleet_demo.py

demo: $(STAMP)
	$(BIN)/python tools/demo.py --out demo_out

clean:
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
