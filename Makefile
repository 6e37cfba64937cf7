# Tidepool build. Plain make; sources are found by wildcard so adding a module
# needs no edit here. `make SANITIZE=1` builds an ASan+UBSan tree under build/san.

PREFIX  ?= /usr/local
DESTDIR ?=
VERSION := 0.1.0

PKGS := libpq libcurl libevent libevent_pthreads libevent_openssl jansson openssl

ifeq ($(SANITIZE),1)
BUILDDIR ?= build/san
BINDIR   ?= build/san/bin
SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
else
BUILDDIR ?= build/default
BINDIR   ?= bin
SANFLAGS :=
endif

CC      ?= cc
OPT     ?= -O2 -g
WARN    := -Wall -Wextra -Wshadow -Wformat=2 -Wstrict-prototypes -Werror
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
CFLAGS  += -std=c11 -D_GNU_SOURCE $(OPT) $(WARN) $(SANFLAGS) -Iinclude $(PKG_CFLAGS) \
           -DTP_VERSION='"$(VERSION)"' -DTP_DATADIR='"$(PREFIX)/share/tidepool"' -DTP_MIGRATIONS_DIR='"$(PREFIX)/share/tidepool/migrations"' -MMD -MP
LDFLAGS += $(SANFLAGS)
LDLIBS  += $(PKG_LIBS) -lpthread -lm

LIB_SRCS    := $(wildcard lib/*.c)
SYNC_SRCS   := $(wildcard daemon/*.c)
SERVER_SRCS := $(wildcard server/*.c)
WH_SRCS     := $(wildcard emulator/*.c)
TEST_SUPPORT:= tests/tp_test.c
UNIT_SRCS   := $(wildcard tests/unit/test_*.c) $(wildcard tests/integration/test_*.c)
FUZZ_SRCS   := $(wildcard tests/fuzz/fuzz_*.c)

obj = $(patsubst %.c,$(BUILDDIR)/%.o,$(1))

LIBTP    := $(BUILDDIR)/libtidepool.a
PROGRAMS := $(BINDIR)/tidepool-sync $(BINDIR)/tidepool-server $(BINDIR)/tidepool-warehouse
TESTBINS := $(patsubst tests/%.c,$(BUILDDIR)/tests/%,$(UNIT_SRCS))
FUZZBINS := $(patsubst tests/%.c,$(BUILDDIR)/tests/%,$(FUZZ_SRCS))

.PHONY: all check tests run install uninstall clean distclean deps bench fuzz docs
.SECONDARY:
all: $(PROGRAMS)

$(BUILDDIR)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(LIBTP): $(call obj,$(LIB_SRCS))
	@mkdir -p $(dir $@)
	$(AR) rcs $@ $^

$(BINDIR)/tidepool-sync: $(call obj,$(SYNC_SRCS)) $(LIBTP)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)
$(BINDIR)/tidepool-server: $(call obj,$(SERVER_SRCS)) $(LIBTP)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)
$(BINDIR)/tidepool-warehouse: $(call obj,$(WH_SRCS)) $(LIBTP)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# Each test file is its own program, linked with the test support code and the library.
$(BUILDDIR)/tests/%: $(BUILDDIR)/tests/%.o $(call obj,$(TEST_SUPPORT)) $(LIBTP)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# Fuzz targets run in `make check` through a replay driver (corpus + fixed mutations)...
$(BUILDDIR)/tests/fuzz/fuzz_%: $(BUILDDIR)/tests/fuzz/fuzz_%.o $(BUILDDIR)/tests/fuzz/driver.o $(LIBTP)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

tests: $(PROGRAMS) $(TESTBINS) $(FUZZBINS)

# ...and under libFuzzer with `make fuzz` (clang; FUZZ_SECONDS per target, default 60).
FUZZ_SECONDS ?= 60
fuzz:
	@$(MAKE) --no-print-directory CC=clang BUILDDIR=build/fuzz BINDIR=build/fuzz/bin \
	    SANFLAGS="-fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer" $(LIBTP:$(BUILDDIR)%=build/fuzz%)
	@set -e; for src in $(FUZZ_SRCS); do \
	    name=$$(basename $$src .c); \
	    clang -std=c11 -D_GNU_SOURCE -g -O1 -Iinclude $(PKG_CFLAGS) -fsanitize=fuzzer,address,undefined \
	        $$src build/fuzz/libtidepool.a $(LDLIBS) -o build/fuzz/$$name; \
	    mkdir -p build/fuzz/corpus-$$name; \
	    echo "== $$name ($(FUZZ_SECONDS)s)"; \
	    build/fuzz/$$name -max_total_time=$(FUZZ_SECONDS) -max_len=65536 \
	        build/fuzz/corpus-$$name tests/fuzz/corpus/$${name#fuzz_}; \
	done

# Installs missing Debian packages (as root), builds, then runs every test
# against a throwaway PostgreSQL. The last line is "N passed, N failed".
check:
	@scripts/install-deps.sh --quiet
	@$(MAKE) --no-print-directory tests
	@TP_SANITIZE=$(if $(filter 1,$(SANITIZE)),1,) TP_BINDIR=$(BINDIR) TP_TESTDIR=$(BUILDDIR)/tests tests/run $(TESTS)

run:
	@scripts/install-deps.sh --quiet
	@$(MAKE) --no-print-directory all
	@scripts/run.sh $(if $(MODE),$(MODE),foreground)

deps:
	scripts/install-deps.sh

# Documentation generated from code (the settings reference).
$(BUILDDIR)/tools/%: $(BUILDDIR)/tools/%.o $(LIBTP)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

docs: $(BUILDDIR)/tools/config_reference
	@scripts/gen-docs.sh $<

bench: all
	@for b in bench/*; do [ -x "$$b" ] && [ -f "$$b" ] && echo "== $$b" && "$$b"; done; true

install: all install-files

uninstall: uninstall-files

clean:
	rm -rf build bin

distclean: clean
	rm -rf .run

include mk/install.mk

-include $(shell find build -name '*.d' 2>/dev/null)
