# The two set-up commands of the README. Each installs distill (with test extras) into the active
# Python first, so on a fresh machine nothing else is needed.
PYTHON ?= python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install quickstart test test-fast test-lowest lint bench

install:
	$(PYTHON) -m pip install -e ".[test]"

quickstart: install
	distill launch configs/quickstart.yaml

test: install
	ruff check .
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

# The fast tests of the library-facing code under the lowest versions setup.cfg allows
# (ci/constraints-lowest.txt), in a venv that shares this Python's other packages.
LOWEST_TESTS ?= tests/test_teachers.py tests/test_pipelines.py tests/test_text_to_image.py \
	tests/test_transformer_teachers.py tests/test_lora.py tests/test_user_errors.py tests/test_fid.py
test-lowest:
	$(PYTHON) -m venv --system-site-packages .venv-lowest
	.venv-lowest/bin/python -m pip install -q -c ci/constraints-lowest.txt -e ".[test]"
	.venv-lowest/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|diffusers|transformers|accelerate|peft|datasets) "
	PATH="$(CURDIR)/.venv-lowest/bin:$$PATH" .venv-lowest/bin/python -m pytest -q -m "not slow" $(LOWEST_TESTS)

bench: install
	$(PYTHON) benchmarks/run.py
