# The two commands of the README. Both install mmjax (and its test and openclip extras) first.
PYTHON ?= python3
WORKDIR ?= runs/demo

.PHONY: install demo test test-fast

install:
	@command -v espeak-ng >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq espeak-ng) \
	  || echo "mmjax: could not install espeak-ng (it synthesises the spoken-digits audio); install it with your package manager"
	$(PYTHON) -m pip install -q -e ".[test,openclip]" -c .ci/constraints.txt

demo: install
	mmjax train --config configs/demo.py --workdir $(WORKDIR)

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"
