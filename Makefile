# Build and install Hearth like a distribution package:
#   make                                  release binaries (first build compiles llama.cpp)
#   make install DESTDIR=/tmp/root PREFIX=/usr
#   make selinux                          target/selinux/hearthd.pp (needs selinux-policy-dev)
PREFIX ?= /usr
DESTDIR ?=
PROFILE ?= release

all:
	cargo build --profile $(PROFILE) --bins

install: all
	DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" PROFILE="$(PROFILE)" ./scripts/install.sh

selinux:
	./scripts/selinux-check.sh --build-only

.PHONY: all install selinux
