# The two commands of the README. Each one sets up .venv on a fresh machine first.
.PHONY: demo test bench setup

setup:
	bash scripts/bootstrap.sh

demo: setup
	. .venv/bin/activate && bash examples/llama2/run_demo.sh

test: setup
	. .venv/bin/activate && OMP_NUM_THREADS=1 python -m pytest -q --durations=15 tests

bench: setup
	. .venv/bin/activate && python benchmarks/throughput.py --preset tiny
