# kvmctl developer entry points. `make demo` and `make test` install whatever is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := etcd-server etcd-client libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
	libvirt-dev qemu-system-x86 qemu-utils qemu-block-extra busybox-static pkg-config tgt \
	libiscsi-bin open-iscsi lvm2 fence-agents iproute2 git gcc python3-dev kmod dpkg ipmitool \
	systemd python3-venv debootstrap chromium chromium-driver zsh fish bindfs

.PHONY: install debs deb venv images lint test test-fast test-e2e demo demo-down crds bench fuzz soak clean

install: debs venv

debs:
	@bash scripts/install-debs.sh $(DEB_PACKAGES)

# dist/kvmctl_VERSION_ARCH.deb (docs/operations.md, "Debian package"); its install test is
# tests/test_deb_package.py (slow: a fresh Debian root made with debootstrap).
deb: debs
	bash scripts/build-deb.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The TCG test guest and the kernel lab's Debian kernel: downloaded and built once, here, so a
# slow mirror fails as a set-up error and not as a test timeout.
images: install
	$(PY) -m e2e.guest.build
	$(PY) -m e2e.kernellab.build

test: install lint images
	$(VENV)/bin/pytest -q tests e2e

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow" tests

test-e2e: install images
	$(VENV)/bin/pytest -q e2e

crds: venv
	$(PY) -m crds.generate

demo: install
	$(PY) -m e2e.harness.demo up

demo-down: venv
	$(PY) -m e2e.harness.demo down

# Coverage-guided fuzzing of manifest parsing and the domain XML builder (atheris, libFuzzer).
fuzz: install
	$(PY) -m pip install -q -e '.[fuzz]'
	corpus=$$(mktemp -d) && cp deploy/examples/article/*.yaml "$$corpus" && \
		$(PY) -m fuzz.fuzz_manifests -max_total_time=60 -rss_limit_mb=4096 -artifact_prefix=/tmp/ "$$corpus"
	$(PY) -m fuzz.fuzz_domain_xml -max_total_time=60 -rss_limit_mb=4096 -artifact_prefix=/tmp/

# Random host, network, agent, leader, etcd-member and double faults for SOAK_MINUTES in the
# three-hosts topology (etcd on the hosts; not part of `make test`, which runs a 3-minute
# version); writes a report with failover times per fault kind and fails on any violation.
SOAK_MINUTES ?= 30
soak: install
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES)

bench: install
	$(PY) -m bench.run_all

clean: demo-down
	rm -rf .run
