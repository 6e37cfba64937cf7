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
           -DTP_VERSION='"$(VERSION)"' -MMD -MP
LDFLAGS += $(SANFLAGS)
LDLIBS  += $(PKG_LIBS) -lpthread -lm

LIB_SRCS    := $(wildcard lib/*.c)
SYNC_SRCS   := $(wildcard daemon/*.c)
SERVER_SRCS := $(wildcard server/*.c)
WH_SRCS     := $(wildcard emulator/*.c)
TEST_SUPPORT:= tests/tp_test.c
UNIT_SRCS   := $(wildcard tests/unit/test_*.c) $(wildcard tests/integration/test_*.c)

obj = $(patsubst %.c,$(BUILDDIR)/%.o,$(1))

LIBTP    := $(BUILDDIR)/libtidepool.a
PROGRAMS := $(BINDIR)/tidepool-sync $(BINDIR)/tidepool-server $(BINDIR)/tidepool-warehouse
TESTBINS := $(patsubst tests/%.c,$(BUILDDIR)/tests/%,$(UNIT_SRCS))

.PHONY: all check tests run install uninstall clean distclean deps bench
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

tests: $(PROGRAMS) $(TESTBINS)

# Installs missing Debian packages (as root), builds, then runs every test
# against a throwaway PostgreSQL. The last line is "N passed, N failed".
check:
	@scripts/install-deps.sh --quiet
	@$(MAKE) --no-print-directory tests
	@TP_BINDIR=$(BINDIR) TP_TESTDIR=$(BUILDDIR)/tests tests/run $(TESTS)

run:
	@scripts/install-deps.sh --quiet
	@$(MAKE) --no-print-directory all
	@scripts/run.sh $(if $(MODE),$(MODE),foreground)

deps:
	scripts/install-deps.sh

bench: all
	@for b in bench/*; do [ -x "$$b" ] && [ -f "$$b" ] && echo "== $$b" && "$$b"; done; true

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/tidepool/migrations
	install -m 755 $(PROGRAMS) $(DESTDIR)$(PREFIX)/bin/
	install -m 644 sql/migrations/*.sql $(DESTDIR)$(PREFIX)/share/tidepool/migrations/

uninstall:
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/bin/,tidepool-sync tidepool-server tidepool-warehouse)
	rm -rf $(DESTDIR)$(PREFIX)/share/tidepool

clean:
	rm -rf build bin

distclean: clean
	rm -rf .run

-include $(shell find build -name '*.d' 2>/dev/null)
