# The two commands of the README: `make demo` and `make test`. Each sets everything up first
# (idempotent: a venv in .venv, pinned packages, colcon build of the messages).
SHELL := /bin/bash
RUN := scripts/run.sh

.PHONY: setup demo test bench bench-quick bench-gpu clean

setup:
	scripts/setup.sh

demo: setup
	$(RUN) python -m qvl_ros.demo

test: setup
	$(RUN) env QVL_REQUIRE_ROS=1 python -m pytest -q -rs test

bench: setup
	$(RUN) python bench/run.py

bench-quick: setup
	$(RUN) python bench/run.py --quick

# On a CUDA machine, with its own Python (no venv, no ROS): see README, "GPU".
bench-gpu:
	python3 bench/gpu.py

clean:
	rm -rf build install log build-kilted install-kilted log-kilted .cache
