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

# Under the lowest versions setup.cfg allows (ci/constraints-lowest.txt), in a venv that shares this Python's
# other packages: the tests of what the bounds were raised for (the shipped teacher, plain-diffusers loads,
# DiTPipeline, stock SD exports, LoRA adapters, torch-fidelity's metrics, the version message); short enough
# for CI's time limit (the whole fast suite passed under them too: 157 tests).
LOWEST_TESTS ?= \
	tests/test_quickstart.py::test_builtin_teacher_is_a_stock_ddpm_folder_with_recognisable_digits \
	tests/test_user_errors.py::test_a_library_version_or_api_mismatch_is_named_not_called_a_damaged_file \
	tests/test_pipelines.py::test_export_loads_in_plain_diffusers_with_identical_images \
	tests/test_fid.py::test_distill_fid_equals_torch_fidelity_on_same_pngs \
	tests/test_transformer_teachers.py::test_dit_teacher_sampling_equals_dit_pipeline \
	tests/test_transformer_teachers.py::test_the_stock_dit_pipeline_runs_a_few_step_dit_student \
	tests/test_text_to_image.py::test_the_stock_sd_pipelines_load_one_and_four_step_students_without_remote_code \
	"tests/test_lora.py::test_lora_students_train_and_export_an_adapter_for_the_teachers_own_pipeline[sim]"
test-lowest:
	$(PYTHON) -m venv --system-site-packages .venv-lowest
	.venv-lowest/bin/python -m pip install -q -c ci/constraints-lowest.txt -e ".[test]"
	.venv-lowest/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|diffusers|transformers|accelerate|peft|datasets) "
	PATH="$(CURDIR)/.venv-lowest/bin:$$PATH" .venv-lowest/bin/python -m pytest -q $(LOWEST_TESTS)

bench: install
	$(PYTHON) benchmarks/run.py
