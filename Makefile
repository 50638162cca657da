# CYPHONIC adapter: the two commands a new user types are `make demo` and `make test`.
# Both run `make setup` first, which is idempotent (Debian packages + a pinned venv).

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build

# Debian packages the project needs (installed with --no-install-recommends). postgresql: the
# cloud's second engine; the store tests start their own server from it (no systemd unit used).
# rauc, squashfs-tools, openssl: the update tests sign and check bundles (tests/test_update.py).
APT_PACKAGES := python3 python3-venv python3-dev gcc libc6-dev pkg-config \
	libnetfilter-queue-dev libnfnetlink-dev nftables iptables iproute2 \
	iperf3 bind9-dnsutils isc-dhcp-client udhcpc dhcpcd-base iputils-ping procps tcpdump \
	postgresql libpq5 rauc squashfs-tools openssl

# `make image` (and so `make test`, whose boot test boots the image) needs these.
IMAGE_APT_PACKAGES := mmdebstrap qemu-user-static binfmt-support arch-test mtools dosfstools \
	fdisk e2fsprogs xz-utils qemu-system-arm ipxe-qemu openssh-client \
	rauc squashfs-tools u-boot-tools u-boot-qemu openssl

# Only `make bench` needs these (the node benchmark's wireguard-go baseline).
BENCH_APT_PACKAGES := wireguard-go wireguard-tools

.PHONY: setup apt venv image test test-fast demo bench clean distclean help

help:
	@echo "make demo    run the demo (sets everything up first)"
	@echo "make test    run the whole test suite (sets everything up first)"
	@echo "make bench   run the benchmarks (tables and JSON in build/bench/)"
	@echo "make image   build the Raspberry Pi image and its update bundle (build/image/*.img.xz, *.raucb; 10 min the first time)"
	@echo "make setup   install Debian packages and the pinned venv (idempotent)"

setup: apt venv

apt:
	@scripts/ensure-apt.sh $(APT_PACKAGES)

venv: $(VENV)/.installed

# The product (root pyproject.toml, with the cloud's PostgreSQL extra) and the lab (lab/pyproject.toml: the namespace lab, the demo
# and the benchmarks; development only, never in the image), both editable.
$(VENV)/.installed: pyproject.toml lab/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,cloud]' -e ./lab
	@touch $@

# The image is rebuilt on every `make test` (the slow Debian base is cached outside the repo,
# in /var/cache/cyphonic-image): tests/test_image_boot.py boots what this tree builds.
image: setup
	@scripts/ensure-apt.sh $(IMAGE_APT_PACKAGES)
	image/build.sh --out $(BUILD)/image

test: setup image
	$(PY) -m pytest -q tests

# Developers' loop: no root, no namespaces, no image.
test-fast: venv
	$(PY) -m pytest -q -m 'not root' tests

demo: setup
	$(PY) -m lab.demo

bench: setup
	@scripts/ensure-apt.sh $(BENCH_APT_PACKAGES)
	@mkdir -p $(BUILD)/bench
	$(PY) -m lab.bench --out $(BUILD)/bench

clean:
	rm -rf $(BUILD) .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info lab/*.egg-info
